"""Training of the demo family's models: batches from a task mix, a plain AdamW loop.

Everything here is deterministic for a given seed on a given machine: the data stream
comes from a seeded ``random.Random``, the weights from ``torch.manual_seed``, and
training runs with a fixed number of torch threads.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from studies.demo_family.stop import raise_if_stopped
from studies.demo_family.tasks import Example, copy_example

TRAIN_THREADS = 1  # fixed: reductions depend on it; on a tiny model more threads mostly spin


@dataclass(frozen=True)
class ModelShape:
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 384
    max_positions: int = 32


def new_model(shape: ModelShape, tokenizer: PreTrainedTokenizerFast, *, seed: int) -> LlamaForCausalLM:
    """A randomly initialised Llama with untied embeddings, seeded."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=shape.max_positions,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


# -- data --------------------------------------------------------------------------

EncodedPair = tuple[list[int], list[int]]  # (<bos> prompt ids, answer ids <eos>)


class Encoder:
    """Word ids straight from the tokenizer's vocabulary (the same ids it produces)."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        self._vocab = tokenizer.get_vocab()
        self._bos = tokenizer.bos_token_id
        self._eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id

    def encode(self, example: Example) -> EncodedPair:
        prompt = [self._bos, *(self._vocab[w] for w in example.prompt.split())]
        answer = [*(self._vocab[w] for w in example.answer.split()), self._eos]
        return prompt, answer


@dataclass(frozen=True)
class Pool:
    """Examples of one kind for a mix; with ``noise`` > 0 an answer is swapped, with
    that probability, for the answer of another random example of the same pool."""

    pairs: tuple[EncodedPair, ...]
    noise: float = 0.0

    def draw(self, rng: random.Random) -> EncodedPair:
        prompt, answer = self.pairs[rng.randrange(len(self.pairs))]
        if self.noise and rng.random() < self.noise:
            answer = self.pairs[rng.randrange(len(self.pairs))][1]
        return prompt, answer


@dataclass(frozen=True)
class CopyPool:
    """Fresh ``copy w1 .. wk = w1 .. wk`` examples: general skill, not a task."""

    encoder: Encoder

    def draw(self, rng: random.Random) -> EncodedPair:
        return self.encoder.encode(copy_example(rng))


@dataclass(frozen=True)
class Mix:
    """Pools with their sampling weights."""

    parts: tuple[tuple[float, Pool | CopyPool], ...]


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [batch, length], right-padded
    loss_mask: torch.Tensor  # [batch, length - 1], true where the next token is an answer token


def draws(mix: Mix, *, seed: int) -> Iterator[EncodedPair]:
    """An endless, seeded stream of examples drawn from ``mix`` (what ``batches`` collates;
    ``studies.demo_family.test_rows`` replays it to know which examples training saw)."""
    rng = random.Random(seed)
    pools = [pool for _, pool in mix.parts]
    weights = [weight for weight, _ in mix.parts]
    while True:
        yield rng.choices(pools, weights)[0].draw(rng)


def batches(mix: Mix, *, batch_size: int, pad: int, seed: int) -> Iterator[Batch]:
    """An endless, seeded stream of batches drawn from ``mix``."""
    stream = draws(mix, seed=seed)
    while True:
        yield collate([next(stream) for _ in range(batch_size)], pad)


def collate(rows: Sequence[EncodedPair], pad: int) -> Batch:
    length = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length - 1), dtype=torch.bool)
    for row, (prompt, answer) in enumerate(rows):
        ids[row, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        # position t predicts token t + 1, so answer tokens are predicted from len(prompt) - 1 on
        mask[row, len(prompt) - 1 : len(prompt) + len(answer) - 1] = True
    return Batch(ids, mask)


# -- training ----------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    steps: int
    lr: float
    batch_size: int = 64
    warmup_fraction: float = 0.05
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.01

    def lr_at(self, step: int) -> float:
        warmup = max(1, int(self.steps * self.warmup_fraction))
        if step < warmup:
            return self.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, self.steps - warmup)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return self.lr * (self.final_lr_fraction + (1 - self.final_lr_fraction) * cosine)


def answer_loss(model: LlamaForCausalLM, batch: Batch) -> torch.Tensor:
    logits = model(input_ids=batch.input_ids).logits[:, :-1]
    targets = batch.input_ids[:, 1:]
    return torch.nn.functional.cross_entropy(logits[batch.loss_mask], targets[batch.loss_mask])


def train(
    model: LlamaForCausalLM,
    stream: Iterator[Batch],
    schedule: Schedule,
    *,
    bar: tqdm | None = None,
    label: str = "",
) -> list[float]:
    """Train in place for ``schedule.steps`` steps; returns the loss of every step."""
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=schedule.lr, betas=(0.9, 0.98), weight_decay=schedule.weight_decay
    )
    losses: list[float] = []
    model.train()
    with fixed_threads(TRAIN_THREADS):
        for step in range(schedule.steps):
            raise_if_stopped()
            for group in optimizer.param_groups:
                group["lr"] = schedule.lr_at(step)
            loss = answer_loss(model, next(stream))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(loss.item())
            if bar is not None:
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix_str(f"{label} loss {losses[-1]:.3f}")
    model.eval()
    return losses


@contextlib.contextmanager
def fixed_threads(threads: int) -> Iterator[None]:
    """Run a block with a fixed torch thread count, then restore the previous one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# -- evaluation (used by the build's sanity check and the tests) ---------------------


@torch.no_grad()
def exact_match(
    model: LlamaForCausalLM, pairs: Sequence[EncodedPair], *, pad: int, batch_size: int = 256
) -> float:
    """Teacher-forced greedy exact match: every answer token (and <eos>) is the argmax."""
    if not pairs:
        raise ValueError("exact_match needs at least one example")
    correct = 0
    for start in range(0, len(pairs), batch_size):
        batch = collate(pairs[start : start + batch_size], pad)
        predicted = model(input_ids=batch.input_ids).logits[:, :-1].argmax(-1)
        hit = (predicted == batch.input_ids[:, 1:]) | ~batch.loss_mask
        correct += int(hit.all(dim=1).sum())
    return correct / len(pairs)
