"""How gates are stored: once on the study as data, and by name on every scored trial.

Study user attr ``gates`` (written by :func:`store_study_gates` once the sources' scores,
the references, are known): one JSON object per gate, in constraint order::

    {"name": "refunds.max_regression", "task": "refunds", "kind": "max_regression",
     "setting": 0.05, "limit": 0.45, "higher_is_better": true,
     "reference": "refunds", "reference_score": 0.50}

``setting`` is the configured number (``min`` or ``max_regression``); ``limit`` is the
score a candidate must reach (``higher_is_better``: a floor) or not exceed (a ceiling);
``reference``/``reference_score`` are the source a ``max_regression`` limit is measured
from and its score (null for ``min``). Studies from before this record stored only the gate
names there (a list of strings): :func:`read_study_gates` says so instead of a limit.

Trial user attrs (built by :func:`trial_gate_attrs`):

* ``gates``: ``{name: {"score", "limit", "margin", "passed"}}``, the limit the trial was
  checked against (a later run may change a gate: each trial keeps its own);
  ``margin`` is how far it passed (negative: failed by that much), in score units;
* ``gate_status``: the same as one line the dashboard shows as is
  (``infeasible: refunds.max_regression fails by 0.04 (0.4100 < 0.4500)``);
* ``feasible``: every gate passed.

Older trials stored ``gate_margins`` (``{name: margin}``) instead of ``gates``;
:func:`read_trial_gates` reads both. Optuna's own ``constraints`` system attr (one value per
gate, ``-margin``, <= 0 feasible) is what samplers and the dashboard's colours read;
:func:`constraints` builds it, the driver writes it.

No torch here: ``search status`` and ``export`` read this.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fitness.gates import GateLimit, GateResult

if TYPE_CHECKING:
    import optuna

STUDY_ATTR = "gates"
TRIAL_ATTR = "gates"
TRIAL_ATTR_BEFORE = "gate_margins"  # trials stored before named gate records: {name: margin}
STATUS_ATTR = "gate_status"
FEASIBLE_ATTR = "feasible"
NOT_STORED = "limits not stored (study from an older version)"
TRIAL_NOT_STORED = "limits not stored (a trial from an older version)"
NOT_YET = "limits not stored yet (the sources' scores, the references, come first)"


@dataclass(frozen=True)
class StudyGates:
    """The study's gates as stored: names always; limits unless the study predates them."""

    names: list[str]
    limits: list[GateLimit] | None  # None: not stored (see ``missing``)
    missing: str = ""  # why there are no limits (NOT_STORED or NOT_YET)

    def limit(self, name: str) -> GateLimit | None:
        return next((g for g in self.limits or () if g.name == name), None)


@dataclass(frozen=True)
class TrialGate:
    """One gate as a trial stored it; ``score``/``limit`` are None on older trials."""

    name: str
    margin: float
    passed: bool
    score: float | None = None
    limit: float | None = None


# -- writers ------------------------------------------------------------------------------


def store_study_gates(study: optuna.Study, limits: Sequence[GateLimit]) -> None:
    """Store the study's gates (only when they changed: resuming writes nothing)."""
    value = [
        {
            "name": g.name, "task": g.task, "kind": g.kind, "setting": g.setting, "limit": g.limit,
            "higher_is_better": g.higher_is_better, "reference": g.reference, "reference_score": g.reference_score,
        }
        for g in limits
    ]
    if study.user_attrs.get(STUDY_ATTR) != value:
        study.set_user_attr(STUDY_ATTR, value)


def trial_gate_attrs(results: Sequence[GateResult]) -> dict[str, object]:
    """A scored trial's gate user attrs: ``gates`` (named records), ``gate_status``, ``feasible``."""
    return {
        TRIAL_ATTR: {
            r.name: {"score": r.score, "limit": r.limit, "margin": r.margin, "passed": r.passed} for r in results
        },
        STATUS_ATTR: gate_status(results),
        FEASIBLE_ATTR: all(r.passed for r in results),
    }


def constraints(results: Sequence[GateResult]) -> list[float]:
    """Optuna's ``constraints`` system attr: one value per gate, in gate order, <= 0 passes."""
    return [r.constraint for r in results]


def gate_status(gates: Sequence[GateResult | TrialGate]) -> str:
    """One line: ``infeasible: code.min fails by 0.031 (0.4190 < 0.4500); chat.max_regression passes by ...``.

    Failed gates first (then in gate order), each with how far it is from its limit in
    score units and, when known, the score against the limit.
    """
    if not gates:
        return "feasible: the study has no gates"
    ordered = sorted(gates, key=lambda g: g.passed)  # stable: failed gates first, in gate order
    verdict = "feasible" if all(g.passed for g in gates) else "infeasible"
    return f"{verdict}: " + "; ".join(describe(g) for g in ordered)


def describe(gate: GateResult | TrialGate) -> str:
    """``refunds.min fails by 0.04 (0.4100 < 0.4500)``; without a stored limit, the margin alone."""
    text = f"{gate.name} {'passes' if gate.passed else 'fails'} by {abs(gate.margin):.4g}"
    against = comparison(gate)
    return f"{text} ({against})" if against else text


def comparison(gate: GateResult | TrialGate) -> str:
    """``0.4100 < 0.4500``: the score against the limit ("" when the trial predates stored limits)."""
    if gate.score is None or gate.limit is None:
        return ""
    return f"{gate.score:.4f} {_relation(gate)} {gate.limit:.4f}"


def _relation(gate: GateResult | TrialGate) -> str:
    if gate.margin == 0:
        return "="
    if isinstance(gate, GateResult):
        higher = gate.higher_is_better
    else:  # a stored record: the direction is where the score lies from the limit, and the verdict
        higher = ((gate.score or 0.0) > (gate.limit or 0.0)) == gate.passed
    if gate.passed:
        return ">=" if higher else "<="
    return "<" if higher else ">"


# -- readers ------------------------------------------------------------------------------


def read_study_gates(user_attrs: Mapping[str, object]) -> StudyGates:
    """The study's gates from its user attrs (any version)."""
    raw = user_attrs.get(STUDY_ATTR)
    if raw is None:
        return StudyGates([], None, NOT_YET)
    if not isinstance(raw, list):
        return StudyGates([], None, NOT_STORED)
    if raw and all(isinstance(g, str) for g in raw):  # an older study: the names alone
        return StudyGates([str(g) for g in raw], None, NOT_STORED)
    limits = [
        GateLimit(
            name=str(g["name"]), task=str(g["task"]), kind=str(g["kind"]), setting=float(g["setting"]),
            limit=float(g["limit"]), higher_is_better=bool(g["higher_is_better"]),
            reference=None if g.get("reference") is None else str(g["reference"]),
            reference_score=None if g.get("reference_score") is None else float(g["reference_score"]),
        )
        for g in raw
    ]
    return StudyGates([g.name for g in limits], limits)


def read_trial_gates(user_attrs: Mapping[str, object]) -> list[TrialGate]:
    """A trial's gates in gate order (``[]``: not scored, or the study has no gates)."""
    raw = user_attrs.get(TRIAL_ATTR)
    if isinstance(raw, Mapping):
        return [
            TrialGate(str(name), float(g["margin"]), bool(g["passed"]), _number(g.get("score")),
                      _number(g.get("limit")))
            for name, g in raw.items()
        ]
    margins = user_attrs.get(TRIAL_ATTR_BEFORE)
    if isinstance(margins, Mapping):
        return [TrialGate(str(name), float(m), float(m) >= 0) for name, m in margins.items()]
    return []


def describe_limit(gate: GateLimit) -> str:
    """``refunds.max_regression: score >= 0.4500 (source refunds 0.5000 - 0.05)``."""
    sign = ">=" if gate.higher_is_better else "<="
    text = f"{gate.name}: score {sign} {gate.limit:.4f}"
    if gate.reference is not None and gate.reference_score is not None:
        step = "-" if gate.higher_is_better else "+"
        text += f" (source {gate.reference} {gate.reference_score:.4f} {step} {gate.setting:g})"
    return text


def _number(value: object) -> float | None:
    if value is None:
        return None
    number = float(value)  # type: ignore[arg-type]  # JSON numbers
    return None if math.isnan(number) else number
