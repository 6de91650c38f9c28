"""Interrupted runs: Ctrl-C, and the trials a killed or stopped driver lost.

First Ctrl-C: the loop stops asking and finishes the trials in flight; a second stops at
once (:class:`StopRequest`). Trials a killed driver left RUNNING are failed with
:data:`~search.ranking.DRIVER_STOPPED` (:func:`recover_interrupted`) and their genes
enqueued under the same search position (:func:`enqueue_rerun`), so the next asks take
them before any new trial and a resumed study draws what an uninterrupted one drew.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import optuna
from optuna.trial import FrozenTrial, TrialState

from search import ranking
from search.plan import StudyPlan
from search.progress import Progress
from search.samplers import HORIZON, POSITION
from search.warm_start import WARM_ATTR
from search.write_behind import WriteBehindStorage


class StopRequest:
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
def sigint_handler(stop: StopRequest) -> Iterator[None]:
    try:
        previous = signal.signal(signal.SIGINT, stop)
    except ValueError:  # not the main thread: keep Python's default
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def recover_interrupted(study: optuna.Study, plan: StudyPlan, storage: WriteBehindStorage) -> list[int]:
    """Fail trials a killed driver left RUNNING and enqueue their parameters again.

    Heartbeats only run inside ``study.optimize``; with ask/tell the driver does this
    itself. Returns the numbers of the failed trials.
    """
    failed: list[int] = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        storage.set_trial_user_attr(storage.trial_id(trial.number), "failure", ranking.DRIVER_STOPPED)
        study.tell(trial.number, state=TrialState.FAIL)
        failed.append(trial.number)
        enqueue_rerun(study, plan, trial)
    return failed


def enqueue_rerun(study: optuna.Study, plan: StudyPlan, trial: FrozenTrial) -> None:
    """Enqueue a lost search trial's genes under its position (the next asks take it first)."""
    if ranking.kind(trial) != ranking.KIND_SEARCH or set(trial.params) != set(plan.space):
        return  # nothing to re-run: not a search trial, or stopped before its genes were drawn
    attrs: dict[str, object] = {"kind": ranking.KIND_SEARCH, "rerun_of": trial.number}
    for key in (POSITION, HORIZON, WARM_ATTR):
        if key in trial.user_attrs:
            attrs[key] = trial.user_attrs[key]
    study.enqueue_trial(dict(trial.params), user_attrs=attrs)

