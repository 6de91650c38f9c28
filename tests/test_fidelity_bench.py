"""benchmarks/fidelity.py: when the equal-wall run stops (whole generations, nearest the full run's loop time)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from benchmarks.fidelity import another_generation


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
