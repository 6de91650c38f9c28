"""fitness.objective: weighted mean, worst task, one value per task; directions."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fitness.errors import FitnessError
from fitness.objective import objective_directions, objective_values
from fitness.spec import TaskSpec

DATA = Path("unused.jsonl")  # objective code never reads task files


def task(name: str, metric: str = "exact_match", weight: float = 1.0) -> TaskSpec:
    return TaskSpec(name, DATA, metric=metric, weight=weight)


ACCURACY = [task("shipping", weight=2.0), task("refunds"), task("catalog", "loglik")]
SCORES = {"shipping": 0.6, "refunds": 0.3, "catalog": -0.9}


def test_mean_is_weighted() -> None:
    assert objective_values(SCORES, ACCURACY, "mean") == pytest.approx(((2 * 0.6 + 0.3 - 0.9) / 4,))
    assert objective_directions(ACCURACY, "mean") == ("maximize",)


def test_min_is_the_weakest_task_in_either_direction() -> None:
    assert objective_values(SCORES, ACCURACY, "min") == (-0.9,)
    assert objective_directions(ACCURACY, "min") == ("maximize",)
    perplexities = [task("a", "perplexity"), task("b", "perplexity")]
    assert objective_values({"a": 7.0, "b": 11.0}, perplexities, "min") == (11.0,)
    assert objective_directions(perplexities, "min") == ("minimize",)
    assert objective_values({"a": 7.0, "b": 11.0}, perplexities, "mean") == (9.0,)
    assert objective_directions(perplexities, "mean") == ("minimize",)


def test_per_task_keeps_each_direction_and_order() -> None:
    mixed = [task("a"), task("b", "perplexity"), task("c", "loglik")]
    scores = {"c": -1.5, "a": 0.4, "b": 8.0, "extra": 3.0}
    assert objective_values(scores, mixed, "per_task") == (0.4, 8.0, -1.5)
    assert objective_directions(mixed, "per_task") == ("maximize", "minimize", "maximize")


def test_mixing_directions_in_one_value_is_refused() -> None:
    mixed = [task("acc"), task("ppl", "perplexity")]
    for mode in ("mean", "min"):
        with pytest.raises(FitnessError, match=r"higher-is-better tasks \(acc\) with lower-is-better tasks \(ppl\)"):
            objective_directions(mixed, mode)
        with pytest.raises(FitnessError, match="use mode 'per_task'"):
            objective_values({"acc": 0.5, "ppl": 3.0}, mixed, mode)


def test_bad_inputs_are_named() -> None:
    with pytest.raises(FitnessError, match="unknown mode 'median'"):
        objective_values(SCORES, ACCURACY, "median")
    with pytest.raises(FitnessError, match="no score for task 'refunds'"):
        objective_values({"shipping": 0.5, "catalog": 0.1}, ACCURACY, "mean")
    with pytest.raises(FitnessError, match="the score for task 'shipping' is NaN"):
        objective_values({**SCORES, "shipping": float("nan")}, ACCURACY, "mean")
    with pytest.raises(FitnessError, match="repeated: a"):
        objective_directions([task("a"), task("a")], "mean")
    with pytest.raises(FitnessError, match="no tasks"):
        objective_directions([], "mean")


@given(
    values=st.lists(st.tuples(st.floats(0, 1), st.floats(0.1, 10)), min_size=1, max_size=6),
)
def test_mean_lies_between_the_worst_and_best_task(values: list[tuple[float, float]]) -> None:
    tasks = [task(f"t{i}", weight=weight) for i, (_, weight) in enumerate(values)]
    scores = {f"t{i}": score for i, (score, _) in enumerate(values)}
    (mean,) = objective_values(scores, tasks, "mean")
    (worst,) = objective_values(scores, tasks, "min")
    assert worst == min(scores.values())
    assert worst - 1e-12 <= mean <= max(scores.values()) + 1e-12
    # scaling every weight by the same factor changes nothing
    doubled = [task(t.name, weight=t.weight * 2) for t in tasks]
    assert objective_values(scores, doubled, "mean") == pytest.approx((mean,))
