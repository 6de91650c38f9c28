"""Metrics: the token-level arithmetic behind each (names and directions: :mod:`fitness.spec`).

Built-in metrics (all but ``generate`` computed from ONE teacher-forced forward pass per batch):

``exact_match`` (higher is better, the default)
    1 when greedy decoding would produce exactly the answer and then stop: at every
    answer position the argmax given the gold prefix is the gold token, and at the
    position after the answer the argmax is an end token. Slice score: the mean.
``choice`` (higher is better)
    Multiple choice: 1 when the right option has the largest *summed* log-likelihood
    (ties go to the first option, like ``argmax``). Slice score: the mean.
``choice_norm`` (higher is better)
    As ``choice`` but each option's log-likelihood is divided by its token count.
``loglik`` (higher is better)
    Mean per-token log-likelihood of the answer, per example; slice score: the mean
    over examples.
``perplexity`` (lower is better)
    Per example ``exp(-mean token log-likelihood)``; slice score: the corpus perplexity
    ``exp(-sum log-likelihood / sum tokens)`` (so it is not the mean of the per-example
    values).
``"package.module:function"`` (a user scorer)
    Called as ``function(model, batch, examples)`` inside ``torch.inference_mode()``
    with ``batch`` an :class:`fitness.slices.EncodedBatch` already on the model's device
    (one row per example, right-padded; ``answer_mask`` / ``stop_mask`` mark the answer
    and end-token predictions) and ``examples`` the matching
    :class:`fitness.slices.SliceExample` (text, token ids, file and row). It returns one
    float per row (a sequence or a 1-D tensor). Slice score: the mean. Higher is better
    unless the function has an attribute ``higher_is_better = False``.
    For a task with a ``generate`` table it is called as
    ``function(model, batch, examples, completions=texts)``, ``texts`` the generated text of
    each row (see :mod:`fitness.generation`).
``generate`` (higher is better)
    Not teacher-forced: greedy decoding, then a verdict of 1 or 0 per row
    (:mod:`fitness.extract`). Slice score: the mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fitness.errors import FitnessError
from fitness.spec import CHOICE_METRICS


@dataclass(frozen=True, eq=False)
class SequenceStats:
    """Per scored sequence (one per example, or one per option for ``choice``)."""

    logprob: torch.Tensor  # (sequences,) float64: summed log-likelihood of the answer tokens
    tokens: torch.Tensor  # (sequences,) int64: number of answer tokens
    greedy: torch.Tensor  # (sequences,) bool: argmax is gold at every answer and stop position


def batch_stats(logits: torch.Tensor, target_ids: torch.Tensor, answer_mask: torch.Tensor,
                stop_mask: torch.Tensor, stop_ids: torch.Tensor) -> SequenceStats:
    """Token statistics of one batch from logits aligned with ``target_ids``.

    ``logits`` is ``(rows, positions, vocab)``; the other tensors are ``(rows, positions)``
    (``stop_ids`` is a 1-D tensor of the token ids that end a greedy continuation).
    At answer positions the argmax must equal the gold token; at the stop position it
    must be one of ``stop_ids`` (what ``generate`` stops on).
    """
    logits = logits.float()
    predicted = logits.argmax(dim=-1)
    log_probs = torch.log_softmax(logits, dim=-1)
    gold = log_probs.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1)
    logprob = torch.where(answer_mask, gold, torch.zeros_like(gold)).double().sum(dim=1)
    answer_ok = (predicted == target_ids) | ~answer_mask
    stop_ok = torch.isin(predicted, stop_ids) | ~stop_mask
    greedy = (answer_ok & stop_ok).all(dim=1)
    return SequenceStats(logprob=logprob, tokens=answer_mask.sum(dim=1), greedy=greedy)


def example_scores(metric: str, stats: SequenceStats, sequence_example: torch.Tensor,
                   sequence_choice: torch.Tensor, labels: torch.Tensor, n_examples: int) -> torch.Tensor:
    """One score per example (float64) for a built-in metric."""
    if metric == "exact_match":
        return _per_example(stats.greedy.double(), sequence_example, n_examples)
    if metric in ("loglik", "perplexity"):
        mean_logprob = _per_example(stats.logprob / stats.tokens, sequence_example, n_examples)
        return mean_logprob if metric == "loglik" else torch.exp(-mean_logprob)
    if metric in CHOICE_METRICS:
        option_scores = stats.logprob if metric == "choice" else stats.logprob / stats.tokens
        n_options = int(sequence_choice.max().item()) + 1 if len(sequence_choice) else 0
        table = torch.full((n_examples, n_options), -math.inf, dtype=torch.float64)
        table[sequence_example, sequence_choice] = option_scores.double()
        return (table.argmax(dim=1) == labels).double()
    raise FitnessError(f"metric {metric!r} is not a built-in metric")


def slice_score(metric: str, per_example: torch.Tensor, stats: SequenceStats | None) -> float:
    """Aggregate per-example scores into the slice score (see the module docstring)."""
    if metric == "perplexity" and stats is not None:
        return math.exp(-float(stats.logprob.sum()) / float(stats.tokens.sum()))
    return float(per_example.double().mean())


def _per_example(values: torch.Tensor, sequence_example: torch.Tensor, n_examples: int) -> torch.Tensor:
    """Scatter one value per sequence into example order (one sequence per example)."""
    out = torch.empty(n_examples, dtype=torch.float64)
    out[sequence_example] = values.double()
    return out
