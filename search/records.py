"""What the driver stores on a scored trial (search trial or baseline) beside its values.

The user attributes every reader relies on (status, export, report, dashboard: see
"What a trial stores" in docs/ARCHITECTURE.md): the recipe's one-line summary, the
scores, each gate's result by name (``search.gate_record``), the gates as one line, and feasibility.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fitness.gates import GateResult
from merges.recipe import Recipe
from search import gate_record

HELDOUT_KEY_PREFIX = "heldout:"  # study user attr heldout:<trial number>, a HeldoutRecord (no Optuna here: status reads it)


def score_attrs(scores: Mapping[str, float], gates: Sequence[GateResult]) -> dict[str, object]:
    """A scored trial's user attributes: scores, gate margins and status, feasibility."""
    return {"scores_search": dict(scores), **gate_record.trial_gate_attrs(gates)}


def summarize_recipe(recipe: Recipe, labels: Sequence[str]) -> str:
    """One readable line: method, groups, per-source means of each per-source parameter."""
    parts = [recipe.method, f"{len(recipe.groups)} group(s)"]
    for name, table in recipe.tensor_params.items():
        cells = [cell for row in table for cell in row]
        means = [sum(c[i] for c in cells) / len(cells) for i in range(len(recipe.sources))]
        parts.append(f"{name} " + " ".join(f"{lab}={m:.2f}" for lab, m in zip(labels, means, strict=False)))
    for name, table in recipe.global_params.items():
        values = [v for row in table for v in row]
        if all(isinstance(v, bool) for v in values):
            parts.append(f"{name}={values[0]}")
        else:
            parts.append(f"{name}={sum(float(v) for v in values) / len(values):.2f}")
    if recipe.layer_slices:
        parts.append(" ".join(f"{s.model.rsplit('/', 1)[-1]}[{s.start}:{s.end}]" for s in recipe.layer_slices))
    return ", ".join(parts)


@dataclass(frozen=True)
class HeldoutRecord:
    """A trial's scores on the held-out split and its gates evaluated there."""

    scores: dict[str, float]
    gate_margins: dict[str, float]
    feasible: bool

    def to_json(self) -> dict[str, object]:
        return {
            "scores_heldout": dict(self.scores),
            "gate_margins_heldout": dict(self.gate_margins),
            "feasible_heldout": self.feasible,
        }


def heldout_record(study_user_attrs: Mapping[str, object], trial_number: int) -> HeldoutRecord | None:
    """The held-out record of a trial from the study's user attributes, if it was re-scored."""
    raw = study_user_attrs.get(f"{HELDOUT_KEY_PREFIX}{trial_number}")
    if not isinstance(raw, Mapping):
        return None
    return HeldoutRecord(
        scores={str(k): float(v) for k, v in raw["scores_heldout"].items()},
        gate_margins={str(k): float(v) for k, v in raw["gate_margins_heldout"].items()},
        feasible=bool(raw["feasible_heldout"]),
    )
