"""Multi-fidelity schedules and the stopping rule (fitness/fidelity.py) on constructed per-example data."""

from __future__ import annotations

import math
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fitness.errors import FitnessError
from fitness.fidelity import (
    PROMOTE,
    STOP,
    FidelityConfig,
    decide,
    rank_stop,
    rows_to_score,
    stage_rows,
    stage_sizes,
    study_row_order,
)
from fitness.gates import KIND_MAX_REGRESSION, KIND_MIN, GateLimit

CONFIG = FidelityConfig(first_stage=60, growth=3.0, confidence=0.95, resamples=1000)
UP = {"a": True, "b": True}


def bernoulli(seed: int, rate: float, rows: int) -> np.ndarray:
    return (np.random.default_rng(seed).random(rows) < rate).astype(float)


# -- row order and stages ------------------------------------------------------------


@settings(max_examples=60)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=5), seed=st.integers(0, 2**32))
def test_row_order_is_seeded_complete_and_stratified(sizes: list[int], seed: int) -> None:
    tasks = {f"t{i}": n for i, n in enumerate(sizes)}
    order = study_row_order(tasks, seed)
    assert order == study_row_order(dict(tasks), seed)  # a resumed study rebuilds the same order
    assert sorted(order) == sorted((task, row) for task, n in tasks.items() for row in range(n))
    total = sum(sizes)
    counts: Counter[str] = Counter()
    for m, (task, _) in enumerate(order, start=1):  # every prefix: each task within two rows of its share
        counts[task] += 1
        for name, n in tasks.items():
            assert abs(counts[name] - m * n / total) < 2, (m, name)


def test_row_order_depends_on_the_seed_and_the_task() -> None:
    order = study_row_order({"a": 50, "b": 50}, 0)
    assert order != study_row_order({"a": 50, "b": 50}, 1)
    rows_a = [row for task, row in order if task == "a"]
    assert rows_a != [row for task, row in order if task == "b"] and rows_a != list(range(50))


@given(total=st.integers(1, 5000), first=st.integers(2, 300), growth=st.floats(1.1, 8.0))
def test_stages_grow_to_every_row(total: int, first: int, growth: float) -> None:
    sizes = stage_sizes(total, FidelityConfig(first_stage=first, growth=growth))
    assert sizes[0] == min(first, total) and sizes[-1] == total
    steps = list(zip(sizes, sizes[1:], strict=False))
    assert all(later > earlier for earlier, later in steps)
    exact = Fraction(repr(growth))  # the growth as written (1.1 is 11/10)
    assert all(later <= max(earlier + 1, math.ceil(earlier * exact)) for earlier, later in steps)


def test_stage_sizes_example() -> None:
    assert stage_sizes(600, FidelityConfig(first_stage=60, growth=3.0)) == (60, 180, 540, 600)


@settings(max_examples=60)
@given(sizes=st.lists(st.integers(1, 30), min_size=1, max_size=3), seed=st.integers(0, 2**16), data=st.data())
def test_a_resumed_trial_continues_the_same_rows_and_never_double_counts(sizes: list[int], seed: int,
                                                                         data: st.DataObject) -> None:
    tasks = {f"t{i}": n for i, n in enumerate(sizes)}
    schedule = stage_sizes(sum(sizes), FidelityConfig(first_stage=2, growth=2.0))
    held: dict[str, list[int]] = {task: [] for task in tasks}  # what the trial's stored results hold
    for size in schedule:
        todo = rows_to_score(study_row_order(tasks, seed), size, {t: len(r) for t, r in held.items()})
        flat = [(task, row) for task, rows in todo.items() for row in rows]
        killed_after = data.draw(st.integers(0, len(flat)))  # SIGKILL mid-stage: a prefix was stored
        for task, row in flat[:killed_after]:
            held[task].append(row)
        # the restarted driver rebuilds the order and asks again
        rest = rows_to_score(study_row_order(tasks, seed), size, {t: len(r) for t, r in held.items()})
        for task, rows in rest.items():
            held[task].extend(rows)
        assert held == stage_rows(study_row_order(tasks, seed), size)
    assert {task: sorted(rows) for task, rows in held.items()} == {t: list(range(n)) for t, n in tasks.items()}


def test_stored_rows_beyond_the_task_are_refused() -> None:
    order = study_row_order({"a": 5}, 0)
    with pytest.raises(FitnessError, match="task 'a': 6 stored rows, the task has 5"):
        rows_to_score(order, 5, {"a": 6})
    with pytest.raises(FitnessError, match="unknown task 'z'"):
        rows_to_score(order, 5, {"z": 1})


# -- the stopping rule --------------------------------------------------------------------


def pair(seed: int, rows: int, trial_rate: float, incumbent_rate: float) -> tuple[np.ndarray, np.ndarray]:
    """A trial and an incumbent on the same rows: both right on easy rows, differing on a few."""
    rng = np.random.default_rng(seed)
    u = rng.random(rows)
    return (u < trial_rate).astype(float), (u < incumbent_rate).astype(float)


@pytest.mark.parametrize("objective", ["mean", "min"])
def test_a_clearly_worse_trial_is_stopped_a_better_one_and_a_tie_promoted(objective: str) -> None:
    worse_a, best_a = pair(1, 40, 0.35, 0.7)
    worse_b, best_b = pair(2, 40, 0.4, 0.75)
    incumbent = {"a": best_a, "b": best_b}
    stopped = decide({"a": worse_a, "b": worse_b}, [incumbent], [], objective=objective, directions=UP,
                     config=CONFIG)
    assert stopped.action == STOP and "cannot reach" in stopped.reason
    assert stopped.rows == {"a": 40, "b": 40} and stopped.estimate["a"] == pytest.approx(worse_a.mean())
    better = decide(incumbent, [{"a": worse_a, "b": worse_b}], [], objective=objective, directions=UP, config=CONFIG)
    assert better.action == PROMOTE and better.reason == ""
    tie = decide(dict(incumbent), [incumbent], [], objective=objective, directions=UP, config=CONFIG)
    assert tie.action == PROMOTE


def test_a_trial_is_compared_on_its_own_rows_only() -> None:
    # the incumbent was scored on every row; the first 40 (the trial's) are where it is no better
    trial = bernoulli(3, 0.5, 40)
    incumbent = np.concatenate([trial, np.ones(360)])
    decision = decide({"a": trial}, [{"a": incumbent}], [], objective="mean", directions={"a": True}, config=CONFIG)
    assert decision.action == PROMOTE
    with pytest.raises(FitnessError, match="incumbent 0 has 20 rows of task 'a'; the trial has 40"):
        decide({"a": trial}, [{"a": trial[:20]}], [], objective="mean", directions={"a": True}, config=CONFIG)


def test_a_trial_must_be_worse_than_every_incumbent_given() -> None:
    worse, best = pair(4, 60, 0.3, 0.8)
    _, close = pair(4, 60, 0.3, 0.33)
    decision = decide({"a": worse}, [{"a": best}, {"a": close}], [], objective="mean", directions={"a": True},
                      config=CONFIG)
    assert decision.action == PROMOTE  # it may still enter a top-2
    assert decide({"a": worse}, [{"a": best}], [], objective="mean", directions={"a": True},
                  config=CONFIG).action == STOP


def test_lower_is_better_tasks_stop_the_higher_scoring_trial() -> None:
    rng = np.random.default_rng(5)
    base = rng.normal(3.0, 1.0, 50)  # per-row perplexity-like scores
    directions = {"a": False}
    assert decide({"a": base + 0.5}, [{"a": base}], [], objective="min", directions=directions,
                  config=CONFIG).action == STOP
    assert decide({"a": base - 0.5}, [{"a": base}], [], objective="min", directions=directions,
                  config=CONFIG).action == PROMOTE


def test_per_task_stops_only_when_dominated_with_confidence() -> None:
    worse_a, best_a = pair(6, 60, 0.3, 0.8)
    worse_b, best_b = pair(7, 60, 0.3, 0.8)
    front = [{"a": best_a, "b": best_b}]
    dominated = decide({"a": worse_a, "b": worse_b}, front, [], objective="per_task", directions=UP, config=CONFIG)
    assert dominated.action == STOP and "dominated by incumbent 0" in dominated.reason
    trade_off = decide({"a": best_a, "b": worse_b}, [{"a": worse_a, "b": best_b}], [], objective="per_task",
                       directions=UP, config=CONFIG)
    assert trade_off.action == PROMOTE  # better on a, worse on b: on the front
    worse_on_one = decide({"a": best_a, "b": worse_b}, front, [], objective="per_task", directions=UP, config=CONFIG)
    assert worse_on_one.action == PROMOTE  # equal on a: not dominated with confidence
    # mixed directions are fine in per_task and refused by mean / min
    with pytest.raises(FitnessError, match="one direction"):
        decide({"a": best_a, "b": worse_b}, front, [], objective="min", directions={"a": True, "b": False},
               config=CONFIG)


def test_tasks_with_fewer_than_two_rows_never_stop_a_trial() -> None:
    decision = decide({"a": np.zeros(30), "b": np.zeros(1)}, [{"a": np.ones(30), "b": np.ones(1)}], [],
                      objective="min", directions=UP, config=CONFIG)
    assert decision.action == PROMOTE and decision.rows == {"a": 30, "b": 1}


# -- the rank rule (rule = "rank") -----------------------------------------------------------


def rated(rate: float, rows: int = 20) -> np.ndarray:
    """``rows`` 0/1 rows with exactly ``round(rate * rows)`` ones (estimates known exactly)."""
    return (np.arange(rows) < round(rate * rows)).astype(float)


HALF, THIRD, TWO_THIRDS = Fraction(1, 2), Fraction(1, 3), Fraction(2, 3)
RANK = FidelityConfig(first_stage=60, growth=2.0, confidence=0.95, resamples=1000, rule="rank")


def test_rank_keeps_the_best_floor_n_over_growth_and_ties_with_them() -> None:
    peers = [{"a": rated(r)} for r in (0.2, 0.4, 0.6, 0.8, 0.9)]  # with the trial: 6 at the stage, 3 go on
    up = {"a": True}
    assert rank_stop({"a": rated(0.95)}, peers, objective="mean", directions=up, share=HALF) == ""
    assert rank_stop({"a": rated(0.7)}, peers, objective="mean", directions=up, share=HALF) == ""  # 3rd
    assert rank_stop({"a": rated(0.6)}, peers, objective="mean", directions=up, share=HALF) == ""  # tie: 2 better
    reason = rank_stop({"a": rated(0.5)}, peers, objective="mean", directions=up, share=HALF)
    assert reason.startswith("not among the best 3 of the 6 trials at this stage (3 better;")
    # lower is better: the same rows ranked the other way
    assert rank_stop({"a": rated(0.5)}, peers, objective="mean", directions={"a": False}, share=HALF) == ""
    assert rank_stop({"a": rated(0.85)}, peers, objective="mean", directions={"a": False}, share=HALF) != ""


def test_rank_promotes_every_trial_while_fewer_than_growth_reached_the_stage() -> None:
    worst = {"a": rated(0.0)}
    assert rank_stop(worst, [{"a": rated(1.0)}], objective="mean", directions={"a": True}, share=THIRD) == ""
    assert rank_stop(worst, [{"a": rated(1.0)}] * 2, objective="mean", directions={"a": True}, share=THIRD) != ""
    assert rank_stop(worst, [], objective="min", directions={"a": True}, share=TWO_THIRDS) == ""


def test_rank_compares_the_peers_on_the_trial_rows_only() -> None:
    # each peer is better on the trial's 20 rows only after them: cut to 20 rows they are all worse
    peers = [{"a": np.concatenate([rated(0.1), np.ones(40)])} for _ in range(3)]
    assert rank_stop({"a": rated(0.5)}, peers, objective="mean", directions={"a": True}, share=HALF) == ""
    with pytest.raises(FitnessError, match="peer 0 has 10 rows of task 'a'; the trial has 20"):
        rank_stop({"a": rated(0.5)}, [{"a": rated(0.5, 10)}], objective="mean", directions={"a": True}, share=HALF)


def test_rank_by_the_objective_of_the_task_means() -> None:
    # min: the weakest task decides (the trial's 0.3 on b ranks it below peers it beats on the mean)
    peers = [{"a": rated(0.5), "b": rated(0.5)}, {"a": rated(0.45), "b": rated(0.45)}]
    trial = {"a": rated(1.0), "b": rated(0.3)}
    assert rank_stop(trial, peers, objective="min", directions=UP, share=TWO_THIRDS) != ""
    assert rank_stop(trial, peers, objective="mean", directions=UP, share=TWO_THIRDS) == ""
    assert rank_stop(trial, peers, objective="mean", directions=UP, share=TWO_THIRDS, weights={"a": 1.0, "b": 9.0}) != ""


def test_rank_per_task_by_pareto_layers() -> None:
    front = [{"a": rated(0.9), "b": rated(0.2)}, {"a": rated(0.2), "b": rated(0.9)}, {"a": rated(0.6), "b": rated(0.6)}]
    second = [{"a": rated(0.5), "b": rated(0.5)}, {"a": rated(0.1), "b": rated(0.8)}]
    peers = front + second  # 6 at the stage with the trial, 3 go on: the front
    on_front = {"a": rated(1.0), "b": rated(0.1)}  # best on a: on the front whatever else
    assert rank_stop(on_front, peers, objective="per_task", directions=UP, share=HALF) == ""
    layer_two = {"a": rated(0.55), "b": rated(0.55)}  # dominated by (0.6, 0.6) only
    reason = rank_stop(layer_two, peers, objective="per_task", directions=UP, share=HALF)
    assert "(3 better; Pareto layer 2" in reason
    assert rank_stop(layer_two, peers, objective="per_task", directions=UP, share=TWO_THIRDS) == ""  # 4 of 6 go on


def test_rule_rank_stops_what_the_test_promotes_and_rule_test_ignores_peers() -> None:
    trial = {"a": rated(0.5, 40), "b": rated(0.5, 40)}
    incumbent = {"a": rated(0.55, 40), "b": rated(0.55, 40)}  # not surely better on 40 rows
    peers = [incumbent] * 3
    test = decide(trial, [incumbent], [], objective="min", directions=UP, config=CONFIG, peers_rows=peers)
    assert test.action == PROMOTE
    ranked = decide(trial, [incumbent], [], objective="min", directions=UP, config=RANK, peers_rows=peers)
    assert ranked.action == STOP and ranked.reason.startswith("not among the best 2 of the 4 trials")
    assert ranked.estimate == {"a": 0.5, "b": 0.5} and ranked.rows == {"a": 40, "b": 40}
    assert decide(incumbent, [incumbent], [], objective="min", directions=UP, config=RANK,
                  peers_rows=[trial] * 3).action == PROMOTE
    # the paired test still stops a trial the rank keeps (fewer than growth at the stage)
    worse = {"a": rated(0.1, 40), "b": rated(0.1, 40)}
    assert decide(worse, [incumbent], [], objective="min", directions=UP, config=RANK).action == STOP


GATE = GateLimit(name="a.min", task="a", kind=KIND_MIN, setting=0.3, limit=0.3, higher_is_better=True)


@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_a_gate_stops_a_trial_at_its_limit_no_more_often_than_the_confidence_allows(confidence: float) -> None:
    config = FidelityConfig(first_stage=60, confidence=confidence, resamples=1000)
    runs = 400
    stops = sum(decide({"a": bernoulli(30_000 + sim, 0.3, 60)}, [], [GATE], objective="mean",
                       directions={"a": True}, config=config, seed=sim).stopped for sim in range(runs))
    allowed = 1 - confidence
    assert stops / runs <= allowed + 3 * math.sqrt(allowed * (1 - allowed) / runs), stops


def test_a_failed_gate_stops_only_with_confidence() -> None:
    clearly = decide({"a": bernoulli(8, 0.1, 60)}, [], [GATE], objective="mean", directions={"a": True}, config=CONFIG)
    assert clearly.action == STOP and clearly.reason.startswith("gate a.min failed with 95% confidence")
    narrowly = np.array([1.0] * 8 + [0.0] * 22)  # 0.267 on 30 rows: below 0.3, but not surely
    assert decide({"a": narrowly}, [], [GATE], objective="mean", directions={"a": True},
                  config=CONFIG).action == PROMOTE


def test_max_regression_is_paired_with_the_reference_rows() -> None:
    rng = np.random.default_rng(9)
    reference = (rng.random(80) < 0.7).astype(float)
    trial = reference.copy()
    trial[np.flatnonzero(reference)[:12]] = 0.0  # 12 of 80 rows lost: a regression of 0.15
    gate = GateLimit(name="a.max_regression", task="a", kind=KIND_MAX_REGRESSION, setting=0.05,
                     limit=0.7 - 0.05, higher_is_better=True, reference="s1", reference_score=0.7)
    paired = decide({"a": trial}, [], [gate], objective="mean", directions={"a": True}, config=CONFIG,
                    sources_rows={"s1": {"a": reference}})
    assert paired.action == STOP and "a.max_regression" in paired.reason
    held = decide({"a": reference}, [], [gate], objective="mean", directions={"a": True}, config=CONFIG,
                  sources_rows={"s1": {"a": reference}})
    assert held.action == PROMOTE


def test_bad_settings_are_refused() -> None:
    with pytest.raises(FitnessError, match="first_stage must be >= 2, got 1"):
        FidelityConfig(first_stage=1)
    with pytest.raises(FitnessError, match="growth must be > 1, got 1.0"):
        FidelityConfig(first_stage=10, growth=1.0)
    with pytest.raises(FitnessError, match="confidence must be in"):
        FidelityConfig(first_stage=10, confidence=1.0)
    with pytest.raises(FitnessError, match="rule must be one of 'test', 'rank', got 'asha'"):
        FidelityConfig(first_stage=10, rule="asha")
    with pytest.raises(FitnessError, match="promote is the rank rule's share of trials promoted; set rule = 'rank'"):
        FidelityConfig(first_stage=10, promote=0.2)
    with pytest.raises(FitnessError, match="promote must be in"):
        FidelityConfig(first_stage=10, rule="rank", promote=1.0)
    with pytest.raises(FitnessError, match="unknown objective 'median'"):
        decide({"a": [1.0, 0.0]}, [], [], objective="median", directions={"a": True}, config=CONFIG)
    with pytest.raises(FitnessError, match="no rows of task 'b'"):
        decide({"a": [1.0, 0.0]}, [], [], objective="mean", directions=UP, config=CONFIG)
    with pytest.raises(FitnessError, match="no direction for task 'c'"):
        decide({"a": [1.0, 0.0], "c": [1.0, 0.0]}, [], [], objective="mean", directions={"a": True}, config=CONFIG)


def test_resamples_default_is_the_intervals_default() -> None:
    # fitness.fidelity keeps its own copy so that search.config imports no numpy (search status)
    from fitness import fidelity, intervals

    assert fidelity.RESAMPLES == intervals.RESAMPLES


def test_the_schedule_in_words_lists_every_stage() -> None:
    from fitness.fidelity import describe_schedule

    text = describe_schedule(600, FidelityConfig(first_stage=60))
    assert text.startswith("4 stage(s) of 60, 180, 540, 600 search rows (first_stage 60, growth 3)")
    assert "each test at 95% confidence (a trial meets one per stage but the last: 3)" in text
    assert "rule rank" not in text
    ranked = describe_schedule(600, FidelityConfig(first_stage=60, rule="rank"))
    assert ranked.endswith("or when it is not among the best 0.333 of the trials finished at that stage (rule rank)")
    assert FidelityConfig(first_stage=60, growth=2.0, rule="rank").promoted_share == Fraction(1, 2)
    assert FidelityConfig(first_stage=60, rule="rank", promote=0.2).promoted_share == Fraction(1, 5)
