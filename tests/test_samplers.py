"""What the sampler sees (search.samplers), on real Optuna studies in memory.

The driver places every search trial (user attrs ``position`` and ``horizon``) before it is
asked; these tests do the same, without models, and check that a draw depends only on the
study seed, the position and the trials before the horizon.
"""

from __future__ import annotations

import copy

import numpy as np
import optuna
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from search import ranking
from search.samplers import (
    HORIZON,
    POSITION,
    SAMPLERS,
    make_sampler,
    penalised,
    visible_trials,
)
from search.staged import FIDELITY_ATTR

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE = {f"w{i}": FloatDistribution(0.0, 1.0) for i in range(3)}


def objective(params: dict[str, float]) -> float:
    return -sum((v - 0.3 * i) ** 2 for i, (_, v) in enumerate(sorted(params.items())))


def place(study: optuna.Study, position: int, horizon: int) -> optuna.Trial:
    """Ask a new search trial at ``position`` the way the driver does."""
    study.enqueue_trial({}, user_attrs={"kind": "search", POSITION: position, HORIZON: horizon})
    return study.ask(fixed_distributions=SPACE)


def searched(study: optuna.Study, sampler: str, n: int, *, popsize: int = 4) -> None:
    """``n`` positions, asked as the driver asks them: CMA-ES in whole batches, others one by one."""
    position = len([t for t in study.get_trials() if POSITION in t.user_attrs])
    while position < n:
        size = min(popsize, n - position) if sampler == "cmaes" else 1
        asked = [place(study, position + i, position) for i in range(size)]
        for trial in asked:
            study.tell(trial, objective(trial.params))
        position += size


def new_study(name: str, seed: int = 3) -> optuna.Study:
    return optuna.create_study(
        direction="maximize", sampler=make_sampler(name, seed=seed, space=SPACE, population=4)
    )


def noise(number: int, *, kind: str = "baseline", failure: str | None = None) -> FrozenTrial:
    """A trial the sampler must not see: a baseline, or a run a stopped driver lost."""
    if failure is not None:
        trial = optuna.trial.create_trial(state=TrialState.FAIL, user_attrs={"kind": kind, "failure": failure})
    else:
        trial = optuna.trial.create_trial(value=123.0, user_attrs={"kind": kind, "baseline": f"b{number}"})
    return trial


@pytest.mark.parametrize("name", ["cmaes", "tpe", "random", "gp"])
def test_a_draw_depends_on_seed_position_and_the_trials_before_the_horizon_only(name: str) -> None:
    n = 12 if name != "tpe" else 13  # TPE leaves its 10 random startup trials behind
    plain = new_study(name)
    searched(plain, name, n)
    horizon = n
    expected = place(plain, n, horizon).params

    # Another process (a fresh sampler), trial numbers shifted by baselines and by runs a
    # killed driver lost.
    busy = new_study(name)
    for i in range(2):
        busy.add_trial(noise(i))
    for trial in plain.get_trials():
        if trial.user_attrs[POSITION] == 5:
            busy.add_trial(noise(0, kind="search", failure=ranking.DRIVER_STOPPED))
        if trial.state == TrialState.COMPLETE and trial.user_attrs[POSITION] < n:
            busy.add_trial(copy.deepcopy(trial))
    assert busy.get_trials()[-1].number != plain.get_trials()[-1].number
    assert place(busy, n, horizon).params == expected
    other = new_study(name, seed=4)
    searched(other, name, n)
    assert place(other, n, horizon).params != expected  # the seed matters


def test_cmaes_batch_drawn_after_part_of_it_finished_is_the_uninterrupted_one() -> None:
    # A killed driver told 2 of generation 1's 4 trials; the resumed one draws the other 2
    # with the horizon of the batch: they must be what the uninterrupted run drew.
    plain = new_study("cmaes")
    searched(plain, "cmaes", 4)
    batch = [place(plain, 4 + i, 4) for i in range(4)]
    expected = [t.params for t in batch]
    for trial in batch:
        plain.tell(trial, objective(trial.params))

    resumed = new_study("cmaes")
    searched(resumed, "cmaes", 4)
    first = [place(resumed, 4 + i, 4) for i in range(2)]
    for trial in first:
        resumed.tell(trial, objective(trial.params))
    resumed.sampler = make_sampler("cmaes", seed=3, space=SPACE, population=4)  # a new process
    rest = [place(resumed, 6 + i, 4) for i in range(2)]
    assert [t.params for t in first + rest] == expected
    generation = [t.system_attrs["cma:generation"] for t in plain.get_trials()]
    assert generation == [0] * 4 + [1] * 4


def trial_at(number: int, position: int | None, *, state: TrialState = TrialState.COMPLETE,
             value: float = 0.5, constraints: tuple[float, ...] = (0.0,), kind: str = "search",
             failure: str | None = None) -> FrozenTrial:
    attrs: dict[str, object] = {"kind": kind}
    if position is not None:
        attrs[POSITION] = position
    if failure:
        attrs["failure"] = failure
    trial = optuna.trial.create_trial(
        state=state, value=value if state == TrialState.COMPLETE else None, user_attrs=attrs,
        system_attrs={"constraints": list(constraints)},
    )
    trial.number = number
    return trial


def test_the_view_hides_baselines_and_lost_runs_and_shows_unfinished_positions_as_running() -> None:
    trials = [
        trial_at(0, None, kind="baseline"),
        trial_at(1, 0),
        trial_at(2, 1, state=TrialState.FAIL, failure=ranking.DRIVER_STOPPED),
        trial_at(3, 2, state=TrialState.FAIL, failure="scorer raised"),
        trial_at(4, 1, value=0.7),  # the re-run of position 1
        trial_at(5, 3, value=0.9),  # finished, but after the horizon
        trial_at(6, 4, state=TrialState.RUNNING),  # the trial being drawn
        trial_at(7, 5, state=TrialState.RUNNING),  # after it: not seen
    ]
    seen = visible_trials(trials, position=4, horizon=3, directions=None)
    assert [(t.number, t.state, t.value) for t in seen] == [
        (0, TrialState.COMPLETE, 0.5),
        (1, TrialState.COMPLETE, 0.7),
        (2, TrialState.FAIL, None),
        (3, TrialState.RUNNING, None),
        (4, TrialState.RUNNING, None),
    ]
    # The stored trials are untouched.
    assert trials[5].state == TrialState.COMPLETE and trials[5].value == 0.9 and trials[5].number == 5


@settings(deadline=None)
@given(
    st.lists(st.tuples(st.floats(-1, 1), st.lists(st.floats(-1, 1), min_size=1, max_size=3)), min_size=1, max_size=8),
    st.sampled_from(["maximize", "minimize"]),
    st.floats(3, 100),  # more than the spread of the values: every infeasible one ranks last
)
def test_cmaes_sees_infeasible_trials_penalised_and_below_every_feasible_one(
    rows: list[tuple[float, list[float]]], direction: str, scale: float
) -> None:
    trials = [trial_at(i, i, value=v, constraints=tuple(c)) for i, (v, c) in enumerate(rows)]
    seen = visible_trials(trials, position=len(rows), horizon=len(rows), directions=[direction], scale=scale)
    assert [t.number for t in seen] == list(range(len(rows)))
    sign = 1 if direction == "maximize" else -1
    for stored, shown in zip(trials, seen, strict=True):
        violation = sum(c for c in stored.constraints.values() if c > 0)
        assert shown.value == penalised(stored.value, violation, direction, scale)
        assert stored.value == rows[stored.number][0]  # what the study stores stays the real value
    feasible = [sign * s.value for s, t in zip(seen, trials, strict=True) if ranking.is_feasible(t)]
    infeasible = [sign * s.value for s, t in zip(seen, trials, strict=True) if not ranking.is_feasible(t)]
    if feasible and infeasible:
        assert max(infeasible) < min(feasible)


def stopped_at(number: int, stage: int, stages: int, estimate: float, constraints: tuple[float, ...]) -> FrozenTrial:
    """A search trial stopped after ``stage`` (stored PRUNED with its estimate, as ``search.loop`` does)."""
    trial = optuna.trial.create_trial(
        state=TrialState.PRUNED, user_attrs={"kind": "search", POSITION: number, FIDELITY_ATTR: {
            "stage": stage, "stages": stages, "rows": {"a": 10 * stage}, "estimate": {"a": estimate},
            "objective": [estimate], "stopped": "rank"}},
        system_attrs={"constraints": list(constraints)}, intermediate_values={stage: estimate},
    )
    trial.number = number
    return trial


@settings(deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 7), st.integers(0, 200).map(lambda k: k / 200),  # a mean of rows
                       st.sampled_from([(0.0,), (0.2,), (1.5,)])),
             min_size=2, max_size=12),  # (stage, value, constraints); stage 7 of 7: scored on every row
    st.sampled_from(["maximize", "minimize"]),
    st.floats(10, 100),  # penalty_for_baselines: at least 10
)
def test_cmaes_sees_a_stopped_trial_below_every_trial_that_went_further(
        rows: list[tuple[int, float, tuple[float, ...]]], direction: str, scale: float) -> None:
    stages = 7
    trials = [trial_at(i, i, value=v, constraints=c) if stage == stages else stopped_at(i, stage, stages, v, c)
              for i, (stage, v, c) in enumerate(rows)]
    seen = visible_trials(trials, position=len(rows), horizon=len(rows), directions=[direction], scale=scale,
                          stopped_as_complete=True)
    assert all(t.state == TrialState.COMPLETE for t in seen)
    sign = 1 if direction == "maximize" else -1
    # what CMA-ES ranks by: feasible before infeasible, then a later stage first, then the value
    order = sorted(range(len(rows)), key=lambda i: sign * seen[i].value, reverse=True)
    key = [(rows[i][2] == (0.0,), rows[i][0] if rows[i][2] == (0.0,) else 0) for i in order]
    assert key == sorted(key, reverse=True)
    for i, (stage, value, _) in enumerate(rows):  # within a stage and feasibility the estimates' order stands
        for j, (other_stage, other, _) in enumerate(rows):
            if stage == other_stage and rows[i][2] == rows[j][2] and sign * value > sign * other:
                assert sign * seen[i].value > sign * seen[j].value
        assert trials[i].state == (TrialState.COMPLETE if stage == stages else TrialState.PRUNED)  # stored as before
    # without penalise (GP, NSGA-II) a stopped trial is shown with its estimate as its value
    plain = visible_trials(trials, position=len(rows), horizon=len(rows), directions=None, stopped_as_complete=True)
    assert [t.value for t in plain] == [v for _, v, _ in rows]


def test_every_sampler_draws_through_the_view_and_other_names_are_refused() -> None:
    from search.errors import SearchError

    for name in SAMPLERS:  # past NSGA-II's and CMA-ES's first generation (population 4)
        study = new_study(name)
        searched(study, name, 9)
        drawn = [t.params for t in study.get_trials()]
        assert len(drawn) == 9 and all(set(p) == set(SPACE) for p in drawn)
        if name != "nsga2":  # NSGA-II's crossover may repeat a parent; the others never repeat
            assert len({tuple(sorted(p.items())) for p in drawn}) == 9, name
    with pytest.raises(SearchError, match="sampler: expected one of cmaes, tpe, gp, nsga2, random, got 'x'"):
        make_sampler("x", seed=0, space=SPACE)


def test_cma_lr_adapt_is_off_by_default_and_on_changes_the_draws_after_the_first_generation(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import search.samplers as samplers

    assert samplers.CMA_LR_ADAPT is False  # the measured default (README, search quality)
    plain = new_study("cmaes")
    searched(plain, "cmaes", 8)
    monkeypatch.setattr(samplers, "CMA_LR_ADAPT", True)  # benchmarks/search_quality.py --cma-lr-adapt
    adapted = new_study("cmaes")
    searched(adapted, "cmaes", 8)
    drawn = [[t.params for t in s.get_trials()] for s in (plain, adapted)]
    # the first generation comes from the same start; the learning rate changes the first update
    assert drawn[0][:4] == drawn[1][:4]
    assert all(a != b for a, b in zip(drawn[0][4:], drawn[1][4:], strict=True))


def test_cma_sigma0_sets_the_first_generations_step_and_is_left_out_of_a_warm_start(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``search.samplers.CMA_SIGMA0`` reaches ``CmaEsSampler(sigma0=...)``, an argument Optuna
    deprecated: if it stops arriving (or silently means something else) this fails."""
    import warnings

    import search.samplers as samplers

    assert samplers.CMA_SIGMA0 is None  # the measured default: Optuna's 1/6 of the range

    def first_generation(population: int = 8) -> np.ndarray:
        study = optuna.create_study(direction="maximize",
                                    sampler=make_sampler("cmaes", seed=3, space=SPACE, population=population))
        searched(study, "cmaes", population, popsize=population)
        return np.array([[t.params[k] for k in sorted(SPACE)] for t in study.get_trials()]) - 0.5

    plain = first_generation()
    monkeypatch.setattr(samplers, "CMA_SIGMA0", 0.25)  # benchmarks/search_quality.py --cma-sigma0 0.25
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the deprecation warning is silenced where sigma0 is passed
        wide = first_generation()
    # Same seed, same normal draws, from the box's centre: each draw not resampled for leaving the
    # box is the default's step times 0.25 / (1/6) = 1.5.
    scaled = [np.allclose(w, 1.5 * p, rtol=1e-9, atol=1e-12) for w, p in zip(wide, plain, strict=True)]
    assert sum(scaled) >= len(scaled) // 2, (wide, plain)
    # Optuna refuses sigma0 with source trials: a warm start keeps its own spread
    source = [optuna.trial.create_trial(params={k: 0.1 * i for k in SPACE}, distributions=SPACE, value=float(i))
              for i in range(4)]
    warm = make_sampler("cmaes", seed=3, space=SPACE, population=4, source_trials=source)
    assert warm.inner._sigma0 is None and warm.inner._source_trials  # type: ignore[attr-defined]


def test_cma_es_draws_the_same_genes_from_any_eigenbasis() -> None:
    """``search.samplers.symmetric_sampling`` (cmaes' private ``CMA._sample_solution``, replaced):
    where C's eigenvalues repeat, LAPACK may return any basis of their space (it does differ between
    OpenBLAS's kernels for different CPUs); the draws must not depend on which."""
    import cmaes

    from search.samplers import symmetric_sampling

    symmetric_sampling(cmaes.CMA)
    symmetric_sampling(cmaes.CMA)  # once is enough: a second call changes nothing
    assert getattr(cmaes.CMA._sample_solution, "symmetric", False)
    angle = 0.7
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
    bases = (np.eye(4), np.block([[rotation, np.zeros((3, 1))], [np.zeros((1, 3)), np.ones((1, 1))]]))
    scales = np.array([1.0, 1.0, 1.0, 2.0])  # C = diag(1, 1, 1, 4): eigenvalue 1 three times
    draws = []
    for basis in bases:
        cma = cmaes.CMA(mean=np.full(4, 0.5), sigma=0.3, seed=3)
        assert np.allclose(basis @ np.diag(scales**2) @ basis.T, np.diag([1.0, 1.0, 1.0, 4.0]))
        cma._B, cma._D = basis, scales  # what _eigen_decomposition caches
        draws.append(np.array([cma._sample_solution() for _ in range(5)]))
    assert np.allclose(draws[0], draws[1], rtol=0, atol=1e-12)
    assert not np.allclose(draws[0], 0.5)  # they are draws, not the mean
