"""fitness.gates: sign and margin at, above and below each limit, both directions."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fitness.errors import FitnessError
from fitness.gates import GateLimit, GateResult, GateSpec, evaluate_gates, gate_limits, gate_names

SOURCES = {
    "shipper": {"acc": 0.80, "ppl": 12.0},
    "refunder": {"acc": 0.60, "ppl": 9.0},
}
DIRECTIONS = {"acc": True, "ppl": False}


def one(gate: GateSpec, score: float, task: str) -> GateResult:
    [result] = evaluate_gates([gate], {task: score}, SOURCES, DIRECTIONS)
    return result


@pytest.mark.parametrize(
    ("score", "margin"),
    [(0.5, 0.0), (0.75, 0.25), (0.25, -0.25)],
    ids=["at", "above", "below"],
)
def test_min_on_a_higher_is_better_task(score: float, margin: float) -> None:
    result = one(GateSpec("acc", min=0.5), score, "acc")
    assert result == GateResult("acc.min", -margin if margin else 0.0, margin, margin >= 0, score, 0.5, True)


@pytest.mark.parametrize(
    ("score", "margin"),
    [(10.0, 0.0), (8.5, 1.5), (11.0, -1.0)],
    ids=["at", "better", "worse"],
)
def test_min_on_a_lower_is_better_task_is_a_ceiling(score: float, margin: float) -> None:
    result = one(GateSpec("ppl", min=10.0), score, "ppl")
    assert result == GateResult("ppl.min", -margin if margin else 0.0, margin, margin >= 0, score, 10.0, False)


@pytest.mark.parametrize(
    ("against", "score", "margin"),
    [
        ("best", 0.75, 0.0),  # best source 0.80, allowed drop 0.05
        ("best", 0.90, 0.15),
        ("best", 0.70, -0.05),
        ("refunder", 0.55, 0.0),  # named source 0.60
        ("refunder", 0.75, 0.20),
        ("refunder", 0.50, -0.05),
    ],
)
def test_max_regression_higher_is_better(against: str, score: float, margin: float) -> None:
    result = one(GateSpec("acc", max_regression=0.05, against=against), score, "acc")
    assert result.name == "acc.max_regression"
    assert result.margin == pytest.approx(margin, abs=1e-12)
    assert result.constraint == pytest.approx(-margin, abs=1e-12)
    assert result.passed is (margin >= 0)
    if margin == 0.0:  # exactly at the limit (up to float rounding): passes with constraint 0
        assert result.constraint == 0.0 and result.margin == 0.0 and result.passed


@pytest.mark.parametrize(
    ("against", "score", "margin"),
    [
        ("best", 10.0, 0.0),  # best (lowest) source 9.0, allowed rise 1.0
        ("best", 8.0, 2.0),
        ("best", 10.5, -0.5),
        ("shipper", 13.0, 0.0),  # named source 12.0
        ("shipper", 12.5, 0.5),
        ("shipper", 14.0, -1.0),
    ],
)
def test_max_regression_lower_is_better(against: str, score: float, margin: float) -> None:
    result = one(GateSpec("ppl", max_regression=1.0, against=against), score, "ppl")
    assert (result.margin, result.constraint, result.passed) == (margin, -margin if margin else 0.0, margin >= 0)


def test_both_limits_give_two_gates_in_name_order() -> None:
    gates = [GateSpec("acc", min=0.7, max_regression=0.1), GateSpec("ppl", max_regression=0.0, against="refunder")]
    names = gate_names(gates)
    assert names == ["acc.min", "acc.max_regression", "ppl.max_regression"]
    results = evaluate_gates(gates, {"acc": 0.72, "ppl": 9.5}, SOURCES, DIRECTIONS)
    assert [r.name for r in results] == names
    assert [r.passed for r in results] == [True, True, False]
    assert results[2].margin == -0.5


def test_limits_name_their_reference_source_and_its_score() -> None:
    gates = [GateSpec("acc", min=0.7, max_regression=0.1), GateSpec("ppl", max_regression=1.0)]
    assert gate_limits(gates, SOURCES, DIRECTIONS) == [
        GateLimit("acc.min", "acc", "min", 0.7, 0.7, True),
        GateLimit("acc.max_regression", "acc", "max_regression", 0.1, pytest.approx(0.7), True,
                  reference="shipper", reference_score=0.80),
        GateLimit("ppl.max_regression", "ppl", "max_regression", 1.0, 10.0, False,
                  reference="refunder", reference_score=9.0),  # lower is better: the lowest source
    ]
    # every result carries the score and the limit it was checked against
    results = evaluate_gates(gates, {"acc": 0.72, "ppl": 9.5}, SOURCES, DIRECTIONS)
    assert [(r.score, r.limit) for r in results] == [(0.72, 0.7), (0.72, pytest.approx(0.7)), (9.5, 10.0)]


@given(
    score=st.floats(-100, 100, allow_nan=False),
    limit=st.floats(-100, 100, allow_nan=False),
    higher=st.booleans(),
)
def test_margin_is_signed_distance_to_the_limit(score: float, limit: float, higher: bool) -> None:
    [result] = evaluate_gates([GateSpec("t", min=limit)], {"t": score}, {}, {"t": higher})
    expected = score - limit if higher else limit - score
    assert result.margin == pytest.approx(expected, abs=1e-9)
    assert result.constraint == -result.margin or (result.constraint == 0.0 and result.margin == 0.0)
    assert result.passed is (result.constraint <= 0)
    assert result.passed is (result.margin >= 0)


@given(
    scores=st.lists(st.floats(0, 1), min_size=2, max_size=2),
    regression=st.floats(0, 0.5),
)
def test_best_is_the_strictest_reference(scores: list[float], regression: float) -> None:
    sources = {"a": {"t": 0.3}, "b": {"t": 0.9}}
    for higher in (True, False):
        gate = GateSpec("t", max_regression=regression)
        for score in scores:
            [best] = evaluate_gates([gate], {"t": score}, sources, {"t": higher})
            for label in sources:
                named = GateSpec("t", max_regression=regression, against=label)
                [each] = evaluate_gates([named], {"t": score}, sources, {"t": higher})
                assert best.margin <= each.margin + 1e-12


def test_bad_gates_are_named() -> None:
    with pytest.raises(FitnessError, match="gate on task 'acc': set min, max_regression, or both"):
        GateSpec("acc")
    with pytest.raises(FitnessError, match="max_regression must be a finite number >= 0"):
        GateSpec("acc", max_regression=-0.1)
    with pytest.raises(FitnessError, match="gate 'acc.min' is defined twice"):
        gate_names([GateSpec("acc", min=0.1), GateSpec("acc", min=0.2)])
    with pytest.raises(FitnessError, match="against source 'nobody' has no scores"):
        evaluate_gates([GateSpec("acc", max_regression=0.1, against="nobody")], {"acc": 0.5}, SOURCES, DIRECTIONS)
    with pytest.raises(FitnessError, match="gate on task 'acc': the candidate has no score"):
        evaluate_gates([GateSpec("acc", min=0.1)], {}, SOURCES, DIRECTIONS)
    with pytest.raises(FitnessError, match="gate on task 'typo': no such task"):
        evaluate_gates([GateSpec("typo", min=0.1)], {"typo": 0.5}, SOURCES, DIRECTIONS)
    with pytest.raises(FitnessError, match="source 'shipper' has no score for task 'new'"):
        evaluate_gates([GateSpec("new", max_regression=0.1)], {"new": 0.5}, SOURCES, {"new": True})
    with pytest.raises(FitnessError, match="against 'best' needs source scores"):
        evaluate_gates([GateSpec("acc", max_regression=0.1)], {"acc": 0.5}, {}, DIRECTIONS)
    with pytest.raises(FitnessError, match="score is NaN"):
        evaluate_gates([GateSpec("acc", min=0.1)], {"acc": float("nan")}, SOURCES, DIRECTIONS)
