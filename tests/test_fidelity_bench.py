"""benchmarks/fidelity.py: when the equal-wall run stops (whole generations, nearest the full run's loop time) and how
--combine pools runs; benchmarks/fidelity_calibration.py: how its stop rates are counted."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.fidelity import another_generation, combine
from benchmarks.fidelity_calibration import rates, stop_counts
from fitness.fidelity import FidelityConfig, decide


def test_another_generation_only_while_it_ends_nearer_the_target() -> None:
    assert another_generation(14.0, 7.0, 2.0)  # 7 s left: one more generation of 2 s ends nearer
    assert another_generation(14.0, 12.9, 2.0)  # 1.1 s left: 13.9 s is nearer than 12.9 s
    assert not another_generation(14.0, 13.1, 2.0)  # 0.9 s left: 15.1 s would be farther than 13.1 s
    assert not another_generation(14.0, 15.0, 2.0)  # already past it (multi slower): no more


@given(target=st.floats(1.0, 100.0), start=st.floats(0.1, 100.0), generation=st.floats(0.1, 5.0))
def test_the_continued_loop_ends_nearest_the_target(target: float, start: float, generation: float) -> None:
    # the benchmark's loop with generations of one length: it ends at the whole generation nearest the target
    loop = start
    while another_generation(target, loop, generation):
        loop += generation
    candidates = [loop - generation, loop, loop + generation] if loop > start else [loop, loop + generation]
    assert abs(loop - target) <= min(abs(c - target) for c in candidates) + 1e-9


def test_calibration_counts_each_pair_once_in_stage_order_with_the_real_test() -> None:
    config = FidelityConfig(first_stage=2, growth=2.0, confidence=0.8)
    rows = {number: {"t": np.asarray(values, dtype=np.float64)} for number, values in {
        0: [1, 1, 1, 1, 1, 1, 0, 0],  # the incumbent: .75 on every row
        1: [1, 1, 1, 1, 1, 1, 0, 0],  # the same rows: never stopped
        2: [0, 0, 0, 0, 0, 0, 0, 0],  # worse by .75: stopped at once
        3: [0, 0, 1, 1, 1, 1, 1, 1],  # as good (.75) but worse on the first rows: stopped wrongly at stage 1
        4: [1, 1, 1, 1, 1, 1, 1, 0],  # better (.875): ties on the first rows, never stopped
        5: [1, 1, 1, 1, 1, 0, 0, 0],  # worse by .125, inside --worse 0.2: in neither count
    }.items()}
    values = {number: float(r["t"].mean()) for number, r in rows.items()}

    def stops(a_rows, b_rows, a):
        return decide(dict(a_rows), [b_rows], [], objective="mean", directions={"t": True}, config=config,
                      seed=a).stopped

    counts = stop_counts(rows, values, [{"t": 2}, {"t": 4}], [0], stops, worse=0.2)
    assert counts == {"pairs": [3], "worse": [1], "tested": [3, 2], "stopped": [1, 0], "worse_stop": [1, 0]}
    assert rates(counts) == {"per_test": [0.3333, 0.0], "stopped_by": [0.3333, 0.3333], "power_by": [1.0, 1.0]}


def _summary(seeds: list[int], examples_multi: float, full: list[float], multi: list[float], equal: list[float],
             confidence: float = 0.8) -> dict[str, object]:
    return {"seeds": len(seeds), "seed_list": seeds, "examples_full": 600.0, "examples_multi": examples_multi,
            "heldout_min_full": full, "heldout_min_multi": multi, "heldout_min_multi_equal_wall": equal,
            "fidelity": {"first_stage": 10, "growth": 2.0, "confidence": confidence, "rule": "test", "promote": None}}


def test_combine_pools_the_seeds_of_several_runs() -> None:
    one = _summary([0, 1], 100.0, [0.8, 0.9], [0.8, 0.8], [0.85, 0.9])  # equal wall: one better, one equal
    two = _summary([5], 400.0, [0.7], [0.75], [0.6])
    combined = combine([("one", one), ("two", two)])
    assert combined["example_ratio"] == round(1800 / 600, 3)  # summed examples, not a mean of ratios (3.47)
    assert combined["seed_list"] == [0, 1, 5]
    del two["seed_list"]  # a run from before runs printed their seeds: which seeds is not known
    assert "seed_list" not in combine([("one", one), ("two", two)])
    assert combined["heldout_mean_difference"] == round((0.0 - 0.1 + 0.05) / 3, 4)
    assert combined["heldout_difference_se"] == round(float(np.std([0.0, -0.1, 0.05], ddof=1)) / 3 ** 0.5, 4)
    assert (combined["better_at_equal_wall"], combined["equal_at_equal_wall"]) == (1, 1)


def test_combine_refuses_another_schedule_or_a_seed_twice() -> None:
    one = _summary([0], 100.0, [0.8], [0.8], [0.85])
    with pytest.raises(SystemExit, match="two: schedule"):
        combine([("one", one), ("two", _summary([1], 100.0, [0.8], [0.8], [0.85], confidence=0.9))])
    with pytest.raises(SystemExit, match="two: seed 0 is in an earlier run"):
        combine([("one", one), ("two", _summary([0], 100.0, [0.8], [0.8], [0.85]))])
