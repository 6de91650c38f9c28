"""Release gates: hard per-task limits a merged model must meet to ship.

A :class:`GateSpec` sets ``min`` (an absolute limit), ``max_regression`` (an allowed
drop below a reference source), or both; each set limit is one gate, named
``"<task>.min"`` / ``"<task>.max_regression"``, and yields one :class:`GateResult`.

Both kinds follow the task metric's direction. For a higher-is-better metric the
limit is a floor (``min``: score >= min; ``max_regression``: score >= reference -
max_regression); for a lower-is-better metric (perplexity) it is a ceiling (``min`` is
the worst acceptable value: score <= min; score <= reference + max_regression). The
reference is the named source's score on the task, or with ``against = "best"`` the
best source's score (highest, or lowest for lower-is-better).

:func:`gate_limits` resolves each gate to its limit (a :class:`GateLimit`: what the study
stores once, ``search.gate_record``); :func:`evaluate_gates` checks scores against them.
``margin`` is how far the score is on the passing side of the limit, in score units;
``constraint = -margin`` (Optuna's convention: <= 0 is feasible). A score exactly at
the limit passes with margin 0; differences within float rounding (1e-12, relative)
count as exactly at the limit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fitness.errors import FitnessError

BEST = "best"
_ROUNDING = 1e-12


@dataclass(frozen=True)
class GateSpec:
    task: str
    min: float | None = None  # absolute minimum score on the task
    max_regression: float | None = None  # allowed drop below the reference source's score
    against: str = BEST  # "best" (best source on that task) or a source label

    def __post_init__(self) -> None:
        where = f"gate on task {self.task!r}"
        if self.min is None and self.max_regression is None:
            raise FitnessError(f"{where}: set min, max_regression, or both")
        if self.min is not None and not math.isfinite(self.min):
            raise FitnessError(f"{where}: min must be a finite number, got {self.min}")
        if self.max_regression is not None and not (
            math.isfinite(self.max_regression) and self.max_regression >= 0
        ):
            raise FitnessError(f"{where}: max_regression must be a finite number >= 0, got {self.max_regression}")
        if not self.against:
            raise FitnessError(f"{where}: against must be 'best' or a source label, got an empty string")


KIND_MIN = "min"
KIND_MAX_REGRESSION = "max_regression"


@dataclass(frozen=True)
class GateLimit:
    """One gate resolved against the sources' scores: the limit a score is checked against."""

    name: str  # "<task>.<kind>"
    task: str
    kind: str  # KIND_MIN or KIND_MAX_REGRESSION
    setting: float  # the configured number: min, or max_regression
    limit: float  # the score a candidate must reach (floor) or not exceed (ceiling)
    higher_is_better: bool  # True: the limit is a floor; False: a ceiling
    reference: str | None = None  # max_regression: the source label the limit is measured from
    reference_score: float | None = None  # that source's score on the task


@dataclass(frozen=True)
class GateResult:
    name: str  # e.g. "shipping.min", "refunds.max_regression"
    constraint: float  # <= 0 passes (Optuna's convention)
    margin: float  # positive = passed by that much, in score units (direction-aware)
    passed: bool
    score: float | None = None  # the candidate's score on the gate's task
    limit: float | None = None  # the limit it was checked against (GateLimit.limit)
    higher_is_better: bool = True


def gate_names(gates: Sequence[GateSpec]) -> list[str]:
    """Gate names in constraint order: per spec, ``min`` then ``max_regression``."""
    names: list[str] = []
    for gate in gates:
        if gate.min is not None:
            names.append(f"{gate.task}.min")
        if gate.max_regression is not None:
            names.append(f"{gate.task}.max_regression")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise FitnessError(f"gate {name!r} is defined twice")
        seen.add(name)
    return names


def gate_limits(gates: Sequence[GateSpec], source_scores: Mapping[str, Mapping[str, float]],
                directions: Mapping[str, bool]) -> list[GateLimit]:
    """Each gate's limit, in :func:`gate_names` order.

    ``source_scores``: source label -> task -> score (the references of ``max_regression``);
    ``directions``: task -> higher_is_better.
    """
    names = iter(gate_names(gates))
    limits: list[GateLimit] = []
    for gate in gates:
        higher = _direction(gate, directions)
        if gate.min is not None:
            limits.append(GateLimit(next(names), gate.task, KIND_MIN, gate.min, gate.min, higher))
        if gate.max_regression is not None:
            label, reference = _reference(gate, source_scores, higher)
            limit = reference - gate.max_regression if higher else reference + gate.max_regression
            limits.append(GateLimit(next(names), gate.task, KIND_MAX_REGRESSION, gate.max_regression, limit,
                                    higher, reference=label, reference_score=reference))
    return limits


def evaluate_gates(gates: Sequence[GateSpec], scores: Mapping[str, float],
                   source_scores: Mapping[str, Mapping[str, float]],
                   directions: Mapping[str, bool]) -> list[GateResult]:
    """One result per gate, in :func:`gate_names` order.

    ``scores``: task -> the candidate's score; ``source_scores``: source label -> task ->
    score; ``directions``: task -> higher_is_better.
    """
    return check_gates(gate_limits(gates, source_scores, directions), scores)


def check_gates(limits: Sequence[GateLimit], scores: Mapping[str, float]) -> list[GateResult]:
    """One result per resolved gate: ``scores`` (task -> the candidate's score) against its limit."""
    return [_result(limit, _score(limit.task, scores)) for limit in limits]


def _result(gate: GateLimit, score: float) -> GateResult:
    limit, higher = gate.limit, gate.higher_is_better
    margin = score - limit if higher else limit - score
    if abs(margin) <= _ROUNDING * max(1.0, abs(limit)):
        margin = 0.0
    return GateResult(name=gate.name, constraint=-margin if margin else 0.0, margin=margin, passed=margin >= 0,
                      score=score, limit=limit, higher_is_better=higher)


def _direction(gate: GateSpec, directions: Mapping[str, bool]) -> bool:
    if gate.task not in directions:
        raise FitnessError(f"gate on task {gate.task!r}: no such task (tasks: {', '.join(directions)})")
    return directions[gate.task]


def _score(task: str, scores: Mapping[str, float]) -> float:
    if task not in scores:
        raise FitnessError(f"gate on task {task!r}: the candidate has no score for the task")
    score = float(scores[task])
    if math.isnan(score):
        raise FitnessError(f"gate on task {task!r}: the candidate's score is NaN")
    return score


def _reference(gate: GateSpec, source_scores: Mapping[str, Mapping[str, float]],
               higher: bool) -> tuple[str, float]:
    """The reference source's label and score (with ``against = "best"``: the best source's)."""
    where = f"gate {gate.task}.max_regression"
    if gate.against == BEST:
        if not source_scores:
            raise FitnessError(f"{where}: against 'best' needs source scores, got none")
        labels = list(source_scores)
    elif gate.against in source_scores:
        labels = [gate.against]
    else:
        raise FitnessError(
            f"{where}: against source {gate.against!r} has no scores (sources: {', '.join(source_scores) or 'none'})"
        )
    values: dict[str, float] = {}
    for label in labels:
        if gate.task not in source_scores[label]:
            raise FitnessError(f"{where}: source {label!r} has no score for task {gate.task!r}")
        value = float(source_scores[label][gate.task])
        if math.isnan(value):
            raise FitnessError(f"{where}: source {label!r} scored NaN on task {gate.task!r}")
        values[label] = value
    best = (max if higher else min)(values, key=lambda label: values[label])  # ties: the first source
    return best, values[best]
