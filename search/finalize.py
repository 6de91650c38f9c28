"""Finalize: re-score the best feasible search trials on held-out and pick the final trial.

``finalize`` runs at the end of ``search start`` (the budget spent) and from
``search finalize`` (:func:`finalize_study`). Its records go to study user attributes
``heldout:<number>`` (``search.storage.HeldoutRecord``, with the per-row values) and
``final_trial``. After the choice, and only then, the final trial and the best baseline are
scored on the test split once (``search.test_split``): no choice looks at it.

The finalist rule (``search.confidence.RULE``): the best-on-search finalist that passes
every gate on held-out is final unless another passing finalist is better on held-out by
more than noise (the paired 95% bootstrap interval of the difference excludes 0); then the
best on held-out among those. Choosing the best held-out number outright would pick noise
and report it as a gain. Without per-row values (perplexity tasks, lm-eval tasks whose metric
lm-eval does not average, records from before rows were kept) there is no interval and the best on held-out is final.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TextIO

import numpy as np
import optuna
from optuna.trial import FrozenTrial

from fitness.gates import evaluate_gates
from fitness.intervals import Interval
from fitness.objective import objective_values
from search import confidence, ranking, storage
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
from search.records import rows_attr, store_row_ids, trial_rows
from search.test_split import TEST_ATTR, score_test


@dataclass
class FinalizeResult:
    final_trial: int | None
    rows: list[FinalistRow] = field(default_factory=list)
    message: str = ""
    confidence: list[str] = field(default_factory=list)  # search.confidence.confidence_lines
    rule: str = ""  # how the final trial was chosen among the passing finalists


@dataclass(frozen=True)
class FinalistRow:
    trial: int
    search_objective: float
    heldout_objective: float
    feasible_heldout: bool
    failed_gates: tuple[str, ...]
    heldout_interval: Interval | None = None  # signed, as heldout_objective (None: no per-row values)

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
        study.set_user_attr(TEST_ATTR, None)
        write_best_note(study)
        return FinalizeResult(None, [], f"nothing to finalize: {reason}")
    baselines = list(ranking.baseline_trials(trials).values())
    user_attrs = study.user_attrs
    todo = [t for t in [*baselines, *finalists] if storage.heldout_record(user_attrs, t.number) is None]
    if todo:
        progress.message(_rescoring_message(todo, finalists, config.top_k))
        outcomes = evaluate_all(pool, [t.user_attrs["recipe"] for t in todo], "heldout")
        scored = dict(zip([t.number for t in todo], outcomes, strict=True))
        store_row_ids(study, "heldout", next((o.row_ids for o in outcomes if o.row_ids), None))
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
            rows = scored[trial.number].rows
            storage.save_heldout(study, trial.number, storage.HeldoutRecord(
                heldout_scores[trial.number], {g.name: g.margin for g in gates}, all(g.passed for g in gates),
                rows_attr(rows) if rows else None,
            ))
    user_attrs = study.user_attrs
    rule = confidence.objective_rule(user_attrs, plan.directions)
    finalist_rows = {t.number: trial_rows(t, user_attrs, "heldout") for t in finalists}
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
            heldout_interval=None if rule is None else confidence.heldout_interval(rule, finalist_rows[trial.number]),
        ))
    passing = [r for r in rows if r.feasible_heldout]
    if not passing:
        study.set_user_attr(ranking.FINAL_TRIAL_ATTR, None)
        study.set_user_attr(TEST_ATTR, None)
        write_best_note(study)
        return FinalizeResult(None, rows, "no finalist passes every gate on the held-out split")
    final, how, peeked = _choose(passing, finalist_rows, rule)
    study.set_user_attr(confidence.FINAL_CHOICE_ATTR, {"trial": final.trial, "how": how, "peeked": peeked})
    study.set_user_attr(ranking.FINAL_TRIAL_ATTR, final.trial)
    # Only now, the choice made: the final trial and the best baseline on the test rows, once.
    trials = study.get_trials(deepcopy=False)
    best = None if rule is None else confidence.best_baseline(trials, study.user_attrs, rule)
    score_test(study, config.tasks, pool, progress, trials[final.trial], best)
    write_best_note(study)  # the dashboard's note on the chosen trial
    lines = confidence.confidence_lines(study.get_trials(deepcopy=False), study.user_attrs, plan.directions)
    return FinalizeResult(final.trial, rows, f"final trial: {final.trial} ({how})", lines,
                          f"rule: {confidence.RULE}")


def _choose(passing: Sequence[FinalistRow], rows: Mapping[int, Mapping[str, np.ndarray] | None],
            rule: confidence.ObjectiveRule | None) -> tuple[FinalistRow, str, bool]:
    """The final trial among the passing finalists (in search order), why (``confidence.RULE``),
    and whether held-out scores (beyond the gates) decided it."""
    first = passing[0]  # the best on search
    if rule is None or any(rows.get(r.trial) is None for r in passing) or rule.no_interval:
        best = max(passing, key=lambda r: (r.heldout_objective, -r.trial))
        return best, "best on held-out; no held-out intervals to tell noise apart", len(passing) > 1
    better = [r for r in passing[1:] if confidence.preferred(rule, rows[r.trial], rows[first.trial])]
    if not better:
        return first, "best on search; no finalist better on held-out by more than noise", False
    best = max(better, key=lambda r: (r.heldout_objective, -r.trial))
    return best, f"better on held-out than trial {first.trial} by more than noise", True


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
    lines = [f"{'trial':>6} {'search':>8} {'heldout':>8} {'95% interval':>19} {'gap':>8}  gates on held-out"]
    for row in result.rows:
        mark = "pass" if row.feasible_heldout else "fail: " + ", ".join(row.failed_gates)
        star = " *" if row.trial == result.final_trial else ""
        interval = row.heldout_interval
        span = "-" if interval is None else f"[{interval.low:.4f}, {interval.high:.4f}]"
        lines.append(
            f"{row.trial:>6} {row.search_objective:>8.4f} {row.heldout_objective:>8.4f} {span:>19} "
            f"{row.gap:>+8.4f}  {mark}{star}"
        )
    lines.append("(objective signed: larger is better; gap = search - held-out)")
    if result.rule:
        lines.append(result.rule)
    lines.append(result.message)
    lines += result.confidence
    return "\n".join(lines)
