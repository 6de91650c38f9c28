"""fitness.scoring on real (tiny, briefly trained) models: agreement with generate and
with direct one-example-at-a-time computations."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from fitness.errors import FitnessError
from fitness.scoring import score_examples, score_slice
from fitness.slices import EncodedBatch, EncodedSlice, SliceExample, load_task
from fitness.spec import TaskSpec, higher_is_better
from tests.checkpoints import tiny_tokenizer
from tests.test_slices import write_jsonl

PAIRS = [(a, b) for a in range(10) for b in range(10)]


def toy_answer(a: int, b: int) -> str:
    """``a`` (shifted) repeated ``b % 3 + 1`` times: where to stop is part of the answer."""
    return " ".join([f"w{20 + a}"] * (b % 3 + 1))


def toy_prompt(a: int, b: int) -> str:
    return f"w{a} w{b} ="


@dataclass(frozen=True)
class Trained:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerFast
    data_file: Path


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # the CI machine is shared: one thread is faster than fighting over two cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _new_model(arch: str, vocab: int) -> PreTrainedModel:
    torch.manual_seed(0)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=32,
            bos_token_id=1, eos_token_id=2, pad_token_id=0,
        ))
    return GPT2LMHeadModel(GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=vocab, n_positions=32,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ))


def _train(arch: str, steps: int, tmp: Path) -> Trained:
    """A few full-batch AdamW steps: about half the examples come out right."""
    tokenizer = tiny_tokenizer(("=",))
    model = _new_model(arch, len(tokenizer))
    sequences = [
        tokenizer(f"<bos> {toy_prompt(a, b)} {toy_answer(a, b)} <eos>", add_special_tokens=False)["input_ids"]
        for a, b in PAIRS
    ]
    length = max(map(len, sequences))
    input_ids = torch.zeros(len(sequences), length, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, seq in enumerate(sequences):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    labels = input_ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100  # learn answers only
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    rows = [{"prompt": toy_prompt(a, b), "answer": toy_answer(a, b)} for a, b in PAIRS]
    return Trained(model, tokenizer, write_jsonl(tmp / f"{arch}.jsonl", rows))


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    return _train("llama", 22, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    return _train("gpt2", 45, tmp_path_factory.mktemp("gpt2"))


def generate_exact(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, example: SliceExample) -> float:
    """1.0 when greedy ``generate`` reproduces the answer and then stops, decoded as text."""
    prompt = torch.tensor([example.prompt_ids])
    out = model.generate(
        input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
        max_new_tokens=len(example.answer_ids) + 1, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    continuation = out[0, prompt.shape[1]:].tolist()
    stopped = tokenizer.eos_token_id in continuation
    if stopped:
        continuation = continuation[: continuation.index(tokenizer.eos_token_id)]
    text = tokenizer.decode(continuation, skip_special_tokens=True)
    return float(stopped and text == example.answer)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_teacher_forced_exact_match_equals_generate_example_by_example(
    arch: str, request: pytest.FixtureRequest,
) -> None:
    trained: Trained = request.getfixturevalue(arch)
    data = load_task(TaskSpec("toy", trained.data_file, split_seed=3), trained.tokenizer, batch_size=16)
    for encoded in (data.search, data.heldout):
        fast = score_examples(trained.model, encoded)
        slow = [generate_exact(trained.model, trained.tokenizer, e) for e in encoded.examples]
        assert fast == slow
        assert 0 < sum(fast) < len(fast), "a half-trained model must get some right and some wrong"
        assert score_slice(trained.model, encoded) == pytest.approx(sum(fast) / len(fast))


def test_right_answer_without_stopping_is_wrong(llama: Trained) -> None:
    """The stop check matters: some answers are right token by token but do not end there."""
    data = load_task(TaskSpec("toy", llama.data_file), llama.tokenizer).search
    exact = score_examples(llama.model, data)
    loose = []
    with torch.inference_mode():
        for example in data.examples:
            ids = torch.tensor([[*example.prompt_ids, *example.answer_ids]])
            predicted = llama.model(input_ids=ids).logits[0, len(example.prompt_ids) - 1: -1].argmax(-1)
            loose.append(float(predicted.tolist() == list(example.answer_ids)))
    assert all(e <= loose_ok for e, loose_ok in zip(exact, loose, strict=True))
    assert sum(loose) > sum(exact)


def _direct_logprobs(model: PreTrainedModel, prompt: tuple[int, ...], continuation: tuple[int, ...]) -> list[float]:
    """Log-likelihood of each continuation token, one unpadded sequence at a time."""
    ids = torch.tensor([[*prompt, *continuation]])
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0].double()
    log_probs = torch.log_softmax(logits, dim=-1)
    start = len(prompt)
    return [float(log_probs[start - 1 + i, token]) for i, token in enumerate(continuation)]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_loglik_and_perplexity_match_a_direct_computation(arch: str, request: pytest.FixtureRequest) -> None:
    trained: Trained = request.getfixturevalue(arch)
    loglik = load_task(TaskSpec("toy", trained.data_file, metric="loglik"), trained.tokenizer, batch_size=8)
    perplexity = load_task(TaskSpec("toy", trained.data_file, metric="perplexity"), trained.tokenizer, batch_size=8)
    direct = [_direct_logprobs(trained.model, e.prompt_ids, e.answer_ids) for e in loglik.search.examples]
    expected_loglik = [sum(lp) / len(lp) for lp in direct]
    assert score_examples(trained.model, loglik.search) == pytest.approx(expected_loglik, abs=1e-5)
    assert score_examples(trained.model, perplexity.search) == pytest.approx(
        [math.exp(-v) for v in expected_loglik], rel=1e-5)
    assert score_slice(trained.model, loglik.search) == pytest.approx(
        sum(expected_loglik) / len(expected_loglik), abs=1e-5)
    corpus = math.exp(-sum(map(sum, direct)) / sum(map(len, direct)))
    assert score_slice(trained.model, perplexity.search) == pytest.approx(corpus, rel=1e-5)
    assert higher_is_better("loglik") and not higher_is_better("perplexity")


def _choice_rows() -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for a, b in PAIRS[::3]:
        # distinct options of other lengths, so summed and length-normalised scores differ
        options = [toy_answer(a, b), toy_answer(a, b + 1), toy_answer(a, b + 2), f"w{20 + (a + 1) % 10}"]
        label = (a + b) % len(options)
        options[0], options[label] = options[label], options[0]
        rows.append({"prompt": toy_prompt(a, b), "options": options, "gold": label})
    return rows


@pytest.mark.parametrize("metric", ["choice", "choice_norm"])
def test_choice_matches_a_direct_computation(metric: str, llama: Trained, tmp_path: Path) -> None:
    rows = _choice_rows()
    search = write_jsonl(tmp_path / "mc_search.jsonl", rows[: len(rows) // 2])
    heldout = write_jsonl(tmp_path / "mc_heldout.jsonl", rows[len(rows) // 2:])
    spec = TaskSpec("mc", search, heldout, metric=metric, choices_field="options", label_field="gold")
    data = load_task(spec, llama.tokenizer, batch_size=5)  # options of one example span batches
    for encoded in (data.search, data.heldout):
        expected = []
        for example in encoded.examples:
            option_scores = []
            for continuation in example.continuation_ids:
                logprobs = _direct_logprobs(llama.model, example.prompt_ids, continuation)
                option_scores.append(sum(logprobs) / (len(logprobs) if metric == "choice_norm" else 1))
            expected.append(float(option_scores.index(max(option_scores)) == example.label))
        assert score_examples(llama.model, encoded) == expected
        assert score_slice(llama.model, encoded) == pytest.approx(sum(expected) / len(expected))
        assert 0 < sum(expected) < len(expected)


def test_results_do_not_depend_on_batching_or_train_mode(gpt2: Trained) -> None:
    by_batch: dict[int, list[float]] = {}
    for batch_size in (1, 7, 64):
        data = load_task(TaskSpec("toy", gpt2.data_file, metric="loglik"), gpt2.tokenizer, batch_size=batch_size)
        by_batch[batch_size] = score_examples(gpt2.model, data.search)
    assert by_batch[7] == pytest.approx(by_batch[1], abs=1e-5)
    assert by_batch[64] == pytest.approx(by_batch[1], abs=1e-5)
    # GPT-2 has dropout: scoring must switch it off for the call and restore the mode
    exact = load_task(TaskSpec("toy", gpt2.data_file), gpt2.tokenizer).search
    reference = score_examples(gpt2.model, exact)
    gpt2.model.train()
    try:
        assert score_examples(gpt2.model, exact) == reference
        assert gpt2.model.training
    finally:
        gpt2.model.eval()



def test_dropout_left_on_under_a_model_in_eval_mode_is_off_while_scoring(gpt2: Trained) -> None:
    # scoring skips switching modes when nothing is in train mode; a submodule that is must still count
    loglik = load_task(TaskSpec("toy", gpt2.data_file, metric="loglik"), gpt2.tokenizer).search
    reference = score_examples(gpt2.model, loglik)
    dropouts = [m for m in gpt2.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and not gpt2.model.training
    for module in dropouts:
        module.train()
    try:
        assert score_examples(gpt2.model, loglik) == reference
    finally:
        gpt2.model.eval()

def _left_padded(batch: EncodedBatch) -> EncodedBatch:
    """The same rows with their padding moved to the front."""
    shifts = (batch.attention_mask == 0).sum(dim=1).tolist()

    def roll(t: torch.Tensor) -> torch.Tensor:
        return torch.stack([row.roll(shift) for row, shift in zip(t, shifts, strict=True)])

    mask = roll(batch.attention_mask)
    answer, stop = roll(batch.answer_mask), roll(batch.stop_mask)
    return replace(
        batch, input_ids=roll(batch.input_ids), attention_mask=mask,
        position_ids=(mask.cumsum(dim=1) - 1).clamp(min=0), target_ids=roll(batch.target_ids),
        answer_mask=answer, stop_mask=stop,
        scored_columns=torch.nonzero((answer | stop).any(dim=0)).flatten(),
    )


def test_left_padded_batches_score_the_same(gpt2: Trained) -> None:
    """GPT-2's absolute positions make wrong position ids visible."""
    for metric in ("exact_match", "loglik"):
        data = load_task(TaskSpec("toy", gpt2.data_file, metric=metric), gpt2.tokenizer, batch_size=9).search
        left = replace(data, batches=tuple(_left_padded(b) for b in data.batches))
        assert any(bool(b.attention_mask[:, 0].eq(0).any()) for b in left.batches)
        assert score_examples(gpt2.model, left) == pytest.approx(score_examples(gpt2.model, data), abs=1e-5)


def test_slice_moved_to_device_scores_the_same(llama: Trained) -> None:
    data = load_task(TaskSpec("toy", llama.data_file), llama.tokenizer).heldout
    moved: EncodedSlice = data.to("cpu")
    assert score_examples(llama.model, moved, device="cpu") == score_examples(llama.model, data)


# -- user scorers ----------------------------------------------------------------------

USER_MODULE = '''
import torch

def answer_lengths(model, batch, examples):
    return [float(len(e.answer_ids)) for e in examples]

def greedy_first_token(model, batch, examples):
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    first = batch.answer_mask.float().argmax(dim=1)
    rows = torch.arange(len(examples), device=logits.device)
    return (logits[rows, first].argmax(-1) == batch.target_ids[rows, first]).float()

def wrong_count(model, batch, examples):
    return [0.0]

def lower(model, batch, examples):
    return [1.0] * len(examples)
lower.higher_is_better = False

not_callable = 3
'''


@pytest.fixture()
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = f"fitness_user_scorers_{tmp_path.name}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_user_scorer_gets_batches_and_examples(llama: Trained, user_module: str) -> None:
    spec = TaskSpec("toy", llama.data_file, metric=f"{user_module}:answer_lengths")
    data = load_task(spec, llama.tokenizer, batch_size=6).search
    assert score_examples(llama.model, data) == [float(len(e.answer_ids)) for e in data.examples]
    assert higher_is_better(spec.metric)
    assert not higher_is_better(f"{user_module}:lower")
    # a user scorer that runs the model sees right-padded batches on the model's device
    first = load_task(TaskSpec("toy", llama.data_file, metric=f"{user_module}:greedy_first_token"),
                      llama.tokenizer, batch_size=6).search
    expected = []
    with torch.inference_mode():
        for example in first.examples:
            ids = torch.tensor([list(example.prompt_ids)])
            expected.append(float(int(llama.model(input_ids=ids).logits[0, -1].argmax()) == example.answer_ids[0]))
    assert score_examples(llama.model, first) == expected
    assert 0 < sum(expected) < len(expected)


def test_bad_user_scorers_are_named(llama: Trained, user_module: str) -> None:
    def slice_for(metric: str) -> EncodedSlice:
        return load_task(TaskSpec("toy", llama.data_file, metric=metric), llama.tokenizer).search

    with pytest.raises(FitnessError, match="cannot import module 'no_such_scorer_module'"):
        score_slice(llama.model, slice_for("no_such_scorer_module:f"))
    with pytest.raises(FitnessError, match=f"module '{user_module}' has no attribute 'missing'"):
        higher_is_better(f"{user_module}:missing")
    with pytest.raises(FitnessError, match="is not callable"):
        score_slice(llama.model, slice_for(f"{user_module}:not_callable"))
    with pytest.raises(FitnessError, match=r"task 'toy' \(search\): scorer .*wrong_count' returned 1 values"):
        score_slice(llama.model, slice_for(f"{user_module}:wrong_count"))


# -- the demo family (built once by studies.demo_family, cached) -------------------------


@pytest.mark.slow
def test_exact_match_equals_generate_on_the_demo_family(demo_family_root: Path) -> None:
    """Per example on the demo slices, with a task-arithmetic merge (some right, some wrong)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def load(name: str) -> PreTrainedModel:
        return AutoModelForCausalLM.from_pretrained(demo_family_root / name).eval()

    tasks = ("shipping", "refunds", "catalog")
    tokenizer = AutoTokenizer.from_pretrained(demo_family_root / "base")
    model = load("base")
    base = {key: tensor.clone() for key, tensor in model.state_dict().items()}
    specialists = [load(task).state_dict() for task in tasks]
    model.load_state_dict({key: base[key] + sum(s[key] - base[key] for s in specialists) for key in base})
    for task in tasks:
        folder = demo_family_root / "data" / task
        encoded = load_task(TaskSpec(task, folder / "search.jsonl", folder / "heldout.jsonl", limit=50),
                            tokenizer).heldout
        fast = score_examples(model, encoded)
        slow = [generate_exact(model, tokenizer, e) for e in encoded.examples]
        assert fast == slow, task
        assert 0 < sum(fast) < len(fast), task
