"""What the driver stores on a scored trial (search trial or baseline) beside its values.

The user attributes every reader relies on (status, export, report, dashboard: see
"What a trial stores" in docs/ARCHITECTURE.md): the recipe's one-line summary, the
scores, each gate's result by name (``search.gate_record``), the gates as one line, and feasibility.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fitness.gates import GateResult
from merges.recipe import Recipe
from search import gate_record


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
