"""Multi-fidelity scoring in a study: the row order, the stages, and each decision's inputs.

``study.fidelity`` (``fitness.fidelity.FidelityConfig``) makes the search loop score each
trial in stages on growing prefixes of one row order, fixed for the whole study
(``fitness.fidelity.study_row_order`` over the search rows, seeded by the study seed). The
order's inputs (seed, rows per task) and its SHA-256 are stored once on the study (user attr
``fidelity``); a resumed run recomputes the order and refuses one that differs, so every
trial's prefix means the same rows.

After each stage :func:`StudyStages.decide` compares the trial's rows with, on the same
rows: the best feasible trial scored on every row so far (search trials and baselines;
``per_task``: every such trial on the Pareto front), and the gates (``max_regression``
paired with its source's rows). A trial stopped there is told ``PRUNED`` (``search.loop``).
With ``rule = "rank"`` it is also ranked among its peers (:func:`stage_peer_rows`): the search
trials already finished (told, in the driver's order of results) that hold this stage's rows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import optuna
from optuna.trial import FrozenTrial

from fitness.fidelity import (
    RULE_RANK,
    RULE_TEST,
    Decision,
    FidelityConfig,
    RowOrder,
    decide,
    pareto_layers,
    rows_to_score,
    stage_sizes,
    study_row_order,
)
from fitness.gates import gate_limits
from search import ranking
from search.baselines import source_baseline_name, source_references
from search.errors import SearchError
from search.plan import StudyPlan
from search.records import (
    EXAMPLE_ROWS_ATTR,
    FIDELITY_ATTR,
    decode_rows,
    trial_prefix_rows,
    trial_rows,
)

PROMOTED_ATTR = "fidelity_promoted"
"""Trial system attr: the last stage a running trial was promoted after (``search.loop``; a re-run of
a lost trial takes it over and does not decide that stage again)."""


@dataclass(frozen=True)
class StudyStages:
    """The study's row order and stage sizes, and the decision after each stage."""

    config: FidelityConfig
    order: RowOrder
    sizes: tuple[int, ...]  # rows held after each stage, all tasks together
    task_rows: dict[str, int]  # task -> search rows
    task_order: dict[str, np.ndarray]  # task -> file-order index of each row of the task's order
    # stored row texts -> their values (read-only): every decision reads every finished trial's rows
    _decoded: dict[str, np.ndarray] = field(default_factory=dict, compare=False, repr=False)

    @property
    def total(self) -> int:
        return self.sizes[-1]

    def next_rows(self, held: Mapping[str, int]) -> dict[str, list[int]]:
        """The rows of the first stage beyond what a trial holds (task -> file-order indices)."""
        size = next(s for s in self.sizes if s > sum(held.values()))
        return {task: rows for task, rows in rows_to_score(self.order, size, held).items() if rows}

    def at_stage_end(self, held: Mapping[str, int]) -> int | None:
        """The stage (1-based) a trial holding ``held`` rows has just finished, else None."""
        total = sum(held.values())
        return self.sizes.index(total) + 1 if total in self.sizes else None

    def in_study_order(self, rows: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A fully scored trial's rows (file order) in the study's row order."""
        return {task: np.asarray(rows[task], dtype=np.float64)[self.task_order[task]]
                for task in self.task_rows if task in rows}

    def in_file_order(self, rows: Mapping[str, Sequence[float]]) -> dict[str, tuple[float, ...]]:
        """Every row of each task in the study's order -> file order (how full rows are stored)."""
        out: dict[str, tuple[float, ...]] = {}
        for task, values in rows.items():
            array = np.empty(self.task_rows[task], dtype=np.float64)
            array[self.task_order[task]] = np.asarray(values, dtype=np.float64)
            out[task] = tuple(float(v) for v in array)
        return out

    def decide(self, trial_rows_so_far: Mapping[str, Sequence[float]], trials: Sequence[FrozenTrial],
               plan: StudyPlan, *, seed: int) -> Decision:
        """Promote or stop after a stage (the module's incumbents and gates)."""
        config = plan.config
        references = source_references(trials, plan.labels, "scores_search")
        limits = gate_limits(plan.gates, references, plan.task_higher)
        by_name = ranking.baseline_trials(trials)
        sources_rows: dict[str, dict[str, np.ndarray]] = {}
        for label in plan.labels:
            baseline = by_name.get(source_baseline_name(label))
            rows = None if baseline is None else trial_rows(baseline, {}, decode=self._decode)
            if rows is not None:
                sources_rows[label] = self.in_study_order(rows)
        incumbents = [self.in_study_order(rows)
                      for rows in _incumbent_rows(trials, plan, config.objective, decode=self._decode)]
        held = {task: len(v) for task, v in trial_rows_so_far.items()}
        peers = self.stage_peer_rows(trials, held) if self.config.rule == RULE_RANK else []
        return decide({task: np.asarray(v, dtype=np.float64) for task, v in trial_rows_so_far.items()},
                      incumbents, limits, objective=config.objective, directions=plan.task_higher,
                      config=self.config, weights={t.name: t.weight for t in config.tasks},
                      sources_rows=sources_rows, seed=seed, peers_rows=peers)

    def stage_peer_rows(self, trials: Sequence[FrozenTrial], held: Mapping[str, int]) -> list[dict[str, np.ndarray]]:
        """The rank rule's peers of a trial holding ``held`` rows per task (study order): every
        finished search trial (scored on every row, or stopped at this stage or later) cut to
        those rows. Running trials are left out: only results the driver has already told
        count, so the decision depends on the order of results, not on timing inside a stage."""
        peers: list[dict[str, np.ndarray]] = []
        for trial in trials:
            if ranking.kind(trial) != ranking.KIND_SEARCH or trial.state.name not in ("COMPLETE", "PRUNED"):
                continue
            full = trial_rows(trial, {}, decode=self._decode)
            rows = self.in_study_order(full) if full is not None else trial_prefix_rows(trial, decode=self._decode)
            if rows is None or any(task not in rows or rows[task].size < n for task, n in held.items()):
                continue  # stopped before this stage (or stored without per-row values)
            peers.append({task: rows[task][:n] for task, n in held.items()})
        return peers

    def _decode(self, text: str) -> np.ndarray:
        """``records.decode_rows`` once per stored text (a finished trial's rows never change; its
        values read-only, since every later decision shares them)."""
        values = self._decoded.get(text)
        if values is None:
            if len(self._decoded) >= 65536:  # a long study: start over rather than grow without end
                self._decoded.clear()
            values = decode_rows(text)
            values.flags.writeable = False
            self._decoded[text] = values
        return values


def study_stages(study: optuna.Study, plan: StudyPlan) -> StudyStages | None:
    """The study's stages (None without ``study.fidelity``), once the baselines stored the rows
    per task; records the order on the first run and refuses a resumed run whose order differs."""
    config = plan.config.fidelity
    if config is None:
        return None
    example_rows = study.user_attrs.get(EXAMPLE_ROWS_ATTR, {})
    search = example_rows.get("search", {}) if isinstance(example_rows, Mapping) else {}
    task_rows: dict[str, int] = {}
    for task in plan.tasks:
        if task.name not in search:
            raise SearchError(f"study.fidelity: task {task.name!r} has no per-row search values stored "
                              f"(study user attr {EXAMPLE_ROWS_ATTR}); it cannot be scored in stages")
        task_rows[task.name] = int(search[task.name]["n"])
    order = study_row_order(task_rows, plan.config.seed)
    digest = hashlib.sha256(json.dumps(order).encode()).hexdigest()
    sizes = stage_sizes(sum(task_rows.values()), config)
    record = {"seed": plan.config.seed, "rows": task_rows, "order_sha256": digest, "first_stage": config.first_stage,
              "growth": config.growth, "confidence": config.confidence, "stages": list(sizes)}
    if config.rule != RULE_TEST:  # absent: rule test (studies stored before the rule existed read the same)
        record["rule"] = config.rule
        record["promote"] = float(config.promoted_share)
    stored = study.user_attrs.get(FIDELITY_ATTR)
    if isinstance(stored, Mapping) and stored.get("order_sha256") != digest:
        raise SearchError(
            f"study.fidelity: this study's trials were scored in another row order (study user attr "
            f"{FIDELITY_ATTR}: seed {stored.get('seed')}, rows {stored.get('rows')}; now seed "
            f"{plan.config.seed}, rows {task_rows}); a resumed study must keep its search rows and seed"
        )
    if stored != record:
        study.set_user_attr(FIDELITY_ATTR, record)  # first run, or new stage settings over the same order
    return stages_of(config, order, task_rows)


def stages_of(config: FidelityConfig, order: RowOrder, task_rows: Mapping[str, int]) -> StudyStages:
    """The stages of ``config`` over ``order`` (``study_row_order`` of ``task_rows``); touches no study."""
    task_order: dict[str, list[int]] = {task: [] for task in task_rows}
    for task, row in order:
        task_order[task].append(row)
    return StudyStages(config, order, stage_sizes(sum(task_rows.values()), config), dict(task_rows),
                       {task: np.asarray(rows, dtype=np.int64) for task, rows in task_order.items()})


def _incumbent_rows(trials: Sequence[FrozenTrial], plan: StudyPlan, objective: str, *,
                    decode: Callable[[str], np.ndarray] | None = None) -> list[dict[str, np.ndarray]]:
    """The rows (file order) of the trials a stage is compared with: the best feasible trial scored
    on every row (``per_task``: each one on the Pareto front), baselines included."""
    candidates = ((t, trial_rows(t, {}, decode=decode)) for t in ranking.ranked(trials, plan.directions)
                  if ranking.is_feasible(t))
    if objective != "per_task":  # the best one only: the others' rows are not decoded
        best = next((rows for _, rows in candidates if rows is not None), None)
        return [] if best is None else [best]
    scored = [(t, rows) for t, rows in candidates if rows is not None]
    if not scored:
        return []
    signed = np.array([[v if d == "maximize" else -v for v, d in zip(ranking.raw_values(t), plan.directions,
                                                                     strict=True)] for t, _ in scored])
    return [rows for (_, rows), layer in zip(scored, pareto_layers(signed), strict=True) if layer == 0]
