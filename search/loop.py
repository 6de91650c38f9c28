"""The ask/tell loop: ask a trial, decode and store its recipe, run it on the pool, tell it.

The driver (``search.driver.run_study``) runs :class:`SearchLoop` once per run, after the
baselines, until the budget of search trials is spent or Ctrl-C. Where each trial goes
(its position and horizon; CMA-ES batches) is ``search.positions``; what the sampler
sees, ``search.samplers``; what a scored trial stores, ``search.records``.

Every trial is told its real objective. Gates are stored on every trial as the
``constraints`` system attribute (what TPE, NSGA-II, GP and optuna-dashboard 0.21 read;
never also ``trial.set_constraint``, which would double-count). CMA-ES ignores
constraints: ``search.samplers`` shows it a penalised value for infeasible trials.

With ``study.fidelity`` (``search.staged``) a trial is scored in stages: the pool scores only
the rows a stage adds; after each stage the trial is stopped or promoted. A stage's rows are
stored on the running trial (system attr ``rows_search``, a prefix of the study's row order)
before the next is submitted, so a re-run of a trial the driver lost continues from them
without scoring a row twice. A stopped trial is told ``PRUNED`` with only the rows it scored,
its estimate (user attr ``fidelity``; single objective: also its value, reported as the
intermediate value at step = rows scored) and constraints from that estimate; it never counts
as complete, so no ranking, finalize or "best" sees it (``search.samplers`` says what each
sampler is shown). A trial promoted through the last stage is stored as without stages.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import optuna
from optuna.trial import Trial, TrialState

from fitness.gates import evaluate_gates
from fitness.objective import objective_values
from genome.errors import GenomeError
from genome.space import decode
from merges.recipe import Recipe
from search import gate_record, positions, ranking
from search.annotate import attach_recipe
from search.baselines import source_references
from search.errors import SearchError
from search.plan import StudyPlan
from search.pool import WorkerPool
from search.progress import Progress, ProgressState, run_record, throughput
from search.records import (
    ROWS_SEARCH_ATTR,
    prefix_rows_attr,
    rows_attr,
    score_attrs,
    summarize_recipe,
    trial_prefix_rows,
)
from search.recovery import StopRequest, enqueue_rerun
from search.samplers import CMA_PREFIX, HORIZON, POSITION
from search.staged import FIDELITY_ATTR, PROMOTED_ATTR, StudyStages, study_stages
from search.warm_start import enqueue_position
from search.worker import TrialOutcome
from search.write_behind import WriteBehindStorage


@dataclass
class LoopTimings:
    """Where the search loop's time went (seconds, summed over this run's search trials).

    The driver's overhead, in CPU seconds of the driver process (the work it does: on a
    busy machine its wall time also counts the waits for a core, during which the
    workers run): ``sample_s``, the sampler and ``study.ask``; ``store_s``, decoding,
    attributes, the recipe artifact, ``tell``, storage flushes and progress;
    ``dispatch_s``, handing trials to the pool. ``merge_s``/``score_s``: what the
    workers reported (wall); ``wall_s``: the loop's wall time.
    """

    trials: int = 0
    wall_s: float = 0.0
    sample_s: float = 0.0
    store_s: float = 0.0
    dispatch_s: float = 0.0
    merge_s: float = 0.0
    score_s: float = 0.0

    @property
    def driver_s(self) -> float:
        return self.sample_s + self.store_s + self.dispatch_s


def budget_used(study: optuna.Study) -> int:
    """Search trials that count toward the budget (``ranking.counts_toward_budget``)."""
    return sum(ranking.counts_toward_budget(t) for t in study.get_trials(deepcopy=False))


@dataclass
class _InFlight:
    trial: Trial
    recipe: Recipe
    position: int
    # scored in stages (search.staged): task -> the rows so far, in the study's row order
    rows: dict[str, list[float]] = field(default_factory=dict)
    carried: dict[str, int] = field(default_factory=dict)  # rows kept from the lost run it re-runs
    promoted: int = 0  # the last stage a decision promoted it after (kept over re-runs: decided once)
    merge_s: float = 0.0  # summed over its stages
    score_s: float = 0.0
    worker: str = ""  # of its last stage


class SearchLoop:
    """Asks, runs and tells search trials until the budget is spent or a stop is requested.

    ``storage``: the study's write-behind storage (the loop flushes it so readers see a
    running trial's recipe, and writes trial system attributes through it).
    """

    def __init__(self, study: optuna.Study, storage: WriteBehindStorage, plan: StudyPlan,
                 pool: WorkerPool, progress: Progress, stop: StopRequest) -> None:
        self.study = study
        self.storage = storage
        self.plan = plan
        self.pool = pool
        self.progress = progress
        self.stop = stop
        self.in_flight: dict[int, _InFlight] = {}
        self.budget = plan.config.trials
        self._references: dict[str, dict[str, float]] | None = None
        self._stages: StudyStages | None | bool = False  # False: not read yet (after the baselines)
        self.timings = LoopTimings()

    @property
    def references(self) -> dict[str, dict[str, float]]:
        if self._references is None:
            self._references = source_references(
                self.study.get_trials(deepcopy=False), self.plan.labels, "scores_search"
            )
        return self._references

    @property
    def stages(self) -> StudyStages | None:
        """The study's stages (None: every trial scored on every row), read once the baselines ran."""
        if self._stages is False:
            self._stages = study_stages(self.study, self.plan)
        return self._stages  # type: ignore[return-value]

    def run(self) -> None:
        start = time.perf_counter()
        try:
            if self.plan.config.sampler == "cmaes":
                self._run_generations()
            else:
                self._run_streaming()
        finally:
            self.timings.wall_s += time.perf_counter() - start

    # Positions and horizons (search.positions) decide what each trial is drawn from.

    def _run_streaming(self) -> None:
        """Ask as soon as a pool slot frees; position p is drawn seeing positions < p - lag finished.

        ``lag`` is how many trials the pool runs beside the one being asked (0 inline); a
        position waits until every position before its horizon is told.
        """
        done = budget_used(self.study)
        lag = positions.streaming_lag(self.study, self.pool.free_slots())
        position = positions.next_position(positions.positioned_trials(self.study), done)
        while True:
            while not self.stop.requested and self.pool.free_slots() > 0:
                waiting = positions.waiting_trial(self.study)
                if waiting is not None:
                    if not self._told_before(waiting.user_attrs.get(HORIZON, 0)):
                        break
                    asked = self._ask_and_submit()  # a lost trial's re-run, under its position
                elif position < self.budget and self._told_before(max(0, position - lag)):
                    asked = self._ask_and_submit(position, max(0, position - lag))
                    position += 1
                else:
                    break
                if not asked:
                    done += 1  # told as failed at once (the genes did not decode)
            if not self.in_flight:
                return
            for ticket, outcome in self.pool.wait():
                if self._tell(self.in_flight.pop(ticket), outcome):
                    done += 1
                    self._report(done)

    def _told_before(self, horizon: int) -> bool:
        return all(item.position >= horizon for item in self.in_flight.values())

    def _run_generations(self) -> None:
        """CMA-ES: ask exactly the rest of the current generation, evaluate it, tell it all.

        Each such batch is drawn seeing the positions before the batch finished (horizon:
        its first position). Re-runs of trials a killed driver lost run first, then the
        rest of the batch it left unfinished.
        """
        popsize = positions.popsize(self.plan)
        done = budget_used(self.study)
        while not self.stop.requested:
            if positions.waiting_trial(self.study) is not None:
                while positions.waiting_trial(self.study) is not None:  # re-runs first: later draws see them told
                    if not self._ask_and_submit():
                        done += 1
            else:
                start, batch = positions.next_batch(positions.positioned_trials(self.study), popsize,
                                                    done, self.budget)
                if not batch:
                    return
                for position in batch:
                    if not self._ask_and_submit(position, start):
                        done += 1
            while self.in_flight:
                for ticket, outcome in self.pool.wait():
                    if self._tell(self.in_flight.pop(ticket), outcome):
                        done += 1
                        self._report(done)

    def _ask_and_submit(self, position: int | None = None, horizon: int | None = None) -> bool:
        """Ask one trial and submit it; False when it finished at once (told FAIL: its genes do
        not decode; or, re-running a lost trial scored in stages, stopped on the rows it carries).

        With ``position`` a new trial is placed there (enqueued with its position and
        horizon, so the sampler knows them when it draws); without, the enqueued one is asked.
        """
        clock = time.process_time()
        if position is not None:
            enqueue_position(self.study, position, {"kind": ranking.KIND_SEARCH, POSITION: position, HORIZON: horizon})
        trial = self.study.ask(fixed_distributions=self.plan.space)
        clock = self._charge("sample_s", clock)
        recipe = self._record(trial)
        clock = self._charge("store_s", clock)
        if recipe is None:
            return False
        item = _InFlight(trial, recipe, int(trial.user_attrs.get(POSITION, -1)))
        if self.stages is not None:
            carried, item.promoted = self._carried_rows(trial)
            item.rows = {task: list(values) for task, values in carried.items()}
            item.carried = {task: len(values) for task, values in carried.items()}
            if carried:  # on this trial too: a second kill still keeps them
                self.storage.set_trial_system_attr(self.storage.trial_id(trial.number), ROWS_SEARCH_ATTR,
                                                   prefix_rows_attr(carried, self.stages.task_rows))
                if item.promoted:
                    self.storage.set_trial_system_attr(self.storage.trial_id(trial.number), PROMOTED_ATTR,
                                                       item.promoted)
            if self.stages.at_stage_end(item.carried) is not None:  # lost after storing a stage: decide now
                finished = self._after_stage(item)
                self._charge("store_s", clock)
                return not finished
        self._submit(item)
        self._charge("dispatch_s", clock)
        return True

    def _submit(self, item: _InFlight) -> None:
        """Hand the trial's next evaluation to the pool: every row, or its next stage's rows."""
        self.in_flight[item.trial.number] = item
        if self.stages is None:  # every row (pools written before stages take no rows argument)
            self.pool.submit(item.trial.number, item.recipe.to_dict(), "search")
            return
        rows = self.stages.next_rows({task: len(values) for task, values in item.rows.items()})
        self.pool.submit(item.trial.number, item.recipe.to_dict(), "search", rows=rows)

    def _carried_rows(self, trial: Trial) -> tuple[dict[str, list[float]], int]:
        """A re-run's rows kept from the lost run (stored stage by stage), else none, and the last
        stage the lost run was promoted after."""
        lost = trial.user_attrs.get("rerun_of")
        if lost is None:
            return {}, 0
        frozen = self.study.get_trials(deepcopy=False)[lost]
        held = trial_prefix_rows(frozen)
        if held is None:
            return {}, 0
        return {task: values.tolist() for task, values in held.items()}, int(frozen.system_attrs.get(PROMOTED_ATTR, 0))

    def _charge(self, part: str, since: float) -> float:
        """Add the driver's CPU time since ``since`` to ``part`` of the timings; returns now."""
        now = time.process_time()
        setattr(self.timings, part, getattr(self.timings, part) + now - since)
        return now

    def _record(self, trial: Trial) -> Recipe | None:
        """Decode and store a new trial's recipe; None when its genes do not decode (told FAIL)."""
        lost = trial.user_attrs.get("rerun_of")
        if lost is not None:
            # A re-run of a trial the driver lost takes over what CMA-ES stored on it (its
            # generation, the optimizer it drew from): later draws restore from finished trials.
            for key, value in self.study.get_trials(deepcopy=False)[lost].system_attrs.items():
                if key.startswith(CMA_PREFIX):
                    self.storage.set_trial_system_attr(self.storage.trial_id(trial.number), key, value)
        config = self.plan.config
        try:
            recipe = decode(
                config.genome, trial.params, base=self.plan.base, sources=self.plan.paths,
                n_layers=self.plan.n_layers, seed=config.seed, dtype=config.models.dtype,
            )
        except GenomeError as exc:
            trial.set_user_attr("failure", f"genes do not decode: {exc}")
            self.study.tell(trial, state=TrialState.FAIL)
            return None
        trial.set_user_attr("recipe", recipe.to_dict())
        trial.set_user_attr("recipe_summary", summarize_recipe(recipe, self.plan.labels))
        # The dashboard's artifact; a finished trial could not take it any more.
        attach_recipe(trial, recipe, self.plan.layout, self.plan.artifacts)
        self.storage.flush()  # readers see the running trial's genes and recipe
        return recipe

    def _tell(self, item: _InFlight, outcome: TrialOutcome) -> bool:
        """Store an evaluation's outcome; False when the trial goes on to its next stage."""
        clock = time.process_time()
        self.timings.merge_s += outcome.merge_s
        self.timings.score_s += outcome.score_s
        if self.stages is not None and outcome.scores is not None:
            item.merge_s += outcome.merge_s
            item.score_s += outcome.score_s
            item.worker = outcome.worker
            for task, values in (outcome.rows or {}).items():
                item.rows.setdefault(task, []).extend(values)
            finished = self._after_stage(item)
        else:
            self._store_outcome(item, outcome)
            finished = True
        self._charge("store_s", clock)
        if finished:
            self.timings.trials += 1
        return finished

    def _after_stage(self, item: _InFlight) -> bool:
        """After a stage: store the trial whole (last stage), or stopped, or submit its next stage."""
        stages = self.stages
        assert stages is not None
        held = {task: len(values) for task, values in item.rows.items()}
        stage = stages.at_stage_end(held)
        if stage is None:
            raise SearchError(f"trial {item.trial.number}: {sum(held.values())} rows scored, which ends no stage "
                              f"({', '.join(map(str, stages.sizes))})")
        record: dict[str, object] = {"stage": stage, "stages": len(stages.sizes), "rows": held}
        if item.carried:
            record["carried"] = item.carried
        trial_id = self.storage.trial_id(item.trial.number)
        if stage == len(stages.sizes):  # every row: stored as a trial scored without stages
            item.trial.set_user_attr(FIDELITY_ATTR, record)
            rows = stages.in_file_order(item.rows)
            scores = {task: math.fsum(values) / len(values) for task, values in rows.items()}
            self._store_outcome(item, TrialOutcome(scores, item.merge_s, item.score_s, None, item.worker, rows=rows))
            return True
        # the stage's rows (a killed driver's re-run continues from them) and, when promoted, the
        # decision, stored before the next stage is submitted: a re-run does not decide again on
        # what has been told since (search.staged: the rank rule's peers grow)
        self.storage.set_trial_system_attr(trial_id, ROWS_SEARCH_ATTR, prefix_rows_attr(item.rows, stages.task_rows))
        if item.promoted == stage:  # a re-run whose lost run was promoted after this stage
            self.storage.flush()
            self._submit(item)
            return False
        decision = stages.decide(item.rows, self.study.get_trials(deepcopy=False), self.plan,
                                 seed=self.plan.config.seed + max(item.position, 0))
        if not decision.stopped:
            self.storage.set_trial_system_attr(trial_id, PROMOTED_ATTR, stage)
            self.storage.flush()
            item.promoted = stage
            self._submit(item)
            return False
        raw = objective_values(decision.estimate, self.plan.tasks, self.plan.config.objective)
        record.update(stopped=decision.reason, estimate=decision.estimate, objective=list(raw))
        trial = item.trial
        trial.set_user_attr(FIDELITY_ATTR, record)
        trial.set_user_attr("timings", {"merge_s": item.merge_s, "score_s": item.score_s})
        trial.set_user_attr("worker", item.worker)
        gates = evaluate_gates(self.plan.gates, decision.estimate, self.references, self.plan.task_higher)
        self.storage.set_trial_system_attr(trial_id, "constraints", gate_record.constraints(gates))  # estimated
        if len(raw) == 1:  # Optuna stores a pruned trial's last intermediate value as its value
            trial.report(raw[0], step=sum(held.values()))
        self.study.tell(trial, state=TrialState.PRUNED)
        return True

    def _store_outcome(self, item: _InFlight, outcome: TrialOutcome) -> None:
        trial = item.trial
        trial.set_user_attr("timings", {"merge_s": outcome.merge_s, "score_s": outcome.score_s})
        trial.set_user_attr("worker", outcome.worker)
        if outcome.scores is None and self.stop.requested:
            # Ctrl-C reaches Ray workers too; a trial lost while stopping is re-run on resume.
            trial.set_user_attr("failure", ranking.DRIVER_STOPPED)
            trial.set_user_attr("failure_detail", outcome.error or "unknown error")
            self.study.tell(trial, state=TrialState.FAIL)
            enqueue_rerun(self.study, self.plan, self.storage.get_trial(self.storage.trial_id(trial.number)))
            return
        if outcome.scores is None:
            trial.set_user_attr("failure", outcome.error or "unknown error")
            self.study.tell(trial, state=TrialState.FAIL)
            self.progress.message(f"trial {trial.number} failed: {outcome.error}")
            return
        gates = evaluate_gates(self.plan.gates, outcome.scores, self.references, self.plan.task_higher)
        raw = objective_values(outcome.scores, self.plan.tasks, self.plan.config.objective)
        for key, value in score_attrs(outcome.scores, gates).items():
            trial.set_user_attr(key, value)
        if outcome.rows:  # per-row values, for paired intervals (search.records)
            self.storage.set_trial_system_attr(
                self.storage.trial_id(trial.number), ROWS_SEARCH_ATTR, rows_attr(outcome.rows)
            )
        # The dashboard's format; written before tell so samplers see it in after_trial.
        self.storage.set_trial_system_attr(
            self.storage.trial_id(trial.number), "constraints", gate_record.constraints(gates)
        )
        self.study.tell(trial, list(raw))  # the real objective; CMA-ES sees a penalty (search.samplers)

    def fail_in_flight(self) -> None:
        """Fail trials still in flight (Ctrl-C twice) and enqueue them to re-run on resume."""
        for item in self.in_flight.values():
            trial = item.trial
            trial.set_user_attr("failure", ranking.DRIVER_STOPPED)
            self.study.tell(trial, state=TrialState.FAIL)
            enqueue_rerun(self.study, self.plan, self.storage.get_trial(self.storage.trial_id(trial.number)))
        self.in_flight.clear()

    def _report(self, done: int) -> None:
        clock = time.process_time()
        self._update_progress(done)
        self._charge("store_s", clock)

    def _update_progress(self, done: int) -> None:
        trials = self.study.get_trials(deepcopy=False)
        searched = [t for t in trials if ranking.kind(t) == ranking.KIND_SEARCH]
        best = ranking.best_feasible(ranking.search_trials(searched), self.plan.directions)
        finished = [t for t in searched if t.datetime_complete is not None]
        last = max(finished, key=lambda t: (t.datetime_complete, t.number)) if finished else None
        self.progress.update(ProgressState(
            done=done, budget=self.budget,
            feasible=sum(ranking.is_feasible(t) for t in searched),
            failed=sum(t.state == TrialState.FAIL for t in searched),
            stopped=sum(t.state == TrialState.PRUNED for t in searched),
            last_trial=None if last is None else last.number,
            best_trial=None if best is None else best.number,
            best_objective=None if best is None else ranking.score(best, self.plan.directions),
            best_scores={} if best is None else dict(best.user_attrs["scores_search"]),
            # the same figure `search status` shows (see search.progress)
            per_min=throughput(searched, run_record(self.study.user_attrs)).per_min,
        ))
