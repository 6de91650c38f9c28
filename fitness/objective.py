"""Objective aggregation: task scores -> the value(s) Optuna optimises.

Modes:

``mean`` (default)
    The weighted mean of the task scores (``TaskSpec.weight``): one value.
``min``
    The worst task: the lowest score when higher is better, the highest when lower is
    better (so "min" always means the weakest task): one value.
``per_task``
    One value per task in task order, each with its own metric's direction (for
    Pareto studies); tasks may mix directions here.

``mean`` and ``min`` combine scores on one scale, so every task must share a direction
(all higher-is-better, e.g. exact match / choice / loglik, or all lower-is-better,
e.g. perplexity); mixing them is an error that points to ``per_task``. The single
value is maximised when the tasks are higher-is-better and minimised otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from fitness.errors import FitnessError
from fitness.spec import TaskSpec, higher_is_better

MODES: tuple[str, ...] = ("mean", "min", "per_task")


def objective_directions(tasks: Sequence[TaskSpec], mode: str) -> tuple[str, ...]:
    """``"maximize"`` / ``"minimize"`` per objective value."""
    directions = _task_directions(tasks, mode)
    if mode == "per_task":
        return tuple(_word(higher) for higher in directions)
    return (_word(directions[0]),)


def objective_values(scores: Mapping[str, float], tasks: Sequence[TaskSpec], mode: str) -> tuple[float, ...]:
    """The objective value(s) for one candidate's task scores."""
    directions = _task_directions(tasks, mode)
    values: list[float] = []
    for task in tasks:
        if task.name not in scores:
            raise FitnessError(f"objective: no score for task {task.name!r} (scores for: {', '.join(scores)})")
        value = float(scores[task.name])
        if math.isnan(value):
            raise FitnessError(f"objective: the score for task {task.name!r} is NaN")
        values.append(value)
    if mode == "per_task":
        return tuple(values)
    if mode == "min":
        return (min(values) if directions[0] else max(values),)
    total_weight = math.fsum(task.weight for task in tasks)
    return (math.fsum(task.weight * value for task, value in zip(tasks, values, strict=True)) / total_weight,)


def _task_directions(tasks: Sequence[TaskSpec], mode: str) -> list[bool]:
    if mode not in MODES:
        raise FitnessError(f"objective: unknown mode {mode!r} (expected one of {', '.join(MODES)})")
    if not tasks:
        raise FitnessError("objective: no tasks")
    names = [task.name for task in tasks]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise FitnessError(f"objective: task names must be unique, repeated: {', '.join(duplicates)}")
    directions = [higher_is_better(task.metric) for task in tasks]
    if mode != "per_task" and len(set(directions)) > 1:
        higher = [t.name for t, d in zip(tasks, directions, strict=True) if d]
        lower = [t.name for t, d in zip(tasks, directions, strict=True) if not d]
        raise FitnessError(
            f"objective: mode {mode!r} cannot combine higher-is-better tasks ({', '.join(higher)}) with "
            f"lower-is-better tasks ({', '.join(lower)}); use mode 'per_task' or metrics of one direction"
        )
    return directions


def _word(higher: bool) -> str:
    return "maximize" if higher else "minimize"
