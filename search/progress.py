"""Study progress for a person, and the facts of a run that ``status`` shows the same way.

What the user sees follows three rules, here and in ``status``, ``finalize`` and ``export``:

* **trial numbers** are Optuna's (``trial 45``, what optuna-dashboard shows; baselines
  have numbers too); counts are written as counts (``41/48 search trials``);
* **the budget** is the one in force for the latest ``search start`` (the file's
  ``study.trials`` or ``--trials``), stored on the study (:func:`start_run`) so that
  ``status`` shows the same one;
* **throughput** is search trials finished in the latest run per minute since that
  run's search began (baselines, the family build and finalize not counted; failed
  trials and trials stopped early by multi-fidelity stages counted, as in the budget):
  :func:`throughput` computes it from the stored trials for both the progress line and
  ``status``.

The live display: a bar on a terminal, plain lines otherwise, nothing if quiet.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, TextIO

from search import ranking

if TYPE_CHECKING:  # not imported at run time: status reads this module without Optuna (trial states by name)
    import optuna
    from optuna.trial import FrozenTrial
    from tqdm import tqdm

RUN_KEY = "run"  # study user attr: {"budget": int, "started": ISO datetime} of the latest run


@dataclass(frozen=True)
class RunRecord:
    """The latest ``search start`` of a study: its budget and when its search began."""

    budget: int
    started: datetime  # naive local time, like Optuna's trial datetimes

    def to_json(self) -> dict[str, object]:
        return {"budget": self.budget, "started": self.started.isoformat()}


def start_run(study: optuna.Study, budget: int) -> RunRecord:
    """Record that a run's search begins now with ``budget`` search trials."""
    record = RunRecord(budget, datetime.now())  # Optuna stamps trials with datetime.now() too
    study.set_user_attr(RUN_KEY, record.to_json())
    return record


def run_record(user_attrs: Mapping[str, object]) -> RunRecord | None:
    raw = user_attrs.get(RUN_KEY)
    if not isinstance(raw, Mapping):
        return None
    return RunRecord(int(raw["budget"]), datetime.fromisoformat(str(raw["started"])))


@dataclass(frozen=True)
class Throughput:
    """Search trials finished in the latest run and the minutes since its search began."""

    trials: int
    minutes: float

    @property
    def per_min(self) -> float:
        return self.trials / self.minutes if self.minutes > 0 else 0.0

    def describe(self) -> str:
        if self.trials == 0 or self.minutes <= 0:
            return "no search trial finished in the latest run yet"
        return (f"{self.per_min:.1f} search trials/min ({self.trials} finished in "
                f"{self.minutes:.2f} min of the latest run's search)")


def throughput(trials: Iterable[FrozenTrial], run: RunRecord | None) -> Throughput:
    """Search trials finished since ``run.started`` per minute, up to the last of them.

    Without a run record (a study from before runs were recorded), every finished search
    trial counts from the first one's start.
    """
    finished = [
        t for t in trials
        if ranking.counts_toward_budget(t)  # complete, stopped early or failed; not re-run ones
        and t.datetime_start is not None and t.datetime_complete is not None
        and (run is None or t.datetime_start >= run.started)
    ]
    if not finished:
        return Throughput(0, 0.0)
    began = run.started if run is not None else min(t.datetime_start for t in finished)  # type: ignore[type-var]
    last = max(t.datetime_complete for t in finished)  # type: ignore[type-var]
    return Throughput(len(finished), (last - began).total_seconds() / 60.0)


@dataclass(frozen=True)
class ProgressState:
    done: int  # search trials counted against the budget
    budget: int
    feasible: int
    failed: int
    stopped: int = 0  # multi-fidelity: trials stopped early (PRUNED; never feasible or best)
    last_trial: int | None = None  # Optuna number of the trial that just finished
    best_trial: int | None = None  # Optuna number of the best feasible trial
    best_objective: float | None = None
    best_scores: dict[str, float] = field(default_factory=dict)
    per_min: float = 0.0  # :func:`throughput`


class Progress:
    """Report progress; ``quiet`` silences it. Plain lines when ``stream`` is not a TTY."""

    def __init__(self, budget: int, *, quiet: bool = False, stream: TextIO | None = None,
                 already_done: int = 0) -> None:
        self._stream = stream or sys.stdout
        self._quiet = quiet
        self._bar: tqdm | None = None
        if not quiet and self._stream.isatty():
            from tqdm import tqdm

            # No tqdm rate: the one throughput figure is ours (see the module docstring).
            self._bar = tqdm(total=budget, initial=already_done, file=self._stream, unit="trial",
                             dynamic_ncols=True,
                             bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} search trials [{elapsed}]{postfix}")

    def message(self, text: str) -> None:
        if self._quiet:
            return
        if self._bar is not None:
            self._bar.write(text, file=self._stream)
        else:
            print(text, file=self._stream, flush=True)

    def update(self, state: ProgressState) -> None:
        if self._quiet:
            return
        best = "none feasible yet" if state.best_objective is None else (
            f"best trial {state.best_trial} {state.best_objective:.4f} ("
            + ", ".join(f"{t} {v:.3f}" for t, v in state.best_scores.items()) + ")"
        )
        rate = f"{state.per_min:.1f} search trials/min"
        if self._bar is not None:
            stopped = f" stopped early {state.stopped}" if state.stopped else ""
            self._bar.n = state.done
            self._bar.set_postfix_str(f"feasible {state.feasible}{stopped} failed {state.failed} {best} {rate}",
                                      refresh=False)
            self._bar.refresh()
            return
        left = state.budget - state.done
        eta = f", eta {left / state.per_min:.1f} min" if state.per_min > 0 and left > 0 else ""
        last = "" if state.last_trial is None else f" (trial {state.last_trial} finished)"
        stopped = f" stopped early {state.stopped}," if state.stopped else ""
        print(
            f"{state.done}/{state.budget} search trials done{last}: feasible {state.feasible},"
            f"{stopped} failed {state.failed}, {best}, {rate}{eta}",
            file=self._stream, flush=True,
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
