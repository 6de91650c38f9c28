"""What the sampler sees: the study's Optuna sampler behind one view of the study.

Every trial is told its real objective (what the dashboard plots and the rankings read).
The sampler the study names is wrapped in :class:`SearchSampler`, which shows it the study
as follows:

* **No baselines.** They carry no genes (references, not candidates); left visible they
  would empty the intersection search space of CMA-ES/TPE/GP/NSGA-II and feed GP trials
  without parameters.
* **CMA-ES sees gates as a penalty.** ``CmaEsSampler`` ignores constraints, so in its view
  an infeasible trial's value is :func:`penalised`, computed from what the trial stores (its
  objective and its ``constraints``) and the study's ``cma_penalty``. Only the sampler reads
  that number; it is never stored.
* **A trial stopped early (multi-fidelity, ``search.staged``) is stored PRUNED** with its
  estimate on the rows it was scored on. TPE is shown it as stored: Optuna's TPE reads PRUNED
  trials and ranks them below every complete one (those stopped at a later stage first, then
  by their last intermediate value, which for one objective is the estimate). CMA-ES, GP and
  NSGA-II read COMPLETE trials only, so they are shown it COMPLETE with its estimate as its
  values: CMA-ES needs a value for every member of a generation (and penalises the estimate
  when the estimated gates fail, as above, and by :func:`stage_cost` below every trial that
  went to a later stage, the order TPE uses), and GP and NSGA-II would otherwise learn nothing
  from it. Random search reads nothing.
* **The same search, whenever it was interrupted.** Each search trial has a ``position``
  (user attr: 0, 1, ... in the order the search asks them; a re-run keeps the position of
  the trial it re-runs) and a ``horizon`` (user attr, chosen by the driver: the positions
  before it were finished when it was asked, those from it on were not). The genes for
  position ``p`` are drawn by a fresh inner sampler seeded from (study seed, ``p``), which
  sees the search trials numbered by position, those before the horizon as they finished,
  those from the horizon to ``p`` as running, and nothing after ``p``, nor trials a stopped
  driver lost (they are re-run under their position). That is exactly what a run never
  interrupted saw when it asked ``p``, so a study killed at any point and resumed draws
  the same genes. Optuna's samplers keep no other state that changes what they draw: TPE,
  random, GP and NSGA-II only their random generator, CMA-ES its optimizer in trial system
  attributes (restored from the finished trials) plus a seed that adds the trial's number.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Container, Mapping, Sequence

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from search import ranking
from search.config import SAMPLERS  # the names live where study files are read (no Optuna there)
from search.errors import SearchError
from search.records import StoppedTrial, stopped_trial

POSITION = "position"
"""Trial user attr: the search trial's place in the search (a re-run keeps the original's)."""
HORIZON = "horizon"
"""Trial user attr: the sampler that drew this trial saw positions < horizon finished."""

CMA_PREFIX = "cma:"  # CmaEsSampler's system attrs (generation, optimizer) on the trials it drew
PENALTY_ATTR = "cma_penalty"  # study user attr: see penalty_scale
PENALTY_FLOOR = 10.0
CMA_LR_ADAPT = False
"""CMA-ES with Optuna's learning-rate adaptation (``lr_adapt``: LRA-CMA-ES, made for noisy
objectives). Off: on the demo (with CMA-ES's draws before ``symmetric_sampling``), doubling its
budget gained +.009 over ten seeds (issue 15 asks +.02), no more than plain CMA-ES, and it was
below plain CMA-ES at 48 trials (README, search quality).
``benchmarks/search_quality.py --cma-lr-adapt`` runs the default arms with it on."""
CMA_SIGMA0: float | None = None
"""CMA-ES's initial step size in Optuna's [0, 1]-normalised gene space; None: Optuna's default,
1/6 of the range. Not used with a warm start (Optuna refuses ``sigma0`` with ``source_trials``;
the source trials' spread sets the start then). ``benchmarks/search_quality.py --cma-sigma0 X``
runs the default arms with it. None: 0.25 failed the check set for it in advance on the demo
(README, search quality: below Optuna's default and no better than random search at 48 trials)."""


def make_sampler(name: str, *, seed: int, space: Mapping[str, BaseDistribution],
                 population: int | None = None, parallel: bool = False,
                 source_trials: Sequence[FrozenTrial] = ()) -> SearchSampler:
    """The study's sampler: seeded per search position, blind to baselines (see the module).

    ``source_trials`` (CMA-ES only): an earlier study's trials to warm-start from (``search.warm_start``).
    """
    fixed_space: dict[str, BaseDistribution] | None = None
    if name == "cmaes":
        import cmaes  # Optuna imports it (and scipy.stats, ~1 s) at the first ask otherwise

        symmetric_sampling(cmaes.CMA)

        # CMA gets the genome's numeric genes as a fixed search space and
        # n_startup_trials=0, so the very first generation is already CMA's (with the
        # intersection search space of no finished trial, the whole first batch would be
        # sampled at random and belong to no generation).
        fixed_space = {
            k: d for k, d in space.items()
            if isinstance(d, (FloatDistribution, IntDistribution)) and not d.single()
        }

        # Warm start: the source trials over the genes CMA models (Optuna compares the names).
        warm = [
            optuna.trial.create_trial(params={k: t.params[k] for k in fixed_space},
                                      distributions=fixed_space, value=t.value)
            for t in source_trials
        ] or None

        step = {} if warm is not None or CMA_SIGMA0 is None else {"sigma0": CMA_SIGMA0}

        def inner(s: int) -> BaseSampler:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # source_trials, lr_adapt
                # Optuna 4.9 deprecated sigma0 (removal planned for 6.0) and offers no other way to
                # set the first step; tests/test_samplers.py fails when it stops reaching the sampler.
                warnings.filterwarnings("ignore", message="`sigma0` has been deprecated", category=FutureWarning)
                return optuna.samplers.CmaEsSampler(
                    seed=s, popsize=population, n_startup_trials=0, warn_independent_sampling=False,
                    source_trials=warm, lr_adapt=CMA_LR_ADAPT, **step,
                )
    elif name == "tpe":
        def inner(s: int) -> BaseSampler:
            return optuna.samplers.TPESampler(seed=s, constant_liar=parallel)
    elif name == "gp":
        def inner(s: int) -> BaseSampler:
            return optuna.samplers.GPSampler(seed=s)
    elif name == "nsga2":
        def inner(s: int) -> BaseSampler:
            return optuna.samplers.NSGAIISampler(seed=s, population_size=population or 50)
    elif name == "random":
        def inner(s: int) -> BaseSampler:
            return optuna.samplers.RandomSampler(seed=s)
    else:
        raise SearchError(f"sampler: expected one of {', '.join(SAMPLERS)}, got {name!r}")
    return SearchSampler(inner, seed=seed, fixed_space=fixed_space, penalise=name == "cmaes",
                         stopped_as_complete=name != "tpe")


def symmetric_sampling(cma_class: type) -> None:
    """Make CMA-ES draw the same genes on every CPU. ``cmaes.CMA`` samples ``y = B D z`` with
    ``C = B D^2 B^T`` from ``numpy.linalg.eigh``; where eigenvalues repeat (after the first
    generations most of C's spectrum does) the eigenvectors are any basis of their space, and
    LAPACK picks a different one under OpenBLAS's kernels for different instruction sets: the
    demo's search diverged at its second generation under ``OPENBLAS_CORETYPE=Nehalem``. Here
    ``y = B D B^T z``, C's symmetric square root, which is the same whatever basis ``eigh``
    returns; it has the same distribution N(0, C), and the first generation (C = I) is unchanged.

    ``CMA._sample_solution`` is private to the cmaes package; Optuna's ``CmaEsSampler`` builds its
    ``CMA`` inside, so no public hook exists. ``tests/test_samplers.py`` checks the method is there,
    is replaced once, and draws the same genes from two eigenbases of one covariance."""
    if getattr(cma_class._sample_solution, "symmetric", False):
        return

    def sample_solution(self: object) -> np.ndarray:
        basis, scales = self._eigen_decomposition()  # type: ignore[attr-defined]
        z = self._rng.randn(self._n_dim)  # type: ignore[attr-defined]  # ~ N(0, I), as cmaes draws it
        y = basis.dot(scales * basis.T.dot(z))  # ~ N(0, C)
        return self._mean + self._sigma * y  # type: ignore[attr-defined]

    sample_solution.symmetric = True  # type: ignore[attr-defined]
    cma_class._sample_solution = sample_solution


def position_seed(seed: int, position: int) -> int:
    """The inner sampler's seed for one search position (independent streams per position)."""
    return int(np.random.SeedSequence([seed, position]).generate_state(1)[0])


# -- the CMA-ES penalty ---------------------------------------------------------------


def penalty_for_baselines(raw_objectives: Sequence[float]) -> float:
    """The study's ``cma_penalty``: 10 x (1 + the spread of the baselines' objectives)."""
    spread = max(raw_objectives) - min(raw_objectives) if raw_objectives else 0.0
    return PENALTY_FLOOR * (1.0 + spread)


def penalty_scale(study: optuna.Study) -> float:
    """How much one unit of gate violation (plus one) costs a CMA-ES candidate.

    Stored once per study (user attr ``cma_penalty``) when the baselines are scored (see
    :func:`penalty_for_baselines`). That exceeds the objective's whole range for scores in
    [0, 1] (exact match, choice), so any infeasible candidate ranks below any feasible one
    in its generation, and less violation still ranks higher. CMA-ES only uses the ranks of
    a generation, so the size of the penalty distorts nothing else.
    """
    stored = study.user_attrs.get(PENALTY_ATTR)
    if stored is not None:
        return float(stored)
    return PENALTY_FLOOR


def penalised(raw: float, violation: float, direction: str, scale: float) -> float:
    return raw if violation <= 0 else worse_by(raw, scale * (1.0 + violation), direction)


def worse_by(value: float, cost: float, direction: str) -> float:
    """``value`` moved ``cost`` toward the worse end of ``direction``."""
    return value - cost if direction == "maximize" else value + cost


def sampler_values(trial: FrozenTrial, directions: Sequence[str], scale: float,
                   stopped: StoppedTrial | None = None) -> list[float]:
    """The values CMA-ES sees for a completed trial: its objectives, penalised when infeasible.

    A trial ``stopped`` early (shown with its estimate) also ranks below every trial that went
    to a later stage, as multi-fidelity decided: :func:`stage_cost` per stage it missed.
    """
    violation = ranking.total_violation(trial)
    values = [penalised(v, violation, d, scale) for v, d in zip(ranking.raw_values(trial), directions, strict=True)]
    if stopped is None:
        return values
    cost = stage_cost(stopped.stage, stopped.stages, scale)
    return [worse_by(v, cost, d) for v, d in zip(values, directions, strict=True)]


def stage_cost(stage: int, stages: int, scale: float) -> float:
    """What CMA-ES's view takes off a trial stopped after ``stage`` of ``stages``.

    Its estimate comes from fewer rows the earlier it stopped: on the demo's 10-row first stage
    a trial that was stopped can show a higher estimate than every trial scored on all 600 rows.
    The stages' decisions compared trials on the same rows, so CMA-ES is shown their order
    (as Optuna's TPE ranks pruned trials: a later step first, then the value): ``scale / stages``
    per stage short of the last, which exceeds the objective's range for scores in [0, 1] at up
    to 10 stages (``scale`` >= 10), and stays under ``scale`` in all, so a feasible estimate
    still ranks above any infeasible trial.
    """
    return scale * (stages - stage) / stages


# -- the view -------------------------------------------------------------------------


def visible_trials(trials: Sequence[FrozenTrial], *, position: int | None, horizon: int | None,
                   directions: Sequence[str] | None, scale: float = PENALTY_FLOOR,
                   stopped_as_complete: bool = False) -> list[FrozenTrial]:
    """The search trials as the sampler drawing ``position`` sees them (see the module).

    ``directions`` (CMA-ES): show infeasible trials with :func:`sampler_values` at
    ``scale``. ``stopped_as_complete``: show trials stopped early COMPLETE with their
    estimate. Trials get copied only where the view changes them. With ``position``
    None (a trial the driver did not place) the search trials are shown as stored.
    """
    seen: list[FrozenTrial] = []
    for trial in trials:
        if ranking.kind(trial) != ranking.KIND_SEARCH:
            continue
        if trial.state == TrialState.FAIL and trial.user_attrs.get("failure") == ranking.DRIVER_STOPPED:
            continue  # a lost run: re-run under its position
        place = trial.user_attrs.get(POSITION)
        if position is not None and place is not None:
            if place > position:
                continue
            shown = copy.copy(trial)
            shown.number = place
            if place >= (horizon if horizon is not None else position) and trial.state != TrialState.RUNNING:
                shown.state = TrialState.RUNNING  # not finished yet when an uninterrupted run asked
                shown.values = None
                shown.datetime_complete = None
            trial = shown
        stopped = stopped_trial(trial) if stopped_as_complete else None  # records: the one reader
        if stopped is not None and stopped.objective:
            trial = copy.copy(trial)
            trial.state = TrialState.COMPLETE
            trial.values = list(stopped.objective)
        if directions is not None and trial.state == TrialState.COMPLETE and (
                stopped is not None or not ranking.is_feasible(trial)):
            trial = copy.copy(trial)
            trial.values = sampler_values(trial, directions, scale, stopped)
        seen.append(trial)
    seen.sort(key=lambda t: t.number)
    return seen


class _SamplerView:
    """The study as the sampler drawing one trial sees it; everything else is the real study.

    Samplers read trials through ``Study._get_trials`` (and the public ``trials`` /
    ``get_trials``). The visible trials are computed once per trial drawn: nothing else
    changes the study while the driver asks.
    """

    def __init__(self, study: optuna.Study, *, position: int | None, horizon: int | None,
                 penalise: bool, stopped_as_complete: bool = False) -> None:
        self._study = study
        self._position = position
        self._horizon = horizon
        self._penalise = penalise
        self._stopped_as_complete = stopped_as_complete
        self._visible: list[FrozenTrial] | None = None

    def __getattr__(self, name: str) -> object:
        return getattr(self._study, name)

    def _get_trials(self, deepcopy: bool = True, states: Container[TrialState] | None = None,
                    use_cache: bool = False) -> list[FrozenTrial]:
        if self._visible is None:
            self._visible = self._compute()
        trials = self._visible if states is None else [t for t in self._visible if t.state in states]
        return copy.deepcopy(trials) if deepcopy else list(trials)

    def get_trials(self, deepcopy: bool = True, states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        return self._get_trials(deepcopy=deepcopy, states=states)

    @property
    def trials(self) -> list[FrozenTrial]:
        return self._get_trials()

    def _compute(self) -> list[FrozenTrial]:
        stored = self._study.get_trials(deepcopy=False)  # Study._get_trials(use_cache=False)
        return visible_trials(
            stored, position=self._position, horizon=self._horizon,
            directions=[d.name.lower() for d in self._study.directions] if self._penalise else None,
            scale=penalty_scale(self._study) if self._penalise else PENALTY_FLOOR,
            stopped_as_complete=self._stopped_as_complete,
        )


class SearchSampler(BaseSampler):
    """Draws each search trial with a fresh ``new_inner(seed)`` that sees a :class:`_SamplerView`.

    With ``fixed_space`` the relative search space is that, not the inner sampler's
    inference from finished trials. ``penalise``: CMA-ES (see :func:`sampler_values`);
    ``stopped_as_complete``: trials stopped early shown with their estimate (see the module).
    """

    def __init__(self, new_inner: Callable[[int], BaseSampler], *, seed: int,
                 fixed_space: Mapping[str, BaseDistribution] | None = None, penalise: bool = False,
                 stopped_as_complete: bool = False) -> None:
        self._new_inner = new_inner
        self.seed = seed
        self.fixed_space = None if fixed_space is None else dict(fixed_space)
        self.penalise = penalise
        self.stopped_as_complete = stopped_as_complete
        self.inner = new_inner(seed)  # for trials the driver did not place
        self._drawing: tuple[int, BaseSampler, _SamplerView] | None = None  # (trial number, ...)

    def __str__(self) -> str:
        return str(self.inner)

    def _for(self, study: optuna.Study, trial: FrozenTrial) -> tuple[BaseSampler, _SamplerView, FrozenTrial]:
        """The inner sampler, the view and the trial (numbered by position) for drawing ``trial``."""
        if self._drawing is None or self._drawing[0] != trial.number:
            position = trial.user_attrs.get(POSITION)
            horizon = trial.user_attrs.get(HORIZON)
            inner = self._new_inner(position_seed(self.seed, position)) if position is not None else self.inner
            view = _SamplerView(study, position=position, horizon=horizon, penalise=self.penalise,
                                stopped_as_complete=self.stopped_as_complete)
            self._drawing = (trial.number, inner, view)
        _, inner, view = self._drawing
        position = trial.user_attrs.get(POSITION)
        if position is not None and trial.number != position:
            trial = copy.copy(trial)
            trial.number = position  # CmaEsSampler adds the number to its seed; its trial id still writes
        return inner, view, trial

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._drawing = None  # a new trial: a new inner sampler and view
        inner, view, trial = self._for(study, trial)
        inner.before_trial(view, trial)  # type: ignore[arg-type]

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        if self.fixed_space is not None:
            return dict(self.fixed_space)
        inner, view, trial = self._for(study, trial)
        return inner.infer_relative_search_space(view, trial)  # type: ignore[arg-type]

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, object]:
        inner, view, trial = self._for(study, trial)
        return inner.sample_relative(view, trial, search_space)  # type: ignore[arg-type]

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> object:
        inner, view, trial = self._for(study, trial)
        return inner.sample_independent(view, trial, param_name, param_distribution)  # type: ignore[arg-type]

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        # Optuna's samplers keep nothing from after_trial that changes a later draw.
        view = _SamplerView(study, position=None, horizon=None, penalise=self.penalise,
                            stopped_as_complete=self.stopped_as_complete)
        with warnings.catch_warnings():
            # CMA-ES sees gates through the penalised value; its per-trial "constraints
            # are not used" warning says nothing new.
            warnings.filterwarnings("ignore", message="Constraints have been set, but CmaEsSampler")
            self.inner.after_trial(view, trial, state, values)  # type: ignore[arg-type]

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()  # the per-position samplers are seeded from the position
