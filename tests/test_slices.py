"""fitness.slices: reading local task files, disjoint splits, tokenisation, named errors."""

from __future__ import annotations

import csv
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import datasets
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from fitness.errors import FitnessError
from fitness.gates import GateSpec
from fitness.slices import EncodedSlice, load_task
from fitness.spec import TaskSpec
from fitness.subset import subset_indices
from tests.checkpoints import VOCAB, tiny_tokenizer, word_tokenizer

Row = dict[str, object]


def toy_rows(n: int, offset: int = 0) -> list[Row]:
    """Distinct prompts ``w<a> w<b> =`` with one- to three-word answers."""
    rows: list[Row] = []
    for i in range(offset, offset + n):
        a, b = divmod(i, 10)
        rows.append({"prompt": f"w{a} w{b} =", "answer": " ".join(f"w{20 + a}" for _ in range(b % 3 + 1))})
    return rows


def write_jsonl(path: Path, rows: Sequence[Row]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_csv(path: Path, rows: Sequence[Row]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return tiny_tokenizer(("=",))


def word_ids(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(word) for word in text.split()]


def test_jsonl_splits_tokenise_to_bos_prompt_answer_eos(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    search = write_jsonl(tmp_path / "search.jsonl", toy_rows(6))
    heldout = write_jsonl(tmp_path / "heldout.jsonl", toy_rows(4, offset=50))
    data = load_task(TaskSpec("toy", search, heldout), tokenizer, batch_size=4)
    assert (data.search.n, data.heldout.n) == (6, 4)
    assert data.search.files == (search,) and data.heldout.files == (heldout,)
    example = data.heldout.examples[2]
    assert (example.prompt, example.row, example.file) == ("w5 w2 =", 3, heldout)
    # the tiny tokenizer's bos differs from eos, so <bos> is prepended (as in training)
    assert list(example.prompt_ids) == [tokenizer.bos_token_id, *word_ids(tokenizer, "w5 w2 =")]
    assert list(example.answer_ids) == word_ids(tokenizer, "w25 w25 w25")
    assert data.heldout.end_token_id == tokenizer.eos_token_id
    _assert_batches_hold_every_example(data.heldout, tokenizer.eos_token_id)
    _assert_batches_hold_every_example(data.search, tokenizer.eos_token_id)


def _assert_batches_hold_every_example(data: EncodedSlice, eos: int) -> None:
    seen: list[int] = []
    for batch in data.batches:
        assert batch.input_ids.device.type == "cpu"
        for r, example_index in enumerate(batch.example_index.tolist()):
            example = data.examples[example_index]
            length = len(example.prompt_ids) + len(example.answer_ids) + 1
            expected = [*example.prompt_ids, *example.answer_ids, eos]
            assert batch.input_ids[r, :length].tolist() == expected
            assert batch.attention_mask[r].tolist() == [1] * length + [0] * (batch.input_ids.shape[1] - length)
            assert batch.position_ids[r, :length].tolist() == list(range(length))
            # answer predictions are made one position early; the stop prediction follows them
            assert batch.target_ids[r][batch.answer_mask[r]].tolist() == list(example.answer_ids)
            assert batch.target_ids[r][batch.stop_mask[r]].tolist() == [eos]
            assert set(batch.scored_columns.tolist()) >= set(
                batch.answer_mask[r].nonzero().flatten().tolist()
            )
            seen.append(example_index)
    assert sorted(seen) == list(range(data.n))


def test_csv_parquet_and_folder_sources_read_the_same_rows(tmp_path: Path,
                                                          tokenizer: PreTrainedTokenizerFast) -> None:
    rows = toy_rows(8)
    heldout = write_jsonl(tmp_path / "heldout.jsonl", toy_rows(3, offset=60))
    as_csv = write_csv(tmp_path / "search.csv", rows)
    as_parquet = tmp_path / "search.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(as_parquet))
    folder = tmp_path / "parts"
    write_jsonl(folder / "b.jsonl", rows[4:])
    write_jsonl(folder / "a.jsonl", rows[:4])
    expected = [(r["prompt"], r["answer"]) for r in rows]
    for source in (as_csv, as_parquet, folder):
        data = load_task(TaskSpec("toy", source, heldout), tokenizer)
        assert [(e.prompt, e.answer) for e in data.search.examples] == expected, source
    files = load_task(TaskSpec("toy", folder, heldout), tokenizer).search.files
    assert files == (folder / "a.jsonl", folder / "b.jsonl")


def test_csv_keeps_answers_as_written(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    search = write_csv(tmp_path / "s.csv", [{"prompt": "w1 =", "answer": "007"}, {"prompt": "w2 =", "answer": "1.50"}])
    heldout = write_csv(tmp_path / "h.csv", [{"prompt": "w3 =", "answer": "0"}])
    data = load_task(TaskSpec("toy", search, heldout, metric="loglik"), tokenizer)
    assert [e.answer for e in data.search.examples] == ["007", "1.50"]


def test_seeded_split_is_reproducible_disjoint_and_complete(tmp_path: Path,
                                                             tokenizer: PreTrainedTokenizerFast) -> None:
    source = write_jsonl(tmp_path / "all.jsonl", toy_rows(40))

    def split(seed: int, fraction: float = 0.25) -> tuple[list[int], list[int]]:
        data = load_task(TaskSpec("toy", source, heldout_fraction=fraction, split_seed=seed), tokenizer)
        return [e.row for e in data.search.examples], [e.row for e in data.heldout.examples]

    search, heldout = split(0)
    assert len(heldout) == 10 and len(search) == 30
    assert sorted(search + heldout) == list(range(1, 41))
    assert search == sorted(search) and heldout == sorted(heldout)  # file order kept inside a split
    assert split(0) == (search, heldout)
    assert split(1) != (search, heldout)


def test_limit_keeps_a_seeded_subset_of_each_split(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    search = write_jsonl(tmp_path / "s.jsonl", toy_rows(9))
    heldout = write_jsonl(tmp_path / "h.jsonl", toy_rows(7, offset=70))
    data = load_task(TaskSpec("toy", search, heldout, limit=5), tokenizer, batch_size=2)
    for split, n in (("search", 9), ("heldout", 7)):  # which rows: tests/test_subset.py
        kept = [i + 1 for i in subset_indices(n, 5, seed=0, key=f"toy/{split}", labels=[-1] * n)]
        assert [e.row for e in getattr(data, split).examples] == kept
    assert len(data.search.batches) == 3


def test_choice_rows_encode_one_sequence_per_option(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    rows = [
        {"prompt": "w1 w2 =", "options": ["w3", "w4 w5", "w6"], "gold": 1},
        {"prompt": "w2 w2 =", "options": ["w7", "w8"], "gold": 0},
    ]
    search = write_jsonl(tmp_path / "s.jsonl", rows)
    heldout = write_jsonl(tmp_path / "h.jsonl", [{"prompt": "w9 =", "options": ["w1", "w2"], "gold": 1}])
    spec = TaskSpec("mc", search, heldout, metric="choice", choices_field="options", label_field="gold")
    data = load_task(spec, tokenizer)
    first = data.search.examples[0]
    assert first.choices == ("w3", "w4 w5", "w6") and first.label == 1 and first.answer == "w4 w5"
    assert [list(c) for c in first.continuation_ids] == [word_ids(tokenizer, c) for c in first.choices]
    assert data.search.labels.tolist() == [1, 0]
    assert sorted(zip(data.search.sequence_example.tolist(), data.search.sequence_choice.tolist(),
                      strict=True)) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    assert data.search.end_token_id is None  # options are scored without a stop token
    assert all(not bool(batch.stop_mask.any()) for batch in data.search.batches)


def test_chat_template_renders_prompts_with_one_bos(tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer(("=", "user:"))
    search = write_jsonl(tmp_path / "s.jsonl", toy_rows(2))
    heldout = write_jsonl(tmp_path / "h.jsonl", toy_rows(1, offset=30))
    spec = TaskSpec("chat", search, heldout, chat_template=True)
    with pytest.raises(FitnessError, match="task 'chat': chat_template = true but the base tokenizer has no chat"):
        load_task(spec, tokenizer)
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %} user: {{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %} = {% endif %}"
    )
    example = load_task(spec, tokenizer).search.examples[1]
    assert list(example.prompt_ids) == word_ids(tokenizer, "<bos> user: w0 w1 = =")
    assert list(example.answer_ids) == word_ids(tokenizer, "w20 w20")


def test_add_bos_false_keeps_prompt_tokens_only(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    search = write_jsonl(tmp_path / "s.jsonl", toy_rows(2))
    heldout = write_jsonl(tmp_path / "h.jsonl", toy_rows(1, offset=30))
    example = load_task(TaskSpec("toy", search, heldout, add_bos=False), tokenizer).search.examples[0]
    assert list(example.prompt_ids) == word_ids(tokenizer, "w0 w0 =")


# -- errors name the file, the row and the field --------------------------------------


def test_empty_file_is_named(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    empty = tmp_path / "search.jsonl"
    empty.write_text("\n")
    heldout = write_jsonl(tmp_path / "h.jsonl", toy_rows(2))
    with pytest.raises(FitnessError, match=rf"task 'toy': {empty}: the file is empty"):
        load_task(TaskSpec("toy", empty, heldout), tokenizer)


def test_missing_field_names_file_row_and_field(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    rows = toy_rows(4)
    del rows[2]["answer"]
    search = write_jsonl(tmp_path / "s.jsonl", rows)
    heldout = write_jsonl(tmp_path / "h.jsonl", toy_rows(2, offset=40))
    with pytest.raises(FitnessError, match=rf"{search}: row 3: missing field 'answer'"):
        load_task(TaskSpec("toy", search, heldout), tokenizer)
    with pytest.raises(FitnessError, match=rf"{heldout}: row 1: missing field 'question'"):
        load_task(TaskSpec("toy", heldout, heldout, prompt_field="question"), tokenizer)


def test_empty_answer_names_file_row_and_field(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    rows = toy_rows(3)
    rows[1]["answer"] = "  "
    search = write_csv(tmp_path / "s.csv", rows)
    heldout = write_jsonl(tmp_path / "h.jsonl", toy_rows(2, offset=40))
    with pytest.raises(FitnessError, match=rf"{search}: row 2: field 'answer' is empty"):
        load_task(TaskSpec("toy", search, heldout), tokenizer)


def test_answer_that_tokenizes_to_nothing_is_named(tmp_path: Path) -> None:
    # a tokenizer whose normaliser deletes "!" turns the answer "!!" into no tokens
    tokenizer = word_tokenizer([*VOCAB, "="], normalizers.Replace("!", ""))
    rows = toy_rows(3)
    rows[2]["answer"] = "!!"
    search = write_jsonl(tmp_path / "s.jsonl", rows)
    heldout = write_jsonl(tmp_path / "h.jsonl", toy_rows(2, offset=40))
    with pytest.raises(FitnessError, match=rf"{search}: row 3: field 'answer' tokenizes to nothing"):
        load_task(TaskSpec("toy", search, heldout), tokenizer)


def test_overlapping_splits_name_both_rows(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    search = write_jsonl(tmp_path / "s.jsonl", toy_rows(5))
    heldout_rows = toy_rows(3, offset=40)
    heldout_rows[1] = {"prompt": "w0 w3 =", "answer": "w1"}  # row 4 of the search file
    heldout = write_jsonl(tmp_path / "h.jsonl", heldout_rows)
    with pytest.raises(FitnessError, match=rf"{heldout}: row 2: field 'prompt' also appears in the search split "
                                           rf"\({search}: row 4\)"):
        load_task(TaskSpec("toy", search, heldout), tokenizer)


def test_duplicate_prompts_split_apart_are_an_overlap(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    source = write_jsonl(tmp_path / "all.jsonl", [{"prompt": "w1 =", "answer": "w2"}] * 6)
    with pytest.raises(FitnessError, match="must not overlap"):
        load_task(TaskSpec("toy", source), tokenizer)


def test_bad_specs_are_refused(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    path = tmp_path / "s.jsonl"
    with pytest.raises(FitnessError, match="task 'toy': unknown metric 'accuracy'"):
        TaskSpec("toy", path, metric="accuracy")
    with pytest.raises(FitnessError, match="not of the form 'package.module:function'"):
        TaskSpec("toy", path, metric="mod:")
    with pytest.raises(FitnessError, match="metric 'choice' needs choices_field"):
        TaskSpec("toy", path, metric="choice")
    with pytest.raises(FitnessError, match="heldout_fraction must be in"):
        TaskSpec("toy", path, heldout_fraction=1.0)
    with pytest.raises(FitnessError, match="weight must be"):
        TaskSpec("toy", path, weight=0.0)
    with pytest.raises(FitnessError, match="gate for task 'other'"):
        TaskSpec("toy", path, gates=(GateSpec("other", min=0.5),))
    with pytest.raises(FitnessError, match=rf"data file {tmp_path / 'nope.jsonl'} does not exist"):
        load_task(TaskSpec("toy", tmp_path / "nope.jsonl"), tokenizer)
    bad_format = tmp_path / "s.txt"
    bad_format.write_text("w1")
    with pytest.raises(FitnessError, match="unsupported format"):
        load_task(TaskSpec("toy", bad_format), tokenizer)


def test_choice_label_out_of_range_is_named(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    search = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "w1 =", "options": ["w2", "w3"], "gold": 2}])
    spec = TaskSpec("mc", search, search, metric="choice", choices_field="options", label_field="gold")
    with pytest.raises(FitnessError, match=rf"{search}: row 1: field 'gold' must be an option index in \[0, 2\)"):
        load_task(spec, tokenizer)


def test_too_few_rows_to_split_is_refused(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    source = write_jsonl(tmp_path / "one.jsonl", toy_rows(1))
    with pytest.raises(FitnessError, match="1 rows cannot be split"):
        load_task(TaskSpec("toy", source), tokenizer)


def test_byte_level_bpe_answers_are_the_tokens_of_the_joined_text(tmp_path: Path) -> None:
    """With a GPT-2-style tokenizer the answer's tokens carry the separating space."""
    from tokenizers import decoders, trainers

    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = ["the capital of france is paris", "the capital of spain is madrid", "paris and madrid"] * 20
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>",
                                        eos_token="<|endoftext|>")
    rows = [{"prompt": "the capital of france is", "answer": "paris"},
            {"prompt": "the capital of spain is", "answer": "madrid"}]
    search = write_jsonl(tmp_path / "s.jsonl", rows)
    heldout = write_jsonl(tmp_path / "h.jsonl", [{"prompt": "paris and", "answer": "madrid"}])
    data = load_task(TaskSpec("bpe", search, heldout), tokenizer)
    for example in (*data.search.examples, *data.heldout.examples):
        # bos == eos (GPT-2 convention): no bos is prepended by default
        assert list(example.prompt_ids) == tokenizer(example.prompt)["input_ids"]
        assert tokenizer.decode(list(example.answer_ids)) == " " + example.answer
        whole = tokenizer(f"{example.prompt} {example.answer}")["input_ids"]
        assert [*example.prompt_ids, *example.answer_ids] == whole
    assert data.search.end_token_id == tokenizer.eos_token_id


WORDS = st.lists(st.sampled_from([f"w{i}" for i in range(60)]), min_size=1, max_size=6).map(" ".join)


@settings(max_examples=12, deadline=None)
@given(
    pairs=st.lists(st.tuples(WORDS, WORDS), min_size=2, max_size=20, unique_by=lambda p: p[0]),
    batch_size=st.integers(1, 8),
)
def test_any_rows_round_trip_through_the_batches(pairs: list[tuple[str, str]], batch_size: int) -> None:
    tokenizer = tiny_tokenizer(("=",))
    with tempfile.TemporaryDirectory() as folder:
        source = write_jsonl(Path(folder) / "all.jsonl", [{"prompt": p, "answer": a} for p, a in pairs])
        data = load_task(TaskSpec("toy", source, heldout_fraction=0.5), tokenizer, batch_size=batch_size)
    examples = (*data.search.examples, *data.heldout.examples)
    assert sorted((e.prompt, e.answer) for e in examples) == sorted(pairs)
    for example in examples:
        assert list(example.prompt_ids) == [tokenizer.bos_token_id, *word_ids(tokenizer, example.prompt)]
        assert list(example.answer_ids) == word_ids(tokenizer, example.answer)
    for encoded in (data.search, data.heldout):
        assert all(len(batch.example_index) <= batch_size for batch in encoded.batches)
        _assert_batches_hold_every_example(encoded, tokenizer.eos_token_id)
