"""The ask/tell loop: the only process that writes the Optuna storage.

One run of ``search start``:

1. open the checkpoints (preflight) and the study (created or loaded by name);
2. recover from a killed driver: trials left RUNNING are failed with
   :data:`~search.ranking.DRIVER_STOPPED` and their parameters enqueued to run again,
   under the same search position, before any new trial;
3. score the baselines not stored yet (sources alone, uniform average, untuned method);
4. ask/tell until the budget of search trials is spent. CMA-ES is asked one whole
   generation at a time (exactly ``popsize`` trials, evaluated in parallel, all told);
   other samplers get a new trial as soon as a pool slot frees and the trials before its
   horizon are told. Each search trial's position and horizon decide what its genes are
   drawn from (``search.samplers``), never timing or interruptions;
5. finalize: re-score the top-k feasible trials on held-out and pick the final one.

Every trial is told its real objective. Gates are stored on every trial as the
``constraints`` system attribute (what TPE, NSGA-II, GP and optuna-dashboard 0.21 read;
never also ``trial.set_constraint``, which would double-count). CMA-ES ignores
constraints: ``search.samplers`` shows it a penalised value for infeasible trials.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TextIO

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, Trial, TrialState

from fitness.gates import GateResult, GateSpec, evaluate_gates, gate_limits, gate_names
from fitness.objective import objective_directions, objective_values
from fitness.spec import TaskSpec, higher_is_better
from genome.errors import GenomeError
from genome.space import decode, gene_space, is_numeric
from merges.layout import Layout
from merges.recipe import Recipe
from search import gate_record, ranking, storage
from search.annotate import artifact_dir, attach_baseline_recipe, attach_recipe, write_best_note
from search.baselines import baseline_recipes, source_baseline_name
from search.config import StudyConfig
from search.definition import check_definition, study_definition
from search.errors import SearchError
from search.generations import save_generations
from search.lock import storage_lock
from search.pool import WorkerPool, make_pool
from search.progress import Progress, ProgressState, run_record, start_run, throughput
from search.samplers import (
    CMA_PREFIX,
    HORIZON,
    PENALTY_ATTR,
    POSITION,
    make_sampler,
    penalty_for_baselines,
)
from search.warm_start import WARM_ATTR, enqueue_position, store_warm_start, warm_start_for
from search.worker import TrialOutcome, WorkerSetup
from search.write_behind import WriteBehindStorage

CMA_GENERATION_KEY = CMA_PREFIX + "generation"  # CmaEsSampler's system attr (plain CMA, no margin)
LAG_ATTR = "sampler_lag"  # study user attr: trials running beside each streaming ask (see _Loop)


@dataclass(frozen=True)
class StudyPlan:
    """What every stage needs, derived once from the config and the checkpoints."""

    config: StudyConfig
    labels: tuple[str, ...]
    paths: dict[str, str]  # label -> checkpoint path
    base: str
    n_layers: int
    space: dict[str, BaseDistribution]
    directions: tuple[str, ...]
    gates: tuple[GateSpec, ...]
    gate_names: tuple[str, ...]
    task_higher: dict[str, bool]
    layout: Layout

    @property
    def artifacts(self) -> Path:
        return artifact_dir(self.config.output)

    @property
    def tasks(self) -> tuple[TaskSpec, ...]:
        return self.config.tasks


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


@dataclass(frozen=True)
class RunResult:
    done: int
    budget: int
    interrupted: bool
    finalized: FinalizeResult | None
    timings: LoopTimings = field(default_factory=LoopTimings)


# -- setup ------------------------------------------------------------------------------


def plan_study(config: StudyConfig) -> StudyPlan:
    """Preflight the checkpoints and derive the genome space, directions and gates."""
    from merges.checkpoint import open_checkpoint
    from merges.preflight import preflight
    from merges.tokenizer_union import with_policy

    models = config.models
    base = open_checkpoint(models.base, allow_pickle=models.allow_pickle)
    sources = [open_checkpoint(p, allow_pickle=models.allow_pickle) for p in models.sources.values()]
    base, sources = with_policy(base, sources, models.tokenizer_policy(), trust_remote_code=models.trust_remote_code)
    layout = preflight(base, sources)
    labels = tuple(models.sources)
    paths = {label: str(path) for label, path in models.sources.items()}
    gates = tuple(g for task in config.tasks for g in task.gates)
    return StudyPlan(
        config=config,
        labels=labels,
        paths=paths,
        base=str(models.base),
        n_layers=layout.n_layers,
        space=gene_space(config.genome, sources=paths, n_layers=layout.n_layers),
        directions=objective_directions(config.tasks, config.objective),
        gates=gates,
        gate_names=tuple(gate_names(gates)),
        task_higher={t.name: higher_is_better(t.metric) for t in config.tasks},
        layout=layout,
    )


def worker_setup(config: StudyConfig) -> WorkerSetup:
    """The picklable description a worker builds itself from."""
    execution = config.execution
    device = execution.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return WorkerSetup(
        base=str(config.models.base),
        sources=tuple(str(p) for p in config.models.sources.values()),
        tasks=tuple(config.tasks),
        device=device,
        dtype=config.models.dtype,
        batch_size=execution.batch_size,
        allow_pickle=config.models.allow_pickle,
        trust_remote_code=config.models.trust_remote_code,
        tokenizer=config.models.tokenizer_policy(),
        # Torch's default (every core) oversubscribes a shared machine; a worker gets its share.
        threads=max(1, int(execution.cpus_per_worker)),
    )


def open_plan_study(plan: StudyPlan) -> optuna.Study:
    config = plan.config
    if config.sampler == "cmaes" and len(plan.directions) > 1:
        raise SearchError(
            f"{config.path}: sampler 'cmaes' optimises one objective; objective "
            f"{config.objective!r} gives {len(plan.directions)} (use 'nsga2' or objective 'mean')"
        )
    if config.sampler == "cmaes" and not is_numeric(config.genome):
        print(
            "warning: CMA-ES samples categorical genes at random; consider sampler 'tpe'",
            file=sys.stderr,
        )
    warm = warm_start_for(config, space=plan.space, n_layers=plan.n_layers, layout=plan.layout)
    sampler = make_sampler(config.sampler, seed=config.seed, space=plan.space, population=config.population,
                           parallel=config.execution.workers > 1, source_trials=warm.frozen_source_trials(plan.space))
    durable = storage.open_study(config.name, config.storage, plan.directions, sampler=sampler,
                                 definition=study_definition(config))
    # The driver is the only writer (search.lock): it reads from memory and writes in batches.
    study = optuna.Study(
        study_name=config.name, storage=WriteBehindStorage(durable._storage, config.name), sampler=sampler
    )
    store_warm_start(study, warm)  # fixed on the first run: a resume places the same warm trials
    attrs = study.user_attrs
    wanted = {
        "config_path": str(config.path),
        "sources": dict(plan.paths),
        "tasks": [t.name for t in config.tasks],
        "sampler": config.sampler,
        "seed": config.seed,
    }
    for key, value in wanted.items():
        if attrs.get(key) != value:
            study.set_user_attr(key, value)
    return study


# -- the run ----------------------------------------------------------------------------


class _StopRequest:
    """First Ctrl-C: stop asking, finish the in-flight trials. Second: stop now."""

    def __init__(self) -> None:
        self.requested = False
        self.progress: Progress | None = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.progress is not None:
            self.progress.message(
                "stopping after the trials in flight (Ctrl-C again to stop now; they re-run on resume)"
            )


@contextmanager
def _sigint_handler(stop: _StopRequest) -> Iterator[None]:
    try:
        previous = signal.signal(signal.SIGINT, stop)
    except ValueError:  # not the main thread: keep Python's default
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_study(config: StudyConfig, *, quiet: bool = False, stream: TextIO | None = None,
              pool: WorkerPool | None = None, finalize_after: bool = True) -> RunResult:
    """Run (or continue) a study up to its budget, then finalize it (one driver per storage).

    ``pool``: run on this pool (left open) instead of one built from ``config.execution``;
    ``finalize_after=False`` skips the held-out re-scoring (benchmarks time the loop alone).
    """
    with storage_lock(config.storage, output=config.output):
        return _run_study(config, quiet=quiet, stream=stream, pool=pool, finalize_after=finalize_after)


def _run_study(config: StudyConfig, *, quiet: bool, stream: TextIO | None,
               pool: WorkerPool | None, finalize_after: bool) -> RunResult:
    plan = plan_study(config)
    study = open_plan_study(plan)
    recover_interrupted(study, plan)
    done = _budget_used(study)
    if done < config.trials and study.user_attrs.get("final_trial") is not None:
        study.set_user_attr("final_trial", None)  # more trials to come: finalize again after them
    progress = Progress(config.trials, quiet=quiet, stream=stream, already_done=done)
    stop = _StopRequest()
    stop.progress = progress
    own_pool = pool is None
    pool = pool or make_pool(worker_setup(config), config.execution)
    loop = _Loop(study, plan, pool, progress, stop)
    try:
        with _sigint_handler(stop):
            try:
                run_baselines(study, plan, pool, progress)
                gate_record.store_study_gates(study, gate_limits(  # the limits, once the references are known
                    plan.gates, source_references(study.get_trials(deepcopy=False), plan.labels, "scores_search"),
                    plan.task_higher))
                start_run(study, config.trials)  # the budget and the clock `search status` shows
                loop.run()
            except KeyboardInterrupt:
                stop.requested = True
            finally:
                loop.fail_in_flight()
            done = _budget_used(study)
            interrupted = stop.requested and done < config.trials
            finalized = None
            if finalize_after and not interrupted and done >= config.trials:
                finalized = finalize(study, plan, pool, progress)
    finally:
        _flush(study)
        progress.close()
        if own_pool:
            pool.close()
    return RunResult(done=done, budget=config.trials, interrupted=interrupted, finalized=finalized,
                     timings=loop.timings)


def _flush(study: optuna.Study) -> None:
    """Write what the driver's storage still holds back (a no-op for other storages)."""
    if isinstance(study._storage, WriteBehindStorage):
        study._storage.flush()


def recover_interrupted(study: optuna.Study, plan: StudyPlan) -> list[int]:
    """Fail trials a killed driver left RUNNING and enqueue their parameters again.

    Heartbeats only run inside ``study.optimize``; with ask/tell the driver does this
    itself. Returns the numbers of the failed trials.
    """
    failed: list[int] = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(trial._trial_id, "failure", ranking.DRIVER_STOPPED)
        study.tell(trial.number, state=TrialState.FAIL)
        failed.append(trial.number)
        _enqueue_rerun(study, plan, trial)
    return failed


def _enqueue_rerun(study: optuna.Study, plan: StudyPlan, trial: FrozenTrial) -> None:
    """Enqueue a lost search trial's genes under its position (the next asks take it first)."""
    if ranking.kind(trial) != ranking.KIND_SEARCH or set(trial.params) != set(plan.space):
        return  # nothing to re-run: not a search trial, or stopped before its genes were drawn
    attrs: dict[str, object] = {"kind": ranking.KIND_SEARCH, "rerun_of": trial.number}
    for key in (POSITION, HORIZON, WARM_ATTR):
        if key in trial.user_attrs:
            attrs[key] = trial.user_attrs[key]
    study.enqueue_trial(dict(trial.params), user_attrs=attrs)


def _budget_used(study: optuna.Study) -> int:
    return sum(ranking.counts_toward_budget(t) for t in study.get_trials(deepcopy=False))


def _next_position(search: Sequence[FrozenTrial], done: int) -> int:
    """The position after every placed one (a study from before positions: after its trials)."""
    placed = [int(t.user_attrs[POSITION]) for t in search if POSITION in t.user_attrs]
    return max(placed) + 1 if placed else done


def _generation_remaining(trials: Sequence[FrozenTrial], popsize: int) -> int:
    """Trials still missing from the current CMA generation (a whole one when it is full)."""
    tagged = [
        t.system_attrs[CMA_GENERATION_KEY] for t in trials
        if t.state == TrialState.COMPLETE and CMA_GENERATION_KEY in t.system_attrs
    ]
    if not tagged:
        return popsize
    current = max(tagged)
    complete = sum(g == current for g in tagged)
    return popsize - complete if complete < popsize else popsize


# -- baselines --------------------------------------------------------------------------


def run_baselines(study: optuna.Study, plan: StudyPlan, pool: WorkerPool, progress: Progress) -> None:
    """Score and store every baseline not stored yet (once per study).

    Baselines are stored with ``study.add_trial`` as finished trials without genes: they
    are references, not candidates. The samplers never see them (``search.samplers``
    hides ``kind = "baseline"`` trials), so they cannot enter CMA-ES's update as if it had
    proposed them, nor break the intersection search space of TPE/GP/NSGA-II.
    """
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
    outcomes = _evaluate_all(pool, [b.recipe.to_dict() for b in missing], "search")
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
    attrs.update(_score_attrs(outcome.scores, gates))
    return optuna.trial.create_trial(
        state=TrialState.COMPLETE, values=list(raw), user_attrs=attrs,
        system_attrs={"constraints": gate_record.constraints(gates)},
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


# -- the loop ---------------------------------------------------------------------------


@dataclass
class _InFlight:
    trial: Trial
    recipe: Recipe
    position: int


class _Loop:
    def __init__(self, study: optuna.Study, plan: StudyPlan, pool: WorkerPool, progress: Progress,
                 stop: _StopRequest) -> None:
        self.study = study
        self.plan = plan
        self.pool = pool
        self.progress = progress
        self.stop = stop
        self.in_flight: dict[int, _InFlight] = {}
        self.budget = plan.config.trials
        self._references: dict[str, dict[str, float]] | None = None
        self.timings = LoopTimings()

    @property
    def references(self) -> dict[str, dict[str, float]]:
        if self._references is None:
            self._references = source_references(
                self.study.get_trials(deepcopy=False), self.plan.labels, "scores_search"
            )
        return self._references

    def run(self) -> None:
        start = time.perf_counter()
        try:
            if self.plan.config.sampler == "cmaes":
                self._run_generations()
            else:
                self._run_streaming()
        finally:
            self.timings.wall_s += time.perf_counter() - start

    # Every search trial has a position (0, 1, ... in asking order; a re-run keeps the lost
    # trial's) and a horizon: its genes are drawn seeing the positions before the horizon
    # finished (search.samplers). Horizons depend only on positions, never on timing, so a
    # resumed study draws what an uninterrupted one drew.

    def _run_streaming(self) -> None:
        """Ask as soon as a pool slot frees; position p is drawn seeing positions < p - lag finished.

        ``lag`` is how many trials the pool runs beside the one being asked (0 inline); a
        position waits until every position before its horizon is told.
        """
        done = _budget_used(self.study)
        lag = self._streaming_lag()
        position = _next_position(self._search_trials(), done)
        while True:
            while not self.stop.requested and self.pool.free_slots() > 0:
                waiting = self._waiting()
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
                self._tell(self.in_flight.pop(ticket), outcome)
                done += 1
                self._report(done)

    def _streaming_lag(self) -> int:
        """The study's lag (user attr ``sampler_lag``): fixed by the pool of its first run."""
        lag = self.study.user_attrs.get(LAG_ATTR)
        if lag is None:
            lag = max(0, self.pool.free_slots() - 1)
            self.study.set_user_attr(LAG_ATTR, lag)
        return int(lag)

    def _told_before(self, horizon: int) -> bool:
        return all(item.position >= horizon for item in self.in_flight.values())

    def _run_generations(self) -> None:
        """CMA-ES: ask exactly the rest of the current generation, evaluate it, tell it all.

        Each such batch is drawn seeing the positions before the batch finished (horizon:
        its first position). Re-runs of trials a killed driver lost run first, then the
        rest of the batch it left unfinished.
        """
        popsize = self._popsize()
        done = _budget_used(self.study)
        while not self.stop.requested:
            if self._waiting() is not None:
                while self._waiting() is not None:  # re-runs first: later draws see them told
                    if not self._ask_and_submit():
                        done += 1
            else:
                start, positions = self._next_batch(popsize, done)
                if not positions:
                    return
                for position in positions:
                    if not self._ask_and_submit(position, start):
                        done += 1
            while self.in_flight:
                for ticket, outcome in self.pool.wait():
                    self._tell(self.in_flight.pop(ticket), outcome)
                    done += 1
                    self._report(done)

    def _next_batch(self, popsize: int, done: int) -> tuple[int, range]:
        """The first position of the batch to ask now and the positions still to ask in it."""
        trials = self._search_trials()
        position = _next_position(trials, done)
        placed = [t for t in trials if HORIZON in t.user_attrs]
        if placed:
            start = int(max(placed, key=lambda t: t.user_attrs[POSITION]).user_attrs[HORIZON])
            end = start + self._batch_size(trials, start, popsize)
            if position < end:
                return start, range(position, end)  # the rest of a batch a killed driver began
        return position, range(position, position + self._batch_size(trials, position, popsize))

    def _batch_size(self, trials: Sequence[FrozenTrial], start: int, popsize: int) -> int:
        """A batch from ``start``: the rest of the generation the positions before it leave."""
        before = [t for t in trials if t.user_attrs.get(POSITION, -1) < start]
        return max(0, min(_generation_remaining(before, popsize), self.budget - start))

    def _popsize(self) -> int:
        if self.plan.config.population is not None:
            return self.plan.config.population
        # CmaEsSampler's default (cmaes.CMA, eq. 48) over the genes CMA models.
        n_dim = sum(not d.single() for d in self.plan.space.values())
        return 4 + math.floor(3 * math.log(max(n_dim, 1)))

    def _search_trials(self) -> list[FrozenTrial]:
        """Search trials that hold a position: not the runs a stopped driver lost (re-run instead)."""
        return [
            t for t in self.study.get_trials(deepcopy=False)
            if ranking.kind(t) == ranking.KIND_SEARCH
            and not (t.state == TrialState.FAIL and t.user_attrs.get("failure") == ranking.DRIVER_STOPPED)
        ]

    def _waiting(self) -> FrozenTrial | None:
        """The enqueued trial the next ask takes: a lost trial's re-run (or a position a
        killed driver had placed but not asked), else None."""
        waiting = self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        return waiting[0] if waiting else None

    def _ask_and_submit(self, position: int | None = None, horizon: int | None = None) -> bool:
        """Ask one trial and submit it; False when it failed at once (told FAIL).

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
        self.in_flight[trial.number] = _InFlight(trial, recipe, int(trial.user_attrs.get(POSITION, -1)))
        self.pool.submit(trial.number, recipe.to_dict(), "search")
        self._charge("dispatch_s", clock)
        return True

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
                    self.study._storage.set_trial_system_attr(trial._trial_id, key, value)
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
        _flush(self.study)  # readers see the running trial's genes and recipe
        return recipe

    def _tell(self, item: _InFlight, outcome: TrialOutcome) -> None:
        clock = time.process_time()
        self._store_outcome(item, outcome)
        self._charge("store_s", clock)
        self.timings.trials += 1
        self.timings.merge_s += outcome.merge_s
        self.timings.score_s += outcome.score_s

    def _store_outcome(self, item: _InFlight, outcome: TrialOutcome) -> None:
        trial = item.trial
        trial.set_user_attr("timings", {"merge_s": outcome.merge_s, "score_s": outcome.score_s})
        trial.set_user_attr("worker", outcome.worker)
        if outcome.scores is None and self.stop.requested:
            # Ctrl-C reaches Ray workers too; a trial lost while stopping is re-run on resume.
            trial.set_user_attr("failure", ranking.DRIVER_STOPPED)
            trial.set_user_attr("failure_detail", outcome.error or "unknown error")
            self.study.tell(trial, state=TrialState.FAIL)
            _enqueue_rerun(self.study, self.plan, self.study._storage.get_trial(trial._trial_id))
            return
        if outcome.scores is None:
            trial.set_user_attr("failure", outcome.error or "unknown error")
            self.study.tell(trial, state=TrialState.FAIL)
            self.progress.message(f"trial {trial.number} failed: {outcome.error}")
            return
        gates = evaluate_gates(self.plan.gates, outcome.scores, self.references, self.plan.task_higher)
        raw = objective_values(outcome.scores, self.plan.tasks, self.plan.config.objective)
        for key, value in _score_attrs(outcome.scores, gates).items():
            trial.set_user_attr(key, value)
        # The dashboard's format; written before tell so samplers see it in after_trial.
        self.study._storage.set_trial_system_attr(
            trial._trial_id, "constraints", gate_record.constraints(gates)
        )
        self.study.tell(trial, list(raw))  # the real objective; CMA-ES sees a penalty (search.samplers)

    def fail_in_flight(self) -> None:
        """Fail trials still in flight (Ctrl-C twice) and enqueue them to re-run on resume."""
        for item in self.in_flight.values():
            trial = item.trial
            trial.set_user_attr("failure", ranking.DRIVER_STOPPED)
            self.study.tell(trial, state=TrialState.FAIL)
            _enqueue_rerun(self.study, self.plan, self.study._storage.get_trial(trial._trial_id))
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
            last_trial=None if last is None else last.number,
            best_trial=None if best is None else best.number,
            best_objective=None if best is None else ranking.score(best, self.plan.directions),
            best_scores={} if best is None else dict(best.user_attrs["scores_search"]),
            # the same figure `search status` shows (see search.progress)
            per_min=throughput(searched, run_record(self.study.user_attrs)).per_min,
        ))


def _score_attrs(scores: Mapping[str, float], gates: Sequence[GateResult]) -> dict[str, object]:
    return {"scores_search": dict(scores), **gate_record.trial_gate_attrs(gates)}


def _evaluate_all(pool: WorkerPool, recipes: Sequence[dict], split: str) -> list[TrialOutcome]:
    """Evaluate recipes on the pool, keeping it full; outcomes in input order."""
    outcomes: dict[int, TrialOutcome] = {}
    next_index = 0
    while len(outcomes) < len(recipes):
        while next_index < len(recipes) and (pool.free_slots() > 0 or next_index - len(outcomes) == 0):
            pool.submit(next_index, recipes[next_index], split)
            next_index += 1
        for ticket, outcome in pool.wait():
            outcomes[ticket] = outcome
    return [outcomes[i] for i in range(len(recipes))]


# -- finalize ---------------------------------------------------------------------------


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
        study.set_user_attr("final_trial", None)
        write_best_note(study)
        return FinalizeResult(None, [], f"nothing to finalize: {reason}")
    baselines = list(ranking.baseline_trials(trials).values())
    user_attrs = study.user_attrs
    todo = [t for t in [*baselines, *finalists] if storage.heldout_record(user_attrs, t.number) is None]
    if todo:
        progress.message(_rescoring_message(todo, finalists, config.top_k))
        outcomes = _evaluate_all(pool, [t.user_attrs["recipe"] for t in todo], "heldout")
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
        study.set_user_attr("final_trial", None)
        write_best_note(study)
        return FinalizeResult(None, rows, "no finalist passes every gate on the held-out split")
    final = max(passing, key=lambda r: (r.heldout_objective, -r.trial))
    study.set_user_attr("final_trial", final.trial)
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


# -- display ----------------------------------------------------------------------------


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
