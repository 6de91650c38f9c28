"""Ranking trials: feasible first, then by the raw objective; what blocks when none is feasible.

A trial is feasible when every value of its ``constraints`` system attribute is <= 0 (the
rule Optuna and optuna-dashboard apply). "Best" is never an infeasible trial. Rankings use
the objective a trial was told (studies stored before every trial was told its real
objective keep it in user attr ``objective_raw``; see :func:`raw_values`). With several
objectives (``objective = "per_task"``) trials are ordered by the mean of the
objectives, each signed so that larger is better.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from search.errors import SearchError
from search.gate_record import read_trial_gates

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

# Trial states are compared by name: these functions also rank the records of
# search.sqlite_trials (``search status`` without Optuna), whose states are not Optuna's enum.

KIND_SEARCH = "search"
KIND_BASELINE = "baseline"
DRIVER_STOPPED = "driver stopped while this trial ran"


def kind(trial: FrozenTrial) -> str:
    return str(trial.user_attrs.get("kind", KIND_SEARCH))


def is_scored(trial: FrozenTrial) -> bool:
    """Completed with the driver's scores: not a trial someone else told (a dashboard's tell
    of a running trial completes it without ``scores_search`` or gates; it is never ranked
    or picked as best)."""
    return trial.state.name == "COMPLETE" and "scores_search" in trial.user_attrs


def is_feasible(trial: FrozenTrial) -> bool:
    return trial.state.name == "COMPLETE" and all(v <= 0 for v in trial.constraints.values())


def total_violation(trial: FrozenTrial) -> float:
    return float(sum(v for v in trial.constraints.values() if v > 0))


def raw_values(trial: FrozenTrial) -> tuple[float, ...]:
    """The trial's objectives (told values; CMA-ES's penalty is never stored)."""
    raw = trial.user_attrs.get("objective_raw")  # older studies told CMA-ES penalised values
    if raw is not None:
        return tuple(float(v) for v in raw)
    return tuple(float(v) for v in (trial.values or ()))


def score(trial: FrozenTrial, directions: Sequence[str]) -> float:
    """One number, larger is better: the mean of the direction-signed raw objectives."""
    return signed_mean(raw_values(trial), directions)


def signed_mean(values: Sequence[float], directions: Sequence[str]) -> float:
    """The mean of ``values`` each signed by its direction (larger is better)."""
    signed = [v if d == "maximize" else -v for v, d in zip(values, directions, strict=True)]
    return sum(signed) / len(signed)


def search_trials(trials: Iterable[FrozenTrial]) -> list[FrozenTrial]:
    """Scored trials proposed by the sampler (baselines excluded)."""
    return [t for t in trials if is_scored(t) and kind(t) == KIND_SEARCH]


def baseline_trials(trials: Iterable[FrozenTrial]) -> dict[str, FrozenTrial]:
    """Stored baselines by name (``source:<label>``, ``uniform_linear``, ``default_<method>``)."""
    return {
        str(t.user_attrs["baseline"]): t
        for t in trials
        if kind(t) == KIND_BASELINE and t.state.name == "COMPLETE"
    }


def counts_toward_budget(trial: FrozenTrial) -> bool:
    """Finished search trials (a multi-fidelity trial stopped early is PRUNED); trials failed
    because the driver stopped are re-run instead."""
    if kind(trial) != KIND_SEARCH:
        return False
    if trial.state.name in ("COMPLETE", "PRUNED"):
        return True
    return trial.state.name == "FAIL" and trial.user_attrs.get("failure") != DRIVER_STOPPED


def ranked(trials: Iterable[FrozenTrial], directions: Sequence[str]) -> list[FrozenTrial]:
    """Scored trials, feasible ones first (best objective first), then the least violating."""
    done = [t for t in trials if is_scored(t)]
    feasible = sorted(
        (t for t in done if is_feasible(t)), key=lambda t: (-score(t, directions), t.number)
    )
    infeasible = sorted(
        (t for t in done if not is_feasible(t)),
        key=lambda t: (total_violation(t), -score(t, directions), t.number),
    )
    return feasible + infeasible


def top_feasible(trials: Iterable[FrozenTrial], directions: Sequence[str], k: int) -> list[FrozenTrial]:
    return [t for t in ranked(trials, directions) if is_feasible(t)][:k]


def best_feasible(trials: Iterable[FrozenTrial], directions: Sequence[str]) -> FrozenTrial | None:
    best = top_feasible(trials, directions, 1)
    return best[0] if best else None


FINAL_TRIAL_ATTR = "final_trial"  # study user attr set by finalize: a number, or None when none passed


def final_number(study_user_attrs: Mapping[str, object]) -> int | None:
    """The final trial's number, once finalize chose one."""
    final = study_user_attrs.get(FINAL_TRIAL_ATTR)
    return final if isinstance(final, int) and not isinstance(final, bool) else None


def chosen_trial(trials: Sequence[FrozenTrial], study_user_attrs: Mapping[str, object],
                 directions: Sequence[str]) -> FrozenTrial | None:
    """The study's chosen trial: the final one, else the best feasible search trial, else None.

    The one rule ``status``, ``export``, ``report``, the dashboard's Best Trial box and the
    chosen trial's note follow.
    """
    final = final_number(study_user_attrs)
    if final is None:
        return best_feasible(search_trials(trials), directions)
    for trial in trials:
        if trial.number == final:
            return trial
    raise SearchError(f"study attribute {FINAL_TRIAL_ATTR} = {final} is not a trial of the study")


@dataclass(frozen=True)
class Blocker:
    """Why no trial is feasible.

    ``trial`` is the closest trial (smallest total violation); ``gate`` its worst gate and
    ``shortfall`` by how much that gate fails there. ``best_margins`` is, per gate, the best
    margin any trial reached (negative: no trial ever passed that gate).
    """

    trial: int
    gate: str
    shortfall: float
    trial_shortfalls: dict[str, float]
    best_margins: dict[str, float]

    def describe(self) -> str:
        never = [g for g, m in self.best_margins.items() if m < 0]
        lines = [
            f"no feasible trial: closest is trial {self.trial}, which fails gate "
            f"{self.gate!r} by {self.shortfall:.4g}"
        ]
        others = {g: s for g, s in self.trial_shortfalls.items() if g != self.gate and s > 0}
        if others:
            lines.append(
                "  it also fails " + ", ".join(f"{g!r} by {s:.4g}" for g, s in others.items())
            )
        for gate in never:
            lines.append(
                f"  no trial passes gate {gate!r}: the best reached is {-self.best_margins[gate]:.4g} short"
            )
        return "\n".join(lines)


def what_blocks(trials: Iterable[FrozenTrial], gate_names: Sequence[str]) -> Blocker | None:
    """The blocking gate among completed search trials, or None if one is feasible or none ran."""
    done = search_trials(trials)
    if not done or any(is_feasible(t) for t in done) or not gate_names:
        return None
    closest = min(done, key=lambda t: (total_violation(t), t.number))
    shortfalls = _shortfalls(closest, gate_names)
    gate = max(shortfalls, key=lambda g: shortfalls[g])
    best_margins = {
        g: max(-_shortfalls(t, gate_names)[g] for t in done) for g in gate_names
    }
    return Blocker(closest.number, gate, shortfalls[gate], shortfalls, best_margins)


def _shortfalls(trial: FrozenTrial, gate_names: Sequence[str]) -> dict[str, float]:
    """Constraint value per gate (> 0: fails by that much): from the trial's gates by name
    (a resumed run may have changed the gates), else, on older trials, the stored list."""
    named = {g.name: -g.margin if g.margin else 0.0 for g in read_trial_gates(trial.user_attrs)}
    if named:
        return {g: named.get(g, 0.0) for g in gate_names}
    values = list(trial.constraints.values())
    return {g: float(values[i]) if i < len(values) else 0.0 for i, g in enumerate(gate_names)}
