"""Paired bootstrap intervals over rows (numpy only, no torch).

Every trial of a study is scored on the same rows, so two trials are compared *paired*:
each bootstrap resample draws rows (with replacement, per task) and both trials' means
are taken over the same drawn rows. Row-to-row difficulty then cancels out of the
difference, which makes its interval much narrower than two separate intervals suggest.

Intervals are percentile intervals of ``resamples`` seeded resamples (the same seed, rows
and scores give the same interval on every machine). One row says nothing about noise:
its interval is unbounded. Rows that all score the same give a zero-width interval (the
bootstrap cannot see noise it was not shown).

The preference rule (finalists, contenders): trial A is preferred over trial B only when
the 95% interval of A - B (on the objective, in the better direction) excludes 0;
otherwise the two are a tie and the caller keeps its own order (e.g. search rank).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from fitness.errors import FitnessError

CONFIDENCE = 0.95
RESAMPLES = 2000
OBJECTIVES: tuple[str, ...] = ("mean", "min")
_CELLS_PER_BLOCK = 1 << 21  # resampled (row, trial) cells per block: bounds the memory of a draw

TaskRows = Mapping[str, ArrayLike]  # task -> one score per row, rows in the study's order


@dataclass(frozen=True)
class Interval:
    """A point estimate and its ``confidence`` interval ``[low, high]``."""

    estimate: float
    low: float
    high: float
    confidence: float

    def excludes(self, value: float = 0.0) -> bool:
        return value < self.low or value > self.high

    def __str__(self) -> str:
        return f"{self.estimate:.4f} [{self.low:.4f}, {self.high:.4f}]"


def mean_interval(rows: ArrayLike, *, confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                  seed: int = 0) -> Interval:
    """The interval of a trial's mean score over ``rows`` (one task)."""
    return objective_interval({"": rows}, objective="mean", confidence=confidence, resamples=resamples, seed=seed)


def difference_interval(a: ArrayLike, b: ArrayLike, *, confidence: float = CONFIDENCE,
                        resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """The interval of ``mean(a) - mean(b)``, two trials scored on the same rows (one task)."""
    return objective_difference_interval({"": a}, {"": b}, objective="mean", confidence=confidence,
                                         resamples=resamples, seed=seed)


def objective_interval(rows: TaskRows, *, objective: str, weights: Mapping[str, float] | None = None,
                       higher_is_better: bool = True, confidence: float = CONFIDENCE,
                       resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """The interval of one trial's study objective (weighted mean or min over its tasks)."""
    means, samples = resampled_task_means([rows], resamples=resamples, seed=seed)
    value = aggregate(means, objective, weights, higher_is_better)[..., 0]
    return _interval(float(value), aggregate(samples, objective, weights, higher_is_better)[:, 0],
                     confidence, _too_few_rows(samples))


def objective_difference_interval(a: TaskRows, b: TaskRows, *, objective: str,
                                  weights: Mapping[str, float] | None = None, higher_is_better: bool = True,
                                  confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                                  seed: int = 0) -> Interval:
    """The interval of ``objective(a) - objective(b)``, paired over each task's rows.

    ``objective``: ``"mean"`` (weighted by ``weights``, default equal) or ``"min"`` (the
    weakest task: the lowest mean when ``higher_is_better``, else the highest).
    """
    means, samples = resampled_task_means([a, b], resamples=resamples, seed=seed)
    value = aggregate(means, objective, weights, higher_is_better)
    draws = aggregate(samples, objective, weights, higher_is_better)
    return _interval(float(value[0] - value[1]), draws[:, 0] - draws[:, 1], confidence, _too_few_rows(samples))


def prefer(difference: Interval, *, higher_is_better: bool = True) -> bool:
    """Whether A is preferred over B, given the interval of A - B: only when it excludes 0
    on A's better side (more than noise); otherwise it is a tie."""
    return difference.low > 0 if higher_is_better else difference.high < 0


def resampled_task_means(trials: Sequence[TaskRows], *, resamples: int = RESAMPLES,
                         seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Each task's mean per trial, and its ``resamples`` bootstrap draws, paired.

    Every trial must have the same tasks and, per task, the same number of rows (the
    same rows in the same order). Returns ``(means, draws)``: task -> ``(trials,)`` and
    task -> ``(resamples, trials)``; each task's rows are drawn independently (tasks are
    separate data), the same draw for every trial. Tasks with one row get NaN draws.
    """
    if not trials:
        raise FitnessError("bootstrap: no trials")
    if resamples < 1:
        raise FitnessError(f"bootstrap: resamples must be >= 1, got {resamples}")
    tasks = list(trials[0])
    if not tasks:
        raise FitnessError("bootstrap: no tasks")
    rng = np.random.default_rng(seed)
    means: dict[str, np.ndarray] = {}
    draws: dict[str, np.ndarray] = {}
    for task in tasks:
        columns = _columns(trials, task)
        means[task] = columns.mean(axis=0)
        draws[task] = _draw_means(columns, resamples, rng)
    return means, draws


def _columns(trials: Sequence[TaskRows], task: str) -> np.ndarray:
    """The trials' rows of ``task`` as a ``(rows, trials)`` float array, checked."""
    arrays = []
    for number, trial in enumerate(trials):
        if task not in trial or set(trial) != set(trials[0]):
            raise FitnessError(f"bootstrap: trial {number} has tasks {sorted(trial)}, expected {sorted(trials[0])}")
        array = np.asarray(trial[task], dtype=np.float64)
        if array.ndim != 1 or array.size == 0:
            raise FitnessError(f"bootstrap: task {task!r}: trial {number} needs a non-empty list of row scores")
        bad = np.flatnonzero(~np.isfinite(array))
        if bad.size:
            raise FitnessError(f"bootstrap: task {task!r}: trial {number}: row {int(bad[0])} is {array[bad[0]]}")
        arrays.append(array)
    if len({array.size for array in arrays}) > 1:
        raise FitnessError(f"bootstrap: task {task!r}: trials have {[a.size for a in arrays]} rows; "
                           "a paired comparison needs the same rows")
    return np.stack(arrays, axis=1)


def _draw_means(columns: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    rows, width = columns.shape
    if rows == 1:
        rng.integers(0, 1, size=resamples)  # keep the stream's position independent of this case
        return np.full((resamples, width), np.nan)
    block = max(1, _CELLS_PER_BLOCK // (rows * width))
    parts = []
    for start in range(0, resamples, block):
        picks = rng.integers(0, rows, size=(min(block, resamples - start), rows))
        parts.append(_picked_means(columns, picks))
    return np.concatenate(parts, axis=0)


def _picked_means(columns: np.ndarray, picks: np.ndarray) -> np.ndarray:
    """``columns[picks].mean(axis=1)`` (``(draws, trials)``: each draw's mean per trial), bit for bit.

    One trial: that expression itself (numpy sums each draw's contiguous rows pairwise). Several:
    numpy sums ``columns[picks]``'s strided row axis one row after another, in row order, with an
    inner loop as short as the trials; ``np.take`` along the rows, drawn row first, then reduced
    over that leading axis adds the same rows in the same order with one long inner loop
    (5-10x faster at 2 trials; ``tests/test_intervals.py`` holds the two equal bit for bit).
    """
    rows, width = columns.shape
    if width == 1:
        return columns[picks].mean(axis=1)
    return np.add.reduce(np.take(columns, picks.T, axis=0), axis=0) / rows


def aggregate(task_means: Mapping[str, np.ndarray], objective: str, weights: Mapping[str, float] | None,
              higher_is_better: bool) -> np.ndarray:
    """The study objective (``mean`` / ``min``) over tasks, elementwise over the arrays'
    shape (``(trials,)`` means or ``(resamples, trials)`` draws)."""
    stacked = np.stack([task_means[task] for task in task_means], axis=0)
    if objective == "min":
        return stacked.min(axis=0) if higher_is_better else stacked.max(axis=0)
    if objective != "mean":
        raise FitnessError(f"bootstrap: unknown objective {objective!r} (expected one of {', '.join(OBJECTIVES)})")
    if weights is None:
        return stacked.mean(axis=0)
    missing = [task for task in task_means if task not in weights]
    if missing:
        raise FitnessError(f"bootstrap: no weight for task {missing[0]!r}")
    w = np.array([float(weights[task]) for task in task_means])
    if not (np.all(np.isfinite(w)) and np.all(w > 0)):
        raise FitnessError(f"bootstrap: weights must be finite and > 0, got {dict(weights)}")
    return np.tensordot(w / w.sum(), stacked, axes=1)


def _too_few_rows(draws: Mapping[str, np.ndarray]) -> bool:
    return any(np.isnan(d).any() for d in draws.values())


def _interval(estimate: float, draws: np.ndarray, confidence: float, unbounded: bool) -> Interval:
    if not 0.0 < confidence < 1.0:
        raise FitnessError(f"bootstrap: confidence must be in (0, 1), got {confidence}")
    if unbounded:
        return Interval(estimate, -math.inf, math.inf, confidence)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(draws, [tail, 1.0 - tail])
    # the estimate lies inside even when every draw lands on one side (few distinct rows)
    return Interval(estimate, min(float(low), estimate), max(float(high), estimate), confidence)
