"""benchmarks/fidelity.py: the equal-wall budget (whole generations, nearest the full run's loop time)."""

from __future__ import annotations

from benchmarks.fidelity import equal_wall_budget


def test_equal_wall_budget_rounds_to_the_nearest_generation() -> None:
    # 48 trials, multi 1.6x faster: 76.8 trials' worth -> 4.8 generations of 16 -> 5 (flooring gave 4)
    assert equal_wall_budget(48, 16.0, 10.0, 16) == 80
    # 4.2 generations -> 4: nearest, not up
    assert equal_wall_budget(48, 14.0, 10.0, 16) == 64
    # the projected loop time of the chosen budget is the nearest of its neighbours'
    for full, multi in [(15.84, 9.43), (18.78, 10.89), (18.55, 13.21), (18.75, 11.64)]:
        budget = equal_wall_budget(48, full, multi, 16)
        projected = [abs(b * multi / 48 - full) for b in (budget - 16, budget, budget + 16)]
        assert projected[1] == min(projected)


def test_equal_wall_budget_keeps_one_generation_and_whole_trials_without_cmaes() -> None:
    assert equal_wall_budget(48, 1.0, 100.0, 16) == 16  # multi far slower: still one generation
    assert equal_wall_budget(48, 15.0, 10.0, 1) == 72  # one trial a generation (not CMA-ES)
