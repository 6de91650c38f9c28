"""Paired bootstrap intervals (fitness/intervals.py): coverage, pairing, degenerate rows, the preference rule.

Coverage is checked on 400 simulated data sets with fixed seeds: the count is deterministic,
and the bound (3 binomial standard deviations around 0.95) is what a correct 95% interval
meets; a broken one (unpaired, wrong quantiles, a shared seed) falls far outside it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fitness.errors import FitnessError
from fitness.intervals import (
    Interval,
    difference_interval,
    mean_interval,
    objective_difference_interval,
    objective_interval,
    prefer,
    resampled_task_means,
)

SIMULATIONS = 400
TOLERANCE = 3 * math.sqrt(0.95 * 0.05 / SIMULATIONS)  # ~0.033


def test_mean_interval_covers_the_true_rate_at_the_nominal_rate() -> None:
    truth, rows = 0.31, 80  # exact-match-like 0/1 rows (0.31: not a multiple of 1/80)
    covered = 0
    for sim in range(SIMULATIONS):
        data = (np.random.default_rng(10_000 + sim).random(rows) < truth).astype(float)
        interval = mean_interval(data, resamples=1000, seed=sim)
        covered += interval.low <= truth <= interval.high
    assert abs(covered / SIMULATIONS - 0.95) <= TOLERANCE, covered


def correlated_pair(rng: np.random.Generator, rows: int, gain: float) -> tuple[np.ndarray, np.ndarray]:
    """Two trials on the same rows: a shared row difficulty, small trial noise, a true mean gain."""
    difficulty = rng.normal(0.0, 1.0, rows)
    return difficulty + gain + rng.normal(0.0, 0.3, rows), difficulty + rng.normal(0.0, 0.3, rows)


def test_paired_difference_covers_the_true_gain_at_the_nominal_rate() -> None:
    covered = 0
    for sim in range(SIMULATIONS):
        a, b = correlated_pair(np.random.default_rng(20_000 + sim), 60, 0.1)
        interval = difference_interval(a, b, resamples=1000, seed=sim)
        covered += interval.low <= 0.1 <= interval.high
    assert abs(covered / SIMULATIONS - 0.95) <= TOLERANCE, covered


def test_paired_interval_is_narrower_than_unpaired_on_correlated_rows() -> None:
    a, b = correlated_pair(np.random.default_rng(3), 200, 0.1)
    paired = difference_interval(a, b, seed=0)
    # unpaired: each trial's rows drawn independently
    _, draws_a = resampled_task_means([{"t": a}], seed=1)
    _, draws_b = resampled_task_means([{"t": b}], seed=2)
    low, high = np.quantile(draws_a["t"][:, 0] - draws_b["t"][:, 0], [0.025, 0.975])
    assert paired.high - paired.low < 0.5 * (high - low)
    assert paired.low > 0 and low < 0  # the pairing is what makes the gain visible
    assert prefer(paired)


def test_same_seed_same_interval_and_pairing_is_per_row() -> None:
    a, b = correlated_pair(np.random.default_rng(5), 50, 0.0)
    assert difference_interval(a, b, seed=7) == difference_interval(a, b, seed=7)
    assert difference_interval(a, b, seed=7) != difference_interval(a, b, seed=8)
    swapped = difference_interval(b, a, seed=7)
    forward = difference_interval(a, b, seed=7)
    assert swapped.estimate == pytest.approx(-forward.estimate)
    assert swapped.low == pytest.approx(-forward.high) and swapped.high == pytest.approx(-forward.low)


def test_all_equal_rows_give_a_zero_width_interval() -> None:
    assert mean_interval([0.5] * 30) == Interval(0.5, 0.5, 0.5, 0.95)
    same = difference_interval([1.0, 0.0, 1.0, 1.0], [1.0, 0.0, 1.0, 1.0])
    assert (same.low, same.high) == (0.0, 0.0) and not prefer(same) and not prefer(same, higher_is_better=False)
    better_everywhere = difference_interval([1.0] * 20, [0.0] * 20)
    assert better_everywhere.low == 1.0 and prefer(better_everywhere)


def test_one_row_says_nothing_about_noise() -> None:
    one = mean_interval([0.7])
    assert one.estimate == 0.7 and one.low == -math.inf and one.high == math.inf
    difference = difference_interval([1.0], [0.0])
    assert not prefer(difference) and not prefer(difference, higher_is_better=False)
    # one task with a single row makes the whole objective unbounded
    assert objective_interval({"x": [1.0, 0.0, 1.0], "y": [1.0]}, objective="min").high == math.inf


def test_objective_difference_is_paired_per_task_and_follows_the_direction() -> None:
    rng = np.random.default_rng(11)
    a_x, b_x = correlated_pair(rng, 100, 0.5)
    a_y, b_y = correlated_pair(rng, 80, -0.05)
    a, b = {"x": a_x, "y": a_y}, {"x": b_x, "y": b_y}
    weakest = objective_difference_interval(a, b, objective="min")
    assert weakest.estimate == pytest.approx(min(a_x.mean(), a_y.mean()) - min(b_x.mean(), b_y.mean()))
    weighted = objective_difference_interval(a, b, objective="mean", weights={"x": 3.0, "y": 1.0})
    assert weighted.estimate == pytest.approx(0.75 * (a_x.mean() - b_x.mean()) + 0.25 * (a_y.mean() - b_y.mean()))
    assert prefer(weighted)
    # lower is better (perplexity-like): "min" is the weakest task, i.e. the highest mean
    worst = objective_difference_interval(a, b, objective="min", higher_is_better=False)
    assert worst.estimate == pytest.approx(max(a_x.mean(), a_y.mean()) - max(b_x.mean(), b_y.mean()))
    assert prefer(Interval(-1.0, -1.5, -0.5, 0.95), higher_is_better=False)
    assert not prefer(Interval(-1.0, -1.5, -0.5, 0.95))


def test_bad_rows_name_the_task_and_row() -> None:
    with pytest.raises(FitnessError, match="task 'x'.*same rows"):
        objective_difference_interval({"x": [1.0, 0.0]}, {"x": [1.0, 0.0, 1.0]}, objective="mean")
    with pytest.raises(FitnessError, match="task 'x': trial 0: row 1 is nan"):
        objective_interval({"x": [1.0, float("nan")]}, objective="mean")
    with pytest.raises(FitnessError, match="unknown objective 'median'"):
        objective_interval({"x": [1.0, 0.0]}, objective="median")
    with pytest.raises(FitnessError, match="trial 1 has tasks"):
        objective_difference_interval({"x": [1.0, 0.0]}, {"y": [1.0, 0.0]}, objective="mean")


def test_bootstrap_means_are_numpys_fancy_index_mean_bit_for_bit() -> None:
    # the draws decide which trials a study stops (fitness.fidelity): a faster mean must keep every bit.
    # Floats over 8 decades make the summation order visible (pairwise and row-by-row sums differ).
    rng = np.random.default_rng(17)
    for rows, width in [(2, 2), (9, 1), (9, 2), (33, 3), (200, 2), (600, 5), (4000, 2)]:
        trials = [{"t": rng.standard_normal(rows) * 10.0 ** rng.uniform(-4, 4, rows), "u": rng.random(3)}
                  for _ in range(width)]
        _, draws = resampled_task_means(trials, resamples=300, seed=5)
        stream = np.random.default_rng(5)  # the same draws, taken as the module takes them
        for task in ("t", "u"):
            columns = np.stack([np.asarray(trial[task]) for trial in trials], axis=1)
            block = max(1, (1 << 21) // columns.size)  # rows 4000 x 2: two blocks of draws
            expected = np.concatenate([
                columns[stream.integers(0, len(columns), size=(min(block, 300 - start), len(columns)))].mean(axis=1)
                for start in range(0, 300, block)])
            assert draws[task].shape == (300, width)
            assert np.array_equal(draws[task].view(np.int64), expected.view(np.int64)), (rows, width, task)
