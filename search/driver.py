"""``search start``: one run of a study, the only process that writes its Optuna storage.

1. take the storage's writer lock (``search.lock``), open the checkpoints and derive the
   plan (``search.plan``), create or load the study behind the write-behind storage;
2. recover from a killed driver (``search.recovery``): trials left RUNNING are failed and
   their genes enqueued to run again, under the same search position, before any new trial;
3. score the baselines not stored yet (``search.baselines``);
4. run the ask/tell loop until the budget of search trials is spent (``search.loop``);
5. finalize: re-score the top-k feasible trials on held-out, pick the final one
   (``search.finalize``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TextIO

from fitness.gates import gate_limits
from search import gate_record
from search.baselines import run_baselines, source_references
from search.config import StudyConfig
from search.finalize import FinalizeResult, finalize
from search.lock import storage_lock
from search.loop import LoopTimings, SearchLoop, budget_used
from search.plan import open_driver_study, plan_study, worker_setup
from search.pool import WorkerPool, make_pool
from search.progress import Progress, start_run
from search.ranking import FINAL_TRIAL_ATTR
from search.recovery import StopRequest, recover_interrupted, sigint_handler


@dataclass(frozen=True)
class RunResult:
    done: int
    budget: int
    interrupted: bool
    finalized: FinalizeResult | None
    timings: LoopTimings = field(default_factory=LoopTimings)


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
    study, storage = open_driver_study(plan)
    recover_interrupted(study, plan, storage)
    done = budget_used(study)
    if done < config.trials and study.user_attrs.get(FINAL_TRIAL_ATTR) is not None:
        study.set_user_attr(FINAL_TRIAL_ATTR, None)  # more trials to come: finalize again after them
    progress = Progress(config.trials, quiet=quiet, stream=stream, already_done=done)
    stop = StopRequest()
    stop.progress = progress
    own_pool = pool is None
    pool = pool or make_pool(worker_setup(config), config.execution)
    loop = SearchLoop(study, storage, plan, pool, progress, stop)
    try:
        with sigint_handler(stop):
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
            done = budget_used(study)
            interrupted = stop.requested and done < config.trials
            finalized = None
            if finalize_after and not interrupted and done >= config.trials:
                finalized = finalize(study, plan, pool, progress)
    finally:
        storage.close()
        progress.close()
        if own_pool:
            pool.close()
    return RunResult(done=done, budget=config.trials, interrupted=interrupted, finalized=finalized,
                     timings=loop.timings)
