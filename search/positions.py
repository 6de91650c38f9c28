"""Where each search trial goes: its position, its horizon, and the batches CMA-ES is asked.

Every search trial has a position (0, 1, ... in asking order; a re-run keeps the lost
trial's) and a horizon: its genes are drawn seeing the positions before the horizon
finished (``search.samplers``). Horizons depend only on positions, never on timing, so a
resumed study draws what an uninterrupted one drew:

* CMA-ES is asked one batch at a time: the rest of the current generation, with the
  batch's first position as every member's horizon (:func:`next_batch`);
* other samplers one trial at a time: position ``p`` has horizon ``p - lag``, where the
  lag (study user attr ``sampler_lag``, fixed by the pool of the study's first run) is how
  many trials the pool runs beside the one being asked (:func:`streaming_lag`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from search import ranking
from search.plan import StudyPlan
from search.samplers import CMA_PREFIX, HORIZON, POSITION

CMA_GENERATION_KEY = CMA_PREFIX + "generation"  # CmaEsSampler's system attr (plain CMA, no margin)
LAG_ATTR = "sampler_lag"  # study user attr: trials running beside each streaming ask


def positioned_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Search trials that hold a position: not the runs a stopped driver lost (re-run instead)."""
    return [
        t for t in study.get_trials(deepcopy=False)
        if ranking.kind(t) == ranking.KIND_SEARCH
        and not (t.state == TrialState.FAIL and t.user_attrs.get("failure") == ranking.DRIVER_STOPPED)
    ]


def waiting_trial(study: optuna.Study) -> FrozenTrial | None:
    """The enqueued trial the next ask takes: a lost trial's re-run (or a position a
    killed driver had placed but not asked), else None."""
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    return waiting[0] if waiting else None


def next_position(search: Sequence[FrozenTrial], done: int) -> int:
    """The position after every placed one (a study from before positions: after its trials)."""
    placed = [int(t.user_attrs[POSITION]) for t in search if POSITION in t.user_attrs]
    return max(placed) + 1 if placed else done


def streaming_lag(study: optuna.Study, free_slots: int) -> int:
    """The study's lag (user attr ``sampler_lag``): fixed by the pool of its first run."""
    lag = study.user_attrs.get(LAG_ATTR)
    if lag is None:
        lag = max(0, free_slots - 1)
        study.set_user_attr(LAG_ATTR, lag)
    return int(lag)


def popsize(plan: StudyPlan) -> int:
    """Trials per CMA-ES generation: the study's population, else CmaEsSampler's default."""
    if plan.config.population is not None:
        return plan.config.population
    # CmaEsSampler's default (cmaes.CMA, eq. 48) over the genes CMA models.
    n_dim = sum(not d.single() for d in plan.space.values())
    return 4 + math.floor(3 * math.log(max(n_dim, 1)))


def next_batch(trials: Sequence[FrozenTrial], popsize: int, done: int, budget: int) -> tuple[int, range]:
    """The first position of the batch to ask now and the positions still to ask in it."""
    position = next_position(trials, done)
    placed = [t for t in trials if HORIZON in t.user_attrs]
    if placed:
        start = int(max(placed, key=lambda t: t.user_attrs[POSITION]).user_attrs[HORIZON])
        end = start + _batch_size(trials, start, popsize, budget)
        if position < end:
            return start, range(position, end)  # the rest of a batch a killed driver began
    return position, range(position, position + _batch_size(trials, position, popsize, budget))


def _batch_size(trials: Sequence[FrozenTrial], start: int, popsize: int, budget: int) -> int:
    """A batch from ``start``: the rest of the generation the positions before it leave."""
    before = [t for t in trials if t.user_attrs.get(POSITION, -1) < start]
    return max(0, min(_generation_remaining(before, popsize), budget - start))


def _generation_remaining(trials: Sequence[FrozenTrial], popsize: int) -> int:
    """Trials still missing from the current CMA generation (a whole one when it is full)."""
    tagged = [
        t.system_attrs[CMA_GENERATION_KEY] for t in trials
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED)  # PRUNED: stopped early (multi-fidelity)
        and CMA_GENERATION_KEY in t.system_attrs
    ]
    if not tagged:
        return popsize
    current = max(tagged)
    complete = sum(g == current for g in tagged)
    return popsize - complete if complete < popsize else popsize
