"""Finalize: re-score the best feasible search trials on held-out and pick the final trial.

``finalize`` runs at the end of ``search start`` (the budget spent) and from
``search finalize`` (:func:`finalize_study`). Its records go to study user attributes
``heldout:<number>`` (``search.storage.HeldoutRecord``) and ``final_trial``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TextIO

import optuna
from optuna.trial import FrozenTrial

from fitness.gates import evaluate_gates
from fitness.objective import objective_values
from search import ranking, storage
from search.annotate import write_best_note
from search.baselines import source_baseline_name
from search.config import StudyConfig
from search.definition import check_definition, study_definition
from search.errors import SearchError
from search.generations import save_generations
from search.lm_eval_splits import current_splits, record_splits
from search.plan import StudyPlan, plan_study, worker_setup
from search.pool import WorkerPool, evaluate_all, make_pool
from search.progress import Progress


@dataclass
class FinalizeResult:
    final_trial: int | None
    rows: list[FinalistRow] = field(default_factory=list)
    message: str = ""


@dataclass(frozen=True)
class FinalistRow:
    trial: int
    search_objective: float
    heldout_objective: float
    feasible_heldout: bool
    failed_gates: tuple[str, ...]

    @property
    def gap(self) -> float:
        return self.search_objective - self.heldout_objective


def finalize(study: optuna.Study, plan: StudyPlan, pool: WorkerPool, progress: Progress) -> FinalizeResult:
    """Re-score the top-k feasible trials and every baseline on held-out; pick the final trial.

    Held-out gates use the sources' held-out scores as references. The final trial is the
    best on held-out among the finalists that pass every gate there too. Records go to
    study user attrs ``heldout:<number>`` (finished trials cannot be changed).
    """
    config = plan.config
    trials = study.get_trials(deepcopy=False)
    finalists = ranking.top_feasible(ranking.search_trials(trials), plan.directions, config.top_k)
    if not finalists:
        blocker = ranking.what_blocks(trials, plan.gate_names)
        reason = blocker.describe() if blocker else "no completed search trial"
        study.set_user_attr(ranking.FINAL_TRIAL_ATTR, None)
        write_best_note(study)
        return FinalizeResult(None, [], f"nothing to finalize: {reason}")
    baselines = list(ranking.baseline_trials(trials).values())
    user_attrs = study.user_attrs
    todo = [t for t in [*baselines, *finalists] if storage.heldout_record(user_attrs, t.number) is None]
    if todo:
        progress.message(_rescoring_message(todo, finalists, config.top_k))
        outcomes = evaluate_all(pool, [t.user_attrs["recipe"] for t in todo], "heldout")
        scored = dict(zip([t.number for t in todo], outcomes, strict=True))
        for number, outcome in scored.items():  # generation tasks: what each one answered
            if outcome.generations:
                save_generations(study, config.output, number, outcome.generations)
    else:
        scored = {}
    # References first: every source's held-out scores.
    heldout_scores: dict[int, dict[str, float]] = {}
    for trial in [*baselines, *finalists]:
        record = storage.heldout_record(user_attrs, trial.number)
        if record is not None:
            heldout_scores[trial.number] = record.scores
        elif scored[trial.number].scores is not None:
            heldout_scores[trial.number] = dict(scored[trial.number].scores or {})
    by_name = ranking.baseline_trials(trials)
    references: dict[str, dict[str, float]] = {}
    for label in plan.labels:
        number = by_name[source_baseline_name(label)].number
        if number not in heldout_scores:
            raise SearchError(
                f"models.sources.{label}: scoring the source alone on held-out failed: "
                f"{scored[number].error}"
            )
        references[label] = heldout_scores[number]
    for trial in [*baselines, *finalists]:
        if trial.number in scored and trial.number in heldout_scores:
            gates = evaluate_gates(plan.gates, heldout_scores[trial.number], references, plan.task_higher)
            storage.save_heldout(study, trial.number, storage.HeldoutRecord(
                heldout_scores[trial.number], {g.name: g.margin for g in gates}, all(g.passed for g in gates),
            ))
    user_attrs = study.user_attrs
    rows: list[FinalistRow] = []
    for trial in finalists:
        record = storage.heldout_record(user_attrs, trial.number)
        if record is None:
            continue  # its held-out scoring failed; the error was reported
        heldout_raw = objective_values(record.scores, plan.tasks, config.objective)
        rows.append(FinalistRow(
            trial=trial.number,
            search_objective=ranking.score(trial, plan.directions),
            heldout_objective=_signed_mean(heldout_raw, plan.directions),
            feasible_heldout=record.feasible,
            failed_gates=tuple(g for g, m in record.gate_margins.items() if m < 0),
        ))
    passing = [r for r in rows if r.feasible_heldout]
    if not passing:
        study.set_user_attr(ranking.FINAL_TRIAL_ATTR, None)
        write_best_note(study)
        return FinalizeResult(None, rows, "no finalist passes every gate on the held-out split")
    final = max(passing, key=lambda r: (r.heldout_objective, -r.trial))
    study.set_user_attr(ranking.FINAL_TRIAL_ATTR, final.trial)
    write_best_note(study)  # the dashboard's note on the chosen trial
    return FinalizeResult(final.trial, rows, f"final trial: {final.trial}")


def _rescoring_message(todo: Sequence[FrozenTrial], finalists: Sequence[FrozenTrial], top_k: int) -> str:
    """What finalize re-scores: finalists (numbered) and baselines (the gates' references), apart."""
    numbers = {t.number for t in todo}
    picked = [t.number for t in finalists if t.number in numbers]
    references = len(numbers) - len(picked)
    parts = []
    if picked:
        parts.append(f"{len(picked)} finalist(s), trial(s) {', '.join(map(str, picked))} "
                     f"(the best feasible search trials, top_k = {top_k})")
    if references:
        parts.append(f"{references} baseline(s) (the held-out gates' references)")
    return "re-scoring on the held-out split: " + " and ".join(parts)


def _signed_mean(values: Sequence[float], directions: Sequence[str]) -> float:
    signed = [v if d == "maximize" else -v for v, d in zip(values, directions, strict=True)]
    return sum(signed) / len(signed)


def finalize_study(config: StudyConfig, *, quiet: bool = False, stream: TextIO | None = None) -> FinalizeResult:
    """``search finalize``: finalize an existing study (held-out re-score, final trial)."""
    plan = plan_study(config)
    study = storage.load_existing_study(config.name, config.storage)
    check_definition(study, study_definition(config), config.storage, store=False)
    record_splits(study, current_splits(config.tasks), config.storage, store=False)  # held-out docs unchanged
    progress = Progress(config.trials, quiet=quiet, stream=stream)
    pool = make_pool(worker_setup(config), config.execution)
    try:
        return finalize(study, plan, pool, progress)
    finally:
        progress.close()
        pool.close()


def format_finalists(result: FinalizeResult, tasks: Sequence[str]) -> str:
    if not result.rows:
        return result.message
    lines = [f"{'trial':>6} {'search':>8} {'heldout':>8} {'gap':>7}  gates on held-out"]
    for row in result.rows:
        mark = "pass" if row.feasible_heldout else "fail: " + ", ".join(row.failed_gates)
        star = " *" if row.trial == result.final_trial else ""
        lines.append(
            f"{row.trial:>6} {row.search_objective:>8.4f} {row.heldout_objective:>8.4f} "
            f"{row.gap:>+7.4f}  {mark}{star}"
        )
    lines.append(result.message)
    return "\n".join(lines)
