"""Fast scorers: one teacher-forced forward pass per pre-tokenised batch.

``score_slice`` and ``score_examples`` run the model on an :class:`EncodedSlice` under
``torch.inference_mode()`` on the model's device (or ``device``), with dropout off for
the call. Batches already on that device (``EncodedSlice.to``) are used as they are;
CPU batches are copied per batch. Only the logits at answer positions are projected
onto the vocabulary when the model's ``forward`` takes ``logits_to_keep``.

Generation tasks (``TaskSpec.generate``) decode instead (:mod:`fitness.generation`): the
metric ``generate`` is the mean verdict; a user scorer is called with the generated texts
too (``completions=``, see :mod:`fitness.metrics`). ``score_slice_details`` also returns
the per-example generated text; ``score_slice_rows`` returns the score, one value per row
(what the score is the mean of: 0/1 for ``exact_match``, ``choice`` and ``generate``, the
row's log-likelihood or perplexity, a user scorer's value) and those records.
For ``perplexity`` the score is the corpus perplexity, not the mean of the rows' values.

For ``exact_match`` the tokens that end a greedy continuation are the slice's end token
plus the model's ``generation_config.eos_token_id`` (one id or a list), which is what
``generate`` stops on.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel

from fitness.errors import FitnessError
from fitness.metrics import (
    SequenceStats,
    batch_stats,
    example_scores,
    slice_score,
)
from fitness.slices import EncodedBatch, EncodedSlice
from fitness.spec import is_user_metric, load_user_scorer

if TYPE_CHECKING:
    from fitness.generation import GeneratedAnswer

_TAKES_LOGITS_TO_KEEP: dict[type, bool] = {}


def score_slice(model: PreTrainedModel, data: EncodedSlice, *,
                device: torch.device | str | None = None) -> float:
    """The slice's score under its metric (see :mod:`fitness.metrics` for aggregation)."""
    return score_slice_details(model, data, device=device)[0]


def score_slice_details(model: PreTrainedModel, data: EncodedSlice, *,
                        device: torch.device | str | None = None) -> tuple[float, list[dict[str, object]] | None]:
    """The slice's score, and for a generation task one record per example (what it generated)."""
    score, _, records = score_slice_rows(model, data, device=device)
    return score, records


def score_slice_rows(model: PreTrainedModel, data: EncodedSlice, *, device: torch.device | str | None = None
                     ) -> tuple[float, tuple[float, ...], list[dict[str, object]] | None]:
    """The slice's score, one value per row in the slice's example (file) order, and for a
    generation task one record per example (what it generated)."""
    from fitness.generation import generation_records

    per_example, stats, answers = _score(model, data, device)
    records = None if answers is None else generation_records(data, answers)
    rows = tuple(float(value) for value in per_example.double().tolist())
    return slice_score(data.metric, per_example, stats), rows, records


def score_examples(model: PreTrainedModel, data: EncodedSlice, *,
                   device: torch.device | str | None = None) -> list[float]:
    """One score per example, in the slice's example (file) order."""
    per_example, _, _ = _score(model, data, device)
    return [float(value) for value in per_example]


def _score(model: PreTrainedModel, data: EncodedSlice, device: torch.device | str | None
           ) -> tuple[torch.Tensor, SequenceStats | None, list[GeneratedAnswer] | None]:
    where = f"task {data.task!r} ({data.split})"
    if data.n == 0:
        raise FitnessError(f"{where}: the slice has no examples")
    from fitness.generation import generate_slice  # imports this module's helpers

    target = torch.device(device) if device is not None else _model_device(model)
    with _eval_mode(model), torch.inference_mode():
        answers = None if data.generation is None else generate_slice(model, data, target)
        if is_user_metric(data.metric):
            completions = None if answers is None else [a.completion for a in answers]
            return _user_scores(model, data, target, where, completions), None, answers
        if answers is not None:  # metric "generate": the verdicts
            return torch.tensor([a.verdict for a in answers], dtype=torch.float64), None, answers
        stats = _sequence_stats(model, data, target)
    per_example = example_scores(data.metric, stats, data.sequence_example, data.sequence_choice,
                                 data.labels, data.n)
    return per_example, stats, None


def _sequence_stats(model: PreTrainedModel, data: EncodedSlice, device: torch.device) -> SequenceStats:
    n_sequences = len(data.sequence_example)
    logprob = torch.zeros(n_sequences, dtype=torch.float64)
    tokens = torch.zeros(n_sequences, dtype=torch.long)
    greedy = torch.zeros(n_sequences, dtype=torch.bool)
    stop_ids = torch.tensor(stop_token_ids(model, data.end_token_id), dtype=torch.long, device=device)
    slice_logits = _takes_logits_to_keep(model)
    for cpu_or_device_batch in data.batches:
        batch = cpu_or_device_batch.to(device)
        columns = batch.scored_columns
        logits = _forward(model, batch, columns if slice_logits else None)
        if not slice_logits:
            logits = logits[:, columns]
        stats = batch_stats(logits, batch.target_ids[:, columns], batch.answer_mask[:, columns],
                            batch.stop_mask[:, columns], stop_ids)
        index = cpu_or_device_batch.sequence_index.cpu()
        logprob[index] = stats.logprob.cpu()
        tokens[index] = stats.tokens.cpu()
        greedy[index] = stats.greedy.cpu()
    return SequenceStats(logprob=logprob, tokens=tokens, greedy=greedy)


def _user_scores(model: PreTrainedModel, data: EncodedSlice, device: torch.device, where: str,
                 completions: Sequence[str] | None) -> torch.Tensor:
    scorer = load_user_scorer(data.metric)
    scores = torch.empty(data.n, dtype=torch.float64)
    for cpu_or_device_batch in data.batches:
        batch = cpu_or_device_batch.to(device)
        rows = cpu_or_device_batch.example_index.cpu()
        examples = [data.examples[i] for i in rows.tolist()]
        try:
            # generation tasks: the generated texts too, by keyword (older scorers keep their signature)
            extra = {} if completions is None else {"completions": [completions[i] for i in rows.tolist()]}
            values = torch.as_tensor(scorer(model, batch, examples, **extra), dtype=torch.float64).cpu().flatten()
        except FitnessError:
            raise
        except (TypeError, ValueError, RuntimeError) as exc:
            raise FitnessError(f"{where}: scorer {data.metric!r} failed or returned non-numbers: {exc}") from exc
        if len(values) != len(examples):
            raise FitnessError(
                f"{where}: scorer {data.metric!r} returned {len(values)} values for a batch of {len(examples)} examples"
            )
        scores[rows] = values
    return scores


def _forward(model: PreTrainedModel, batch: EncodedBatch, columns: torch.Tensor | None) -> torch.Tensor:
    kwargs: dict[str, torch.Tensor] = {}
    if columns is not None:
        kwargs["logits_to_keep"] = columns
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=batch.position_ids, use_cache=False, **kwargs)
    return out.logits


def stop_token_ids(model: PreTrainedModel, end_token_id: int | None) -> list[int]:
    """``end_token_id`` (the tokenizer's eos, if any) plus the model's
    ``generation_config.eos_token_id``: the tokens that end an answer (what generate stops on)."""
    ids: list[int] = [] if end_token_id is None else [int(end_token_id)]
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(eos, int):
        ids.append(eos)
    elif isinstance(eos, Sequence):
        ids.extend(int(token) for token in eos)
    return sorted(set(ids))


def _takes_logits_to_keep(model: PreTrainedModel) -> bool:
    cls = type(model)
    if cls not in _TAKES_LOGITS_TO_KEEP:
        _TAKES_LOGITS_TO_KEEP[cls] = "logits_to_keep" in inspect.signature(cls.forward).parameters
    return _TAKES_LOGITS_TO_KEEP[cls]


def _model_device(model: PreTrainedModel) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@contextmanager
def _eval_mode(model: PreTrainedModel) -> Iterator[None]:
    if not any(module.training for module in model.modules()):
        # already in eval mode throughout (a trial worker's model): eval() and train(False) would
        # each walk and set every module (~0.5 ms a call on the demo's model, several calls per stage)
        yield
        return
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
