"""Multi-fidelity scoring as pure functions over per-example results (numpy only, no torch).

A study scores each trial in stages on growing prefixes of one row order fixed for the
whole study; after each stage :func:`decide` promotes the trial to the next stage or
stops it. Nothing here touches a model: the driver scores the rows these functions name
and stores one score per row per task, in the study's order (so a trial's rows of a task
are always a prefix of that task's order, and prefixes of two trials line up row by row).

* **Row order** (:func:`study_row_order`): each task's rows are shuffled with a seed made
  from the study seed and the task name, then the tasks are interleaved in proportion to
  their sizes (each next row from the task furthest behind its share, in integers), so
  every prefix is a stratified sample: each task within two rows of its share (the greedy "furthest behind" rule; one row is not guaranteed: hypothesis found 1.03). Same seed and row counts -> the same order on every
  machine and resume.
* **Stages** (:func:`stage_sizes`): ``first_stage`` rows, then ``growth`` times more, up to
  every row; :func:`rows_to_score` names the rows a stage still needs given what a trial
  already holds (a resumed trial continues without scoring a row twice).
* **Stopping** (:func:`decide`), each test one-sided at ``confidence`` on the rows scored so
  far, paired with the incumbents (and a gate's reference source) on those same rows:

  - single objective (``mean`` / ``min``): stop when the trial is worse than *every*
    incumbent given (pass the best trial, or the top-k a trial must enter);
  - ``per_task``: stop when some incumbent is better on every task at once (dominated);
  - a gate: stop when the trial fails it (below a floor / above a ceiling, or, for
    ``max_regression`` with the reference's rows given, regressed more than allowed).

  Otherwise (ties, too few rows, a task with fewer than 2 rows) the trial is promoted.
  The confidence holds per test: a trial checked at several stages and against several
  gates is stopped wrongly somewhat more often than ``1 - confidence`` in total
  (``benchmarks/fidelity_calibration.py`` measures both on stored full runs).
* **Rank rule** (``rule = "rank"``, :func:`rank_stop`): a trial the tests above promote is
  still stopped when it is not among the best share ``promote`` (default ``1 / growth``) of
  the trials at this stage (it and its ``peers``, each ranked by its estimate on the same
  rows: the objective, or for ``per_task`` its Pareto layer), as successive halving / ASHA
  bound the cost: ``floor(n * promote)`` of ``n`` trials go on, ties with the last kept one
  included; while that is 0 (fewer than ``1 / promote`` trials at the stage), every one does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING

from fitness.errors import FitnessError
from fitness.gates import KIND_MAX_REGRESSION, GateLimit

if TYPE_CHECKING:  # numpy only inside functions: search.config (read by `search status`) imports this module
    import numpy as np

    from fitness.intervals import TaskRows

RESAMPLES = 2000  # bootstrap draws per decision (fitness.intervals.RESAMPLES; a test holds them equal)

OBJECTIVES: tuple[str, ...] = ("mean", "min", "per_task")
RULE_TEST = "test"  # stop only when confidently worse than the incumbents, or failing a gate
RULE_RANK = "rank"  # ... or when not among the best share `promote` of the trials at the stage
RULES: tuple[str, ...] = (RULE_TEST, RULE_RANK)
PROMOTE = "promote"
STOP = "stop"


class FidelitySettingError(FitnessError):
    """A :class:`FidelityConfig` setting out of range: ``key`` names the field, ``problem`` what is wrong
    (``search.config`` re-raises it under the TOML key ``study.fidelity.<key>``)."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(key, problem)  # both in args: the error pickles (Ray)
        self.key, self.problem = key, problem

    def __str__(self) -> str:
        return f"fidelity: {self.key} {self.problem}"


@dataclass(frozen=True)
class FidelityConfig:
    """How a study scores in stages; the one place that checks these settings (``search.config`` reads
    ``study.fidelity`` into it and names the TOML key of a :class:`FidelitySettingError`)."""

    first_stage: int  # rows (all tasks together) of the first stage
    growth: float = 3.0  # each stage has this many times the rows of the one before
    confidence: float = 0.95  # of each one-sided test that stops a trial
    resamples: int = RESAMPLES  # bootstrap draws per decision
    rule: str = RULE_TEST  # RULES: what else than the tests stops a trial (module doc)
    promote: float | None = None  # rule rank: the share of the trials at a stage that go on (None: 1 / growth)

    def __post_init__(self) -> None:
        if isinstance(self.first_stage, bool) or not isinstance(self.first_stage, int):
            raise FidelitySettingError("first_stage", f"must be an integer, got {self.first_stage!r}")
        if self.first_stage < 2:
            raise FidelitySettingError("first_stage", f"must be >= 2, got {self.first_stage!r}")
        if not math.isfinite(self.growth):
            raise FidelitySettingError("growth", f"must be a finite number, got {self.growth!r}")
        if self.growth <= 1.0:
            raise FidelitySettingError("growth", f"must be > 1, got {self.growth!r}")
        if not 0.5 < self.confidence < 1.0:
            raise FidelitySettingError("confidence", f"must be in (0.5, 1), got {self.confidence!r}")
        if self.resamples < 100:
            raise FidelitySettingError("resamples", f"must be >= 100, got {self.resamples!r}")
        if self.rule not in RULES:
            raise FidelitySettingError("rule", f"must be one of {', '.join(map(repr, RULES))}, got {self.rule!r}")
        if self.promote is not None and self.rule != RULE_RANK:
            raise FidelitySettingError("promote", f"is the rank rule's share of trials promoted; set rule = "
                                                  f"{RULE_RANK!r}")
        if self.promote is not None and not 0.0 < self.promote < 1.0:
            raise FidelitySettingError("promote", f"must be in (0, 1), got {self.promote!r}")

    @property
    def promoted_share(self) -> Fraction:
        """Rule rank: the share of the trials at a stage that go on (exact: the same on every machine)."""
        return Fraction(repr(self.promote)) if self.promote is not None else 1 / Fraction(repr(self.growth))


RowOrder = tuple[tuple[str, int], ...]  # (task, row index in the task's search slice), in scoring order


def study_row_order(task_rows: Mapping[str, int], seed: int) -> RowOrder:
    """The study's scoring order of every search row, stratified by task (see module doc)."""
    import numpy as np

    from fitness.subset import stable_seed

    shuffled: list[list[int]] = []
    for task, n in task_rows.items():
        if n < 1:
            raise FitnessError(f"fidelity: task {task!r} has no search rows")
        shuffled.append(np.random.default_rng(stable_seed(seed, "fidelity", task)).permutation(n).tolist())
    tasks, sizes = list(task_rows), [len(rows) for rows in shuffled]
    total, taken = sum(sizes), [0] * len(sizes)
    order: list[tuple[str, int]] = []
    for m in range(1, total + 1):
        # the task furthest behind its share m * n / total (integers; ties: the earlier task)
        pick = max((i for i in range(len(sizes)) if taken[i] < sizes[i]),
                   key=lambda i: (m * sizes[i] - total * taken[i], -i))
        order.append((tasks[pick], shuffled[pick][taken[pick]]))
        taken[pick] += 1
    return tuple(order)


def stage_sizes(total_rows: int, config: FidelityConfig) -> tuple[int, ...]:
    """Rows scored after each stage (all tasks together), increasing, the last = ``total_rows``."""
    if total_rows < 1:
        raise FitnessError(f"fidelity: no rows to score (got {total_rows})")
    sizes = [min(config.first_stage, total_rows)]
    growth = Fraction(repr(config.growth))  # exact decimal (1.1 is 11/10): the same sizes on every machine
    while sizes[-1] < total_rows:
        sizes.append(min(total_rows, max(sizes[-1] + 1, math.ceil(sizes[-1] * growth))))
    return tuple(sizes)


def describe_schedule(total_rows: int, config: FidelityConfig) -> str:
    """The stage schedule in words (``search validate``)."""
    sizes = stage_sizes(total_rows, config)
    text = (f"{len(sizes)} stage(s) of {', '.join(map(str, sizes))} search rows (first_stage {config.first_stage}, "
            f"growth {config.growth:g}); a trial stops after a stage when it cannot reach the best trial or "
            f"fails a gate, each test at {config.confidence:.0%} confidence (a trial meets one per stage but the "
            f"last: {len(sizes) - 1})")
    if config.rule == RULE_RANK:
        text += (f", or when it is not among the best {float(config.promoted_share):.3g} of the trials finished "
                 f"at that stage (rule rank)")
    return text


def stage_rows(order: RowOrder, size: int) -> dict[str, list[int]]:
    """Per task, the rows (in the study's order) of the first ``size`` rows of ``order``."""
    rows: dict[str, list[int]] = {}
    for task, _ in order:
        rows.setdefault(task, [])
    for task, row in order[:size]:
        rows[task].append(row)
    return rows


def rows_to_score(order: RowOrder, size: int, done: Mapping[str, int]) -> dict[str, list[int]]:
    """Per task, the rows a trial still needs for the stage of ``size`` rows.

    ``done``: task -> how many rows the trial already holds (a prefix of the task's order,
    e.g. from a run killed mid-stage). Their scores are appended in the returned order.
    """
    wanted = stage_rows(order, size)
    unknown = sorted(set(done) - set(wanted))
    if unknown:
        raise FitnessError(f"fidelity: stored rows for unknown task {unknown[0]!r}")
    needed: dict[str, list[int]] = {}
    for task, rows in wanted.items():
        held = done.get(task, 0)
        total = sum(1 for t, _ in order if t == task)
        if not 0 <= held <= total:
            raise FitnessError(f"fidelity: task {task!r}: {held} stored rows, the task has {total}")
        needed[task] = rows[held:]
    return needed


@dataclass(frozen=True)
class Decision:
    """What to do with a trial after a stage, and why."""

    action: str  # PROMOTE or STOP
    reason: str  # "" when promoted
    estimate: dict[str, float] = field(default_factory=dict)  # task -> mean score on the rows scored
    rows: dict[str, int] = field(default_factory=dict)  # task -> rows scored

    @property
    def stopped(self) -> bool:
        return self.action == STOP


def decide(trial_rows: TaskRows, incumbents_rows: Sequence[TaskRows], gates: Sequence[GateLimit], *,
           objective: str, directions: Mapping[str, bool], config: FidelityConfig,
           weights: Mapping[str, float] | None = None, sources_rows: Mapping[str, TaskRows] | None = None,
           seed: int = 0, peers_rows: Sequence[TaskRows] = ()) -> Decision:
    """Promote or stop a trial after a stage.

    ``trial_rows``: task -> the trial's row scores so far (study order). ``incumbents_rows``:
    the trials it must reach, each with at least as many rows per task (only the trial's
    rows are compared). ``gates``: the study's resolved gates; ``sources_rows``: source label
    -> task -> row scores, the paired reference of ``max_regression`` gates (without it the
    stored limit is used). ``directions``: task -> higher_is_better. ``weights``: ``mean``.
    ``peers_rows``: with ``config.rule`` rank, the other trials that reached this stage, each
    with at least the trial's rows (:func:`rank_stop`); ignored by rule test.
    """
    import numpy as np

    from fitness.intervals import aggregate, resampled_task_means
    from fitness.subset import stable_seed

    if objective not in OBJECTIVES:
        raise FitnessError(f"fidelity: unknown objective {objective!r} (expected one of {', '.join(OBJECTIVES)})")
    trial = {task: np.asarray(rows, dtype=np.float64) for task, rows in trial_rows.items()}
    lengths = {task: int(rows.size) for task, rows in trial.items()}
    estimate = {task: float(rows.mean()) for task, rows in trial.items() if rows.size}
    missing = sorted(set(directions) - set(trial))
    if missing:
        raise FitnessError(f"fidelity: the trial has no rows of task {missing[0]!r}")
    unknown = sorted(set(trial) - set(directions))
    if unknown:
        raise FitnessError(f"fidelity: no direction for task {unknown[0]!r}")
    scored = [task for task in trial if lengths[task] >= 2]  # a task with < 2 rows bounds nothing
    quantile = config.confidence
    rng_seed = stable_seed(seed, "decide", *sorted(lengths.items()))

    def stop(reason: str) -> Decision:
        return Decision(STOP, reason, estimate, lengths)

    for gate in gates:
        if gate.task not in scored:
            continue
        reference = None
        if gate.kind == KIND_MAX_REGRESSION and sources_rows is not None and gate.reference in sources_rows:
            reference = _prefix(sources_rows[gate.reference], {gate.task: lengths[gate.task]},
                                f"source {gate.reference!r}")[gate.task]
        rows = [{gate.task: trial[gate.task]}] + ([{gate.task: reference}] if reference is not None else [])
        _, draws = resampled_task_means(rows, resamples=config.resamples, seed=rng_seed)
        draw = draws[gate.task]
        sign = 1.0 if gate.higher_is_better else -1.0
        if reference is None:  # margin over the stored limit
            margin = sign * (draw[:, 0] - gate.limit)
        else:  # paired: the regression from the reference on the same rows, against the allowed one
            margin = sign * (draw[:, 0] - draw[:, 1]) + gate.setting
        if np.quantile(margin, quantile) < 0:
            return stop(f"gate {gate.name} failed with {quantile:.0%} confidence "
                        f"(score {estimate[gate.task]:.4f} on {lengths[gate.task]} rows)")

    if len(scored) < len(trial):
        return Decision(PROMOTE, "", estimate, lengths)
    if config.rule == RULE_RANK:
        reason = rank_stop(trial, peers_rows, objective=objective, directions=directions,
                           share=config.promoted_share, weights=weights)
        if reason:
            return stop(reason)
    promote = Decision(PROMOTE, "", estimate, lengths)
    if not incumbents_rows:
        return promote
    incumbents = [_prefix(rows, lengths, f"incumbent {number}") for number, rows in enumerate(incumbents_rows)]
    _, draws = resampled_task_means([trial, *incumbents], resamples=config.resamples, seed=rng_seed)
    # gain[task]: (resamples, incumbents) how much better the trial is, in each task's direction
    gain = {task: (1.0 if directions[task] else -1.0) * (draws[task][:, :1] - draws[task][:, 1:]) for task in trial}
    if objective == "per_task":
        best_gain = np.max(np.stack(list(gain.values())), axis=0)  # > 0: better on some task
        dominated = np.quantile(best_gain, quantile, axis=0) < 0
        if dominated.any():
            return stop(f"dominated by incumbent {int(np.argmax(dominated))} on every task "
                        f"with {quantile:.0%} confidence")
        return promote
    higher = _one_direction(directions)
    sign = 1.0 if higher else -1.0
    values = aggregate({task: draws[task] for task in trial}, objective, weights, higher)
    objective_gain = sign * (values[:, :1] - values[:, 1:])
    upper = np.quantile(objective_gain, quantile, axis=0)
    if (upper < 0).all():
        return stop(f"cannot reach the {len(incumbents)} incumbent(s): objective {objective} is worse "
                    f"with {quantile:.0%} confidence (by at least {float(-upper.max()):.4f})")
    return promote


def rank_stop(trial_rows: TaskRows, peers_rows: Sequence[TaskRows], *, objective: str,
              directions: Mapping[str, bool], share: Fraction, weights: Mapping[str, float] | None = None) -> str:
    """Why the rank rule stops a trial ("" when it is promoted): of the ``n`` trials at the
    stage (it and ``peers_rows``, each cut to the trial's rows), only those with fewer than
    ``floor(n * share)`` trials strictly better than them go on (ties promote; ``n * share
    < 1`` promotes every one). Better: by the objective of the per-task means (``mean`` /
    ``min``), or for ``per_task`` by Pareto layer (non-dominated sorting of the means)."""
    import numpy as np

    from fitness.intervals import aggregate

    n = len(peers_rows) + 1
    keep = math.floor(n * Fraction(share))
    if keep < 1:
        return ""
    lengths = {task: len(rows) for task, rows in trial_rows.items()}
    everyone = [trial_rows, *(_prefix(rows, lengths, f"peer {i}") for i, rows in enumerate(peers_rows))]
    means = {task: np.array([float(np.mean(rows[task])) for rows in everyone]) for task in trial_rows}
    if objective == "per_task":  # each task signed so that higher is better
        layer = pareto_layers(np.stack([m if directions[t] else -m for t, m in means.items()], axis=1))
        better = int(np.sum(layer < layer[0]))
        what = f"Pareto layer {int(layer[0]) + 1}"
    else:
        higher = _one_direction(directions)
        value = aggregate(means, objective, weights, higher)
        better = int(np.sum(value > value[0] if higher else value < value[0]))
        what = f"objective {objective} estimate {float(value[0]):.4f}"
    if better < keep:
        return ""
    return (f"not among the best {keep} of the {n} trials at this stage ({better} better; {what} "
            f"on {sum(lengths.values())} rows; rule rank)")


def pareto_layers(signed: np.ndarray) -> np.ndarray:
    """Each row's non-dominated sorting layer (0 = the Pareto front) over ``signed`` (higher is better)."""
    import numpy as np

    layer = np.full(len(signed), -1, dtype=np.int64)
    remaining = list(range(len(signed)))
    current = 0
    while remaining:
        front = [i for i in remaining if not any(np.all(signed[j] >= signed[i]) and np.any(signed[j] > signed[i])
                                                 for j in remaining if j != i)]
        layer[front] = current
        remaining = [i for i in remaining if i not in front]
        current += 1
    return layer


def _prefix(rows: TaskRows, lengths: Mapping[str, int], who: str) -> dict[str, np.ndarray]:
    """``rows`` cut to the trial's rows per task (the same rows: both are prefixes of the study order)."""
    import numpy as np

    cut: dict[str, np.ndarray] = {}
    for task, n in lengths.items():
        if task not in rows:
            raise FitnessError(f"fidelity: {who} has no rows of task {task!r}")
        array = np.asarray(rows[task], dtype=np.float64)
        if array.size < n:
            raise FitnessError(f"fidelity: {who} has {array.size} rows of task {task!r}; the trial has {n}")
        cut[task] = array[:n]
    return cut


def _one_direction(directions: Mapping[str, bool]) -> bool:
    if len(set(directions.values())) != 1:
        raise FitnessError("fidelity: objectives mean / min need every task in one direction (use per_task)")
    return next(iter(directions.values()))

