"""Baseline recipes every study scores first: each source alone, the uniform average, and
the study's method with untuned defaults.

The source-alone scores are the references of ``max_regression`` gates; all baselines
appear next to the search trials in status, report and dashboard. A source alone is a
linear merge with weight 1 on that source and 0 elsewhere (with ``normalize`` the
divisor is 1, so the result is the source's tensors exactly).

``run_baselines`` scores the ones a study has not stored yet and stores them as finished
trials (``kind = "baseline"``); ``source_references`` reads the sources' scores back for
the gates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import optuna
from optuna.trial import FrozenTrial, TrialState

from fitness.gates import evaluate_gates
from fitness.objective import objective_values
from genome.spec import GenomeSpec
from merges.methods.registry import EQUAL, METHODS, REQUIRED
from merges.recipe import Recipe
from search import gate_record, ranking
from search.annotate import attach_baseline_recipe
from search.errors import SearchError
from search.records import ROWS_SEARCH_ATTR, rows_attr, score_attrs, store_row_ids, summarize_recipe
from search.samplers import PENALTY_ATTR, penalty_for_baselines

if TYPE_CHECKING:  # the running part needs them; what baselines a study has stays light (no torch)
    from search.plan import StudyPlan
    from search.pool import WorkerPool
    from search.progress import Progress
    from search.worker import TrialOutcome

SOURCE_PREFIX = "source:"
UNIFORM = "uniform_linear"


@dataclass(frozen=True)
class Baseline:
    name: str
    recipe: Recipe


def source_baseline_name(label: str) -> str:
    return f"{SOURCE_PREFIX}{label}"


def baseline_recipes(
    spec: GenomeSpec,
    *,
    base: str,
    sources: Sequence[str],
    labels: Sequence[str],
    n_layers: int,
    seed: int,
) -> list[Baseline]:
    """The baselines of a study, in the order they are stored."""
    n = len(sources)
    out = [
        Baseline(
            source_baseline_name(label),
            Recipe.uniform(
                "linear", base, sources, n_layers,
                tensor_params={"weight": [1.0 if j == i else 0.0 for j in range(n)]},
                global_params={"normalize": True}, seed=seed,
            ),
        )
        for i, label in enumerate(labels)
    ]
    out.append(
        Baseline(
            UNIFORM,
            Recipe.uniform(
                "linear", base, sources, n_layers,
                tensor_params={"weight": [1.0 / n] * n}, global_params={"normalize": True},
                seed=seed,
            ),
        )
    )
    if spec.method != "linear" and not METHODS[spec.method].uses_layer_slices:  # linear: = uniform
        out.append(Baseline(f"default_{spec.method}", default_recipe(spec, base, sources, n_layers, seed)))
    return out


def default_recipe(
    spec: GenomeSpec, base: str, sources: Sequence[str], n_layers: int, seed: int
) -> Recipe:
    """The study's method untuned: each parameter the genome searches, and each one mergekit
    requires, at the catalogue's untuned value (equal weights; density .5, lambda 1, t .5: what
    mergekit's examples try first); every other parameter at the method's default."""
    n = len(sources)
    searched = spec.bounds()
    tensor_params: dict[str, list[float]] = {}
    global_params: dict[str, float | bool] = {}
    for param in METHODS[spec.method].params:
        if param.name not in searched and param.default is not REQUIRED:
            continue
        value = param.untuned
        if value is None:
            raise ValueError(f"catalogue: {spec.method}.{param.name} has no untuned value")
        if param.per_source:
            tensor_params[param.name] = [1.0 / n] * n if value == EQUAL else [float(value)] * n
        else:
            global_params[param.name] = value if isinstance(value, bool) else float(value)
    return Recipe.uniform(
        spec.method, base, sources, n_layers, tensor_params=tensor_params,
        global_params=global_params, seed=seed,
    )


# -- scoring and storing them (once per study) ---------------------------------------------


def run_baselines(study: optuna.Study, plan: StudyPlan, pool: WorkerPool, progress: Progress) -> None:
    """Score and store every baseline not stored yet (once per study).

    Baselines are stored with ``study.add_trial`` as finished trials without genes: they
    are references, not candidates. The samplers never see them (``search.samplers``
    hides ``kind = "baseline"`` trials), so they cannot enter CMA-ES's update as if it had
    proposed them, nor break the intersection search space of TPE/GP/NSGA-II.
    """
    from search.pool import evaluate_all

    config = plan.config
    stored = ranking.baseline_trials(study.get_trials(deepcopy=False))
    missing = [
        b for b in baseline_recipes(
            config.genome, base=plan.base, sources=list(plan.paths.values()), labels=plan.labels,
            n_layers=plan.n_layers, seed=config.seed,
        )
        if b.name not in stored
    ]
    if not missing:
        return
    progress.message(f"scoring {len(missing)} baseline(s): {', '.join(b.name for b in missing)}")
    outcomes = evaluate_all(pool, [b.recipe.to_dict() for b in missing], "search")
    scores_by_name = {name: t.user_attrs.get("scores_search") for name, t in stored.items()}
    for baseline, outcome in zip(missing, outcomes, strict=True):
        scores_by_name[baseline.name] = outcome.scores
    references = {}
    for label in plan.labels:
        scores = scores_by_name.get(source_baseline_name(label))
        if scores is None:
            failed = outcomes[[b.name for b in missing].index(source_baseline_name(label))]
            raise SearchError(
                f"models.sources.{label}: the source alone cannot be scored ({failed.error}); "
                "gates need every source's scores"
            )
        references[label] = dict(scores)
    if PENALTY_ATTR not in study.user_attrs:
        raws = [
            v for o in outcomes if o.scores is not None
            for v in objective_values(o.scores, plan.tasks, config.objective)
        ]
        study.set_user_attr(PENALTY_ATTR, penalty_for_baselines(raws))
    store_row_ids(study, "search", next((o.row_ids for o in outcomes if o.row_ids), None))
    for baseline, outcome in zip(missing, outcomes, strict=True):
        study.add_trial(_baseline_trial(study, plan, baseline.name, baseline.recipe, outcome, references))
        attach_baseline_recipe(study, baseline.name, baseline.recipe, plan.layout, plan.artifacts)
    progress.message(_baseline_table(study, plan))


def _baseline_trial(study: optuna.Study, plan: StudyPlan, name: str, recipe: Recipe,
                    outcome: TrialOutcome, references: Mapping[str, Mapping[str, float]]) -> FrozenTrial:
    attrs: dict[str, object] = {
        "kind": ranking.KIND_BASELINE,
        "baseline": name,
        "recipe": recipe.to_dict(),
        "recipe_summary": summarize_recipe(recipe, plan.labels),
        "timings": {"merge_s": outcome.merge_s, "score_s": outcome.score_s},
        "worker": outcome.worker,
    }
    if outcome.scores is None:
        attrs["failure"] = outcome.error
        return optuna.trial.create_trial(state=TrialState.FAIL, user_attrs=attrs)
    gates = evaluate_gates(plan.gates, outcome.scores, references, plan.task_higher)
    raw = objective_values(outcome.scores, plan.tasks, plan.config.objective)
    attrs.update(score_attrs(outcome.scores, gates))
    return optuna.trial.create_trial(
        state=TrialState.COMPLETE, values=list(raw), user_attrs=attrs,
        system_attrs={"constraints": gate_record.constraints(gates),
                      **({ROWS_SEARCH_ATTR: rows_attr(outcome.rows)} if outcome.rows else {})},
    )


def _baseline_table(study: optuna.Study, plan: StudyPlan) -> str:
    lines = ["baselines (search split):"]
    for name, trial in ranking.baseline_trials(study.get_trials(deepcopy=False)).items():
        scores = trial.user_attrs.get("scores_search", {})
        mark = "feasible" if ranking.is_feasible(trial) else "infeasible"
        lines.append(
            f"  {name:<24} " + "  ".join(f"{t} {v:.3f}" for t, v in scores.items()) + f"  ({mark})"
        )
    return "\n".join(lines)


def source_references(trials: Sequence[FrozenTrial], labels: Sequence[str], key: str) -> dict[str, dict[str, float]]:
    """Source label -> task -> score, from the stored source baselines (``key``: which split)."""
    by_name = ranking.baseline_trials(trials)
    out: dict[str, dict[str, float]] = {}
    for label in labels:
        trial = by_name.get(source_baseline_name(label))
        if trial is None or key not in trial.user_attrs:
            raise SearchError(f"source baseline {source_baseline_name(label)!r} has no {key}; run `search start`")
        out[label] = {str(k): float(v) for k, v in trial.user_attrs[key].items()}
    return out
