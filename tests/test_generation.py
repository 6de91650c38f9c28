"""Generation tasks: decoding equals the plain per-prompt generate loop, extraction and
comparison rules, the [tasks.generate] keys, validate's checks, and finalists' generated text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer

from fitness.errors import FitnessError
from fitness.extract import GenerateSpec, cut_at_stop, gold_answer, normalize, parse_number, verdict
from fitness.generation import end_token_ids, reference_generate
from fitness.scoring import score_slice, score_slice_details
from fitness.slices import check_task, load_task
from fitness.spec import TaskSpec
from search.config import load_study
from search.errors import StudyConfigError
from tests.checkpoints import TinyFamily
from tests.studies import run, write_study

DEMO_TASKS = ("shipping", "refunds", "catalog")
# per demo task: whole completion / stop string + regex + numeric / stop string + contains
DEMO_SPECS = {
    "shipping": GenerateSpec(max_new_tokens=8, stop=("eta",), extract=r"carrier (\w+)", extract_gold=True),
    "refunds": GenerateSpec(max_new_tokens=8, normalize=("case", "whitespace")),
    "catalog": GenerateSpec(max_new_tokens=8, stop=("wh",), extract=r"(\d+)", extract_match="last",
                            extract_gold=True, compare="numeric"),
}


@pytest.fixture(scope="module")
def merged_demo_model(demo_family_root: Path) -> AutoModelForCausalLM:
    """base + the sum of the three specialists' task vectors: right on some rows, wrong on others."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(demo_family_root / "base").eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    tuned = [AutoModelForCausalLM.from_pretrained(demo_family_root / t).state_dict() for t in DEMO_TASKS]
    model.load_state_dict({k: base[k] + sum(s[k] - base[k] for s in tuned) for k in base})
    return model


def _demo_spec(root: Path, task: str) -> TaskSpec:
    folder = root / "data" / task
    return TaskSpec(task, folder / "search.jsonl", folder / "heldout.jsonl", metric="generate",
                    generate=DEMO_SPECS[task])


@pytest.mark.parametrize("task", DEMO_TASKS)
def test_generation_equals_per_prompt_generate_loop(demo_family_root: Path, merged_demo_model, task: str) -> None:
    """Every example of both demo slices: same text and same verdict as model.generate, one prompt at a time."""
    tokenizer = AutoTokenizer.from_pretrained(demo_family_root / "base")
    spec = _demo_spec(demo_family_root, task)
    data = load_task(spec, tokenizer, batch_size=64)
    for split in (data.search, data.heldout):
        score, records = score_slice_details(merged_demo_model, split)
        assert records is not None and len(records) == split.n
        reference = reference_generate(
            merged_demo_model, [e.prompt_ids for e in split.examples], tokenizer=tokenizer,
            max_new_tokens=spec.generate.max_new_tokens, stops=spec.generate.stop,
            end_ids=end_token_ids(merged_demo_model, tokenizer), pad_id=tokenizer.pad_token_id,
        )
        verdicts = []
        for record, text, example in zip(records, reference, split.examples, strict=True):
            assert record["completion"] == text, (example.file, example.row)
            expected, _ = verdict(spec.generate, text, gold_answer(spec.generate, example.answer))
            assert record["verdict"] == expected, (example.file, example.row)
            verdicts.append(expected)
            for stop in spec.generate.stop:
                assert stop not in text
        assert score == pytest.approx(sum(verdicts) / len(verdicts))
        assert 0 < sum(verdicts) < len(verdicts)  # the comparison means something


def test_a_batch_ends_as_soon_as_every_row_has_stopped(demo_family_root: Path) -> None:
    """Early exit: one forward pass per token up to the longest row's end token, not max_new_tokens."""
    tokenizer = AutoTokenizer.from_pretrained(demo_family_root / "base")
    model = AutoModelForCausalLM.from_pretrained(demo_family_root / "refunds").eval()
    spec = TaskSpec("refunds", demo_family_root / "data" / "refunds" / "search.jsonl",
                    demo_family_root / "data" / "refunds" / "heldout.jsonl", limit=6, metric="generate",
                    generate=GenerateSpec(max_new_tokens=40))
    data = load_task(spec, tokenizer, batch_size=64).search
    ends = end_token_ids(model, tokenizer)
    lengths = []  # new tokens per row, its end token included, as model.generate decodes it alone
    with torch.inference_mode():
        for example in data.examples:
            ids = torch.tensor([example.prompt_ids])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=40, eos_token_id=ends, pad_token_id=tokenizer.pad_token_id)
            lengths.append(out.shape[1] - ids.shape[1])
    assert max(lengths) < 40 and len(set(lengths)) > 1  # rows end at different steps, all before the limit
    passes: list[int] = []
    hook = model.register_forward_pre_hook(lambda *_: passes.append(1))
    try:
        score, records = score_slice_details(model, data)
    finally:
        hook.remove()
    assert len(passes) == max(lengths)  # one batch of 6 rows: it stopped with its longest row
    assert records is not None and score == sum(r["verdict"] for r in records) / 6


def test_the_shipped_generation_study_validates_without_warnings(
    repo_root: Path, demo_family_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from search.commands.validate import check_data

    config = load_study(repo_root / "studies" / "logistics_generate" / "study.toml")
    assert [t.metric for t in config.tasks] == ["generate"] * 3
    assert check_data(config) == {task: {"search": 200, "heldout": 200} for task in DEMO_TASKS}
    assert capsys.readouterr().err == ""  # every extract pattern matches the first gold answers


def test_generate_verdict_on_a_specialist_matches_exact_match(demo_family_root: Path) -> None:
    """With whole-completion exact comparison, generation agrees with teacher-forced exact match."""
    tokenizer = AutoTokenizer.from_pretrained(demo_family_root / "base")
    model = AutoModelForCausalLM.from_pretrained(demo_family_root / "refunds").eval()
    folder = demo_family_root / "data" / "refunds"
    exact = load_task(TaskSpec("refunds", folder / "search.jsonl", folder / "heldout.jsonl", limit=40), tokenizer)
    generated = load_task(TaskSpec("refunds", folder / "search.jsonl", folder / "heldout.jsonl", limit=40,
                                   metric="generate", generate=GenerateSpec(max_new_tokens=8)), tokenizer)
    assert score_slice(model, generated.heldout) == score_slice(model, exact.heldout)


# -- extraction and comparison (no model) -----------------------------------------------


def test_extraction_and_comparisons() -> None:
    gsm = GenerateSpec(extract=r"#### *(-?[\d,\.]+)", extract_gold=True, compare="numeric", normalize=("thousands",))
    gold = gold_answer(gsm, "She pays 3 * 400 = 1,200.\n#### 1,200")
    assert gold == "1200"
    assert verdict(gsm, "3 * 400 = 1200 so #### 1,200.", gold)[0] == 1.0
    assert verdict(gsm, "#### 1201", gold)[0] == 0.0
    assert verdict(gsm, "no marker 1200", gold) == (0.0, None)

    last = GenerateSpec(extract=r"-?\d[\d,]*\.?\d*", extract_match="last", compare="numeric", tolerance=0.01)
    assert verdict(last, "2 apples and 3 pears make 5.004", "5")[0] == 1.0
    assert verdict(last, "5 then 6", "5")[0] == 0.0

    words = GenerateSpec(normalize=("case", "punctuation", "whitespace"))
    assert verdict(words, "  Paris,   FRANCE! ", normalize(words, "paris france"))[0] == 1.0
    contains = GenerateSpec(compare="contains", normalize=("case",))
    assert verdict(contains, "The answer is Blue.", "blue")[0] == 1.0
    assert verdict(contains, "The answer is red.", "blue")[0] == 0.0
    assert parse_number("$1,234.50") == 1234.5 and parse_number("12 apples") is None


@given(st.text(max_size=40), st.lists(st.text(min_size=1, max_size=3), min_size=1, max_size=3))
def test_cut_at_stop_keeps_the_text_before_the_first_stop(text: str, stops: list[str]) -> None:
    cut, stopped = cut_at_stop(text, tuple(stops))
    assert text.startswith(cut)
    assert stopped == any(s in text for s in stops)
    # no stop string lies wholly inside the kept text
    assert not any(s in cut for s in stops)
    if stopped:
        assert any(text[len(cut):].startswith(s) for s in stops)


@given(st.integers(min_value=-10**9, max_value=10**9))
def test_thousands_separators_do_not_change_numbers(value: int) -> None:
    spec = GenerateSpec(compare="numeric", normalize=("thousands", "whitespace"))
    assert verdict(spec, f"{value:,}", gold_answer(spec, str(value)))[0] == 1.0


def test_spec_errors_name_the_key() -> None:
    with pytest.raises(FitnessError, match=r"generate.stop\[1\] is an empty string"):
        GenerateSpec(stop=("\n", ""))
    with pytest.raises(FitnessError, match="does not compile"):
        GenerateSpec(extract="(unclosed")
    with pytest.raises(FitnessError, match="needs generate.fewshot_file"):
        GenerateSpec(fewshot=2)
    with pytest.raises(FitnessError, match="a generate table needs metric 'generate'"):
        TaskSpec("t", Path("x.jsonl"), metric="loglik", generate=GenerateSpec())


# -- study file and validate ---------------------------------------------------------------


def _study(tmp_path: Path, family: TinyFamily, generate: str, metric: str = "") -> Path:
    path = write_study(tmp_path, family, trials=0, metric="generate")
    text = path.read_text().replace('metric = "generate"\n', f"{metric}generate = {generate}\n", 1)
    path.write_text(text.replace('metric = "generate"\n', 'metric = "loglik"\n'))
    return path


def test_generate_table_parses(tmp_path: Path, llama_family: TinyFamily) -> None:
    path = _study(tmp_path, llama_family, '{ max_new_tokens = 4, stop = ["w1"], extract = "w(\\\\d+)", '
                                          'compare = "numeric", normalize = ["case"], fewshot = 0 }')
    config = load_study(path)
    spec = config.tasks[0]
    assert spec.metric == "generate"  # the table alone makes a generation task
    assert spec.generate == GenerateSpec(max_new_tokens=4, stop=("w1",), extract=r"w(\d+)", compare="numeric",
                                         normalize=("case",))
    assert config.tasks[1].metric == "loglik"


@pytest.mark.parametrize(("generate", "message"), [
    ('{ extract = "(w" }', r"tasks\[0\]\.generate\.extract: regular expression '\(w' does not compile"),
    ('{ stop = ["w1", ""] }', r"tasks\[0\]\.generate\.stop\[1\]: is an empty string"),
    ('{ normalize = ["lower"] }', r"tasks\[0\]\.generate\.normalize\[0\]: expected one of"),
    ('{ compare = "fuzzy" }', r"tasks\[0\]\.generate\.compare: expected one of exact, contains, numeric"),
    ('{ max_tokens = 3 }', r"tasks\[0\]\.generate\.max_tokens: unknown key \(did you mean 'max_new_tokens'\?\)"),
    ('{ fewshot = 2 }', r"tasks\[0\]\.generate: fewshot > 0 needs generate.fewshot_file"),
])
def test_generate_table_errors(tmp_path: Path, llama_family: TinyFamily, generate: str, message: str) -> None:
    with pytest.raises(StudyConfigError, match=message):
        load_study(_study(tmp_path, llama_family, generate))


def test_every_generate_key_has_a_readme_row(repo_root: Path) -> None:
    from search.config import GENERATE_KEYS

    text = (repo_root / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### Generation tasks"):text.index("### Choosing a method")]
    missing = [key for key in GENERATE_KEYS if f"| `{key}` |" not in section]
    assert not missing


def _rows(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in rows))
    return path


def test_check_task_refuses_fewshot_overlap_and_unjudgeable_golds(tmp_path: Path, llama_family: TinyFamily) -> None:
    tokenizer = AutoTokenizer.from_pretrained(llama_family.base)
    search = _rows(tmp_path / "search.jsonl", [("w1 w2", "w3"), ("w4 w5", "w6")])
    heldout = _rows(tmp_path / "heldout.jsonl", [("w7 w8", "w9"), ("w10 w11", "w12")])
    shots = _rows(tmp_path / "shots.jsonl", [("w20 w21", "w22"), ("w7 w8", "w9")])
    spec = TaskSpec("t", search, heldout, metric="generate",
                    generate=GenerateSpec(fewshot=1, fewshot_file=shots))
    with pytest.raises(FitnessError, match=r"shots.jsonl: row 2: field 'prompt' is also a held-out row "
                                           r"\(.*heldout.jsonl: row 1\)"):
        check_task(spec, tokenizer)
    numeric = TaskSpec("t", search, heldout, metric="generate", generate=GenerateSpec(compare="numeric"))
    with pytest.raises(FitnessError, match=r"search.jsonl: row 1: field 'answer' \('w3'\) cannot be judged: "
                                           "it is not a number"):
        check_task(numeric, tokenizer)
    gold_pattern = TaskSpec("t", search, heldout, metric="generate",
                            generate=GenerateSpec(extract=r"#### (\d+)", extract_gold=True))
    with pytest.raises(FitnessError, match=r"search.jsonl: row 1: field 'answer' \('w3'\) cannot be judged: "
                                           r"the pattern '#### \(\\d\+\)' \(extract_gold = true\) does not match"):
        check_task(gold_pattern, tokenizer)


def test_check_task_warns_when_the_pattern_matches_no_answer(tmp_path: Path, llama_family: TinyFamily) -> None:
    tokenizer = AutoTokenizer.from_pretrained(llama_family.base)
    search = _rows(tmp_path / "search.jsonl", [("w1 w2", "w3"), ("w4 w5", "w6")])
    heldout = _rows(tmp_path / "heldout.jsonl", [("w7 w8", "w9")])
    warnings: list[str] = []
    spec = TaskSpec("t", search, heldout, metric="generate", generate=GenerateSpec(extract=r"#### (\d+)"))
    assert check_task(spec, tokenizer, warn=warnings.append) == {"search": 2, "heldout": 1}
    assert len(warnings) == 1
    assert f"generate.extract '{spec.generate.extract}' matches none of the first 3 answers (e.g. 'w3'; 'w6'" \
        in warnings[0]
    warnings.clear()
    matching = TaskSpec("t", search, heldout, metric="generate", generate=GenerateSpec(extract=r"w(\d+)"))
    check_task(matching, tokenizer, warn=warnings.append)
    assert warnings == []


def test_fewshot_examples_are_seeded_and_prefixed(tmp_path: Path, llama_family: TinyFamily) -> None:
    tokenizer = AutoTokenizer.from_pretrained(llama_family.base)
    search = _rows(tmp_path / "search.jsonl", [("w1 w2", "w3")])
    heldout = _rows(tmp_path / "heldout.jsonl", [("w7 w8", "w9")])
    shots = _rows(tmp_path / "shots.jsonl", [(f"w{20 + i} w{30 + i}", f"w{40 + i}") for i in range(6)])

    def prompt_text(seed: int) -> str:
        spec = TaskSpec("t", search, heldout, metric="generate",
                        generate=GenerateSpec(fewshot=2, fewshot_file=shots, fewshot_seed=seed,
                                              fewshot_separator=" w59 "))
        example = load_task(spec, tokenizer).heldout.examples[0]
        return tokenizer.decode(example.prompt_ids, skip_special_tokens=True)

    first = prompt_text(0)
    assert first == prompt_text(0)  # the same shots every time
    parts = first.split(" w59 ")
    assert len(parts) == 3 and parts[-1] == "w7 w8"
    for shot in parts[:2]:
        prompt_words = shot.split()
        assert len(prompt_words) == 3 and int(prompt_words[2][1:]) - int(prompt_words[0][1:]) == 20
    assert any(prompt_text(seed) != first for seed in range(1, 6))


def test_fewshot_examples_become_chat_turns(tmp_path: Path, llama_family: TinyFamily) -> None:
    tokenizer = AutoTokenizer.from_pretrained(llama_family.base)
    # roles as words of the tiny vocabulary: user w58, assistant w59, generation prompt w57
    tokenizer.chat_template = (
        "{% for m in messages %}{{ 'w58' if m['role'] == 'user' else 'w59' }} {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}w57{% endif %}"
    )
    search = _rows(tmp_path / "search.jsonl", [("w1 w2", "w3")])
    heldout = _rows(tmp_path / "heldout.jsonl", [("w7 w8", "w9")])
    shots = _rows(tmp_path / "shots.jsonl", [("w20 w30", "w40")])
    spec = TaskSpec("t", search, heldout, metric="generate", chat_template=True,
                    generate=GenerateSpec(fewshot=1, fewshot_file=shots))
    example = load_task(spec, tokenizer).heldout.examples[0]
    assert tokenizer.decode(example.prompt_ids) == "w58 w20 w30 w59 w40 w58 w7 w8 w57"


def completions_scorer(model, batch, examples, completions):  # noqa: ANN001, ANN201
    """A user scorer that reads the generated text: 1 when it is non-empty."""
    return [float(bool(text)) for text in completions]


def test_user_scorer_receives_the_completions(tmp_path: Path, llama_family: TinyFamily) -> None:
    tokenizer = AutoTokenizer.from_pretrained(llama_family.base)
    model = AutoModelForCausalLM.from_pretrained(llama_family.sources[0]).eval()
    search = _rows(tmp_path / "search.jsonl", [("w1 w2", "w3"), ("w4 w5", "w6")])
    heldout = _rows(tmp_path / "heldout.jsonl", [("w7 w8", "w9")])
    spec = TaskSpec("t", search, heldout, metric="tests.test_generation:completions_scorer",
                    generate=GenerateSpec(max_new_tokens=3))
    data = load_task(spec, tokenizer)
    score, records = score_slice_details(model, data.search)
    assert records is not None
    assert score == sum(bool(r["completion"]) for r in records) / 2


# -- a study: finalists' generated text ------------------------------------------------------


def test_finalists_generated_text_is_kept_and_linked(tmp_path: Path, llama_family: TinyFamily) -> None:
    path = write_study(tmp_path, llama_family, trials=2, metric="generate", top_k=1)
    path.write_text(path.read_text().replace('metric = "generate"\n',
                                             'metric = "generate"\ngenerate = { max_new_tokens = 3 }\n'))
    config, study = run(path)
    final = study.user_attrs["final_trial"]
    assert final is not None
    generated = Path(study.user_attrs[f"generations:{final}"])
    assert generated.parent == config.output / "generations"
    lines = [json.loads(line) for line in generated.read_text().splitlines()]
    assert lines[0] == {"mergesearch": "generations", "trial": final}
    assert [r["task"] for r in lines[1:]] == ["alpha"] * 12 + ["beta"] * 12
    assert {"prompt", "answer", "completion", "extracted", "verdict", "file", "row"} <= set(lines[1])
    assert all(r["split"] == "heldout" for r in lines[1:])

    from search.annotate import best_note, chosen_trial
    from search.report import build_report

    best = chosen_trial(study)
    assert best is not None and best.number == final
    assert str(generated) in best_note(study, best)
    page = build_report(study, task_higher={t.name: True for t in config.tasks})
    assert f"href='{generated.as_uri()}'" in page
