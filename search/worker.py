"""The trial worker: one resident merge engine, one live model, the encoded task slices.

A worker builds itself from disk (so a Ray actor can be restarted anywhere), then
``evaluate`` merges a recipe into its live model in place and scores every task, or with
``rows`` (a multi-fidelity stage, ``search.loop``) only those rows of the search split
(``fitness.select``); a stage of the recipe merged last is scored without merging again.
Trial-level failures (a non-finite merge, a scorer that raises) come back as
``TrialOutcome.error``; ``evaluate`` never raises for them, so one bad candidate cannot
stop a study. Both the inline pool and the Ray pool run this same class.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fitness.errors import FitnessError
from fitness.lm_eval_task import LmEvalTask, load_lm_eval_tasks
from fitness.spec import SPLITS, TEST_SPLIT, TaskSpec
from merges.errors import MergeError
from merges.recipe import Recipe
from merges.tokenizer_union import TokenizerPolicy
from search.errors import SearchError
from search.records import row_ids

if TYPE_CHECKING:
    from fitness.slices import EncodedSlice


@dataclass(frozen=True)
class WorkerSetup:
    """Everything a worker needs to build itself from disk (picklable)."""

    base: str
    sources: tuple[str, ...]
    tasks: tuple[TaskSpec, ...]
    device: str  # resolved: "cpu" or "cuda"
    dtype: str
    batch_size: int
    allow_pickle: bool = False
    trust_remote_code: bool = False
    threads: int | None = None  # torch intra-op threads for this worker (its scores' bits depend on it)
    # The merge engine's threads (None: ``threads``). Any count gives the same tensors bit for bit,
    # so an inline worker, alone on its machine, merges on every core and scores on ``threads``.
    engine_threads: int | None = None
    tokenizer: TokenizerPolicy | None = None  # models.tokenizer: the sources' vocabularies merged (picklable)
    methods: tuple[str, ...] = ()  # the merge methods trials can run (the memory plan's statistics)
    memory_gb: float | None = None  # execution.memory_gb: the budget the engine plan must fit
    engine_plan: str | None = None  # merges.engine plan, chosen by search.memory before loading (None: resident)

    @property
    def merge_threads(self) -> int | None:
        """The merge engine's threads: ``engine_threads``, else ``threads`` (None: the engine's default)."""
        return self.engine_threads or self.threads


@dataclass(frozen=True)
class TrialOutcome:
    """What one evaluation produced; ``scores`` is None exactly when ``error`` says why."""

    scores: dict[str, float] | None
    merge_s: float
    score_s: float
    error: str | None = None
    worker: str = ""  # "node_id:pid"
    # held-out split only: per generation task, one record per example (search.generations)
    generations: dict[str, list[dict[str, object]]] | None = None
    # task -> one value per row (search.records); lm-eval tasks: per document, when lm-eval averages them
    rows: dict[str, tuple[float, ...]] | None = None
    # task -> which rows those are ({"n", "ids"}, search.records.row_ids), the same every trial
    row_ids: dict[str, dict[str, object]] | None = None


class TrialWorker:
    """Loads checkpoints, engine, live model and encoded slices once; evaluates recipes."""

    def __init__(self, setup: WorkerSetup) -> None:
        # Imported here so that importing this module (for WorkerSetup) stays cheap.
        from transformers import AutoTokenizer

        from fitness.slices import load_task
        from merges.engine import MergeEngine
        from merges.preflight import open_and_preflight
        from merges.tokenizer_union import VocabularyView

        if setup.threads is not None:
            torch.set_num_threads(max(1, setup.threads))
        dtype = getattr(torch, setup.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise SearchError(f"worker setup: dtype {setup.dtype!r} is not a torch dtype")
        self.setup = setup
        base, sources, self.layout = open_and_preflight(setup.base, setup.sources, allow_pickle=setup.allow_pickle,
                                                        tokenizer=setup.tokenizer,
                                                        trust_remote_code=setup.trust_remote_code)
        self.engine = MergeEngine(base, sources, device=setup.device, dtype=dtype,
                                  plan=setup.engine_plan or "resident", threads=setup.merge_threads)
        self.model = self.engine.new_model(trust_remote_code=setup.trust_remote_code)
        self.model.eval()
        if isinstance(base, VocabularyView):  # the merged model's own tokenizer, as it ships
            tokenizer = base.output_tokenizer()
        else:
            tokenizer = AutoTokenizer.from_pretrained(
                setup.base, trust_remote_code=setup.trust_remote_code
            )
        lm_eval_tasks: dict[str, LmEvalTask] = {}
        if any(spec.lm_eval is not None for spec in setup.tasks):
            lm_eval_tasks = load_lm_eval_tasks([s for s in setup.tasks if s.lm_eval is not None], self.model,
                                               tokenizer, batch_size=setup.batch_size)
        self.tasks = {
            spec.name: lm_eval_tasks[spec.name] if spec.name in lm_eval_tasks
            else load_task(spec, tokenizer, batch_size=setup.batch_size) for spec in setup.tasks
        }
        self._merged: Mapping[str, object] | None = None  # the recipe in self.model (staged evaluations)
        self._stage_slices: dict[tuple[str, tuple[int, ...]], EncodedSlice] = {}  # every trial's stages alike
        self._node_id = _node_id()
        self._row_ids = {
            split: row_ids({name: [(e.file.name, e.row) for e in getattr(data, split).examples]
                            for name, data in self.tasks.items()
                            if not isinstance(data, LmEvalTask) and getattr(data, split) is not None}
                           | {name: ids for name, data in self.tasks.items()
                              if isinstance(data, LmEvalTask) and (ids := data.row_ids(split)) is not None})
            for split in (*SPLITS, TEST_SPLIT)
        }

    def identity(self) -> dict[str, str | int]:
        return {"node_id": self._node_id, "pid": os.getpid(), "hostname": socket.gethostname()}

    def evaluate(self, recipe: Mapping[str, object] | Recipe, split: str = "search",
                 rows: Mapping[str, Sequence[int]] | None = None) -> TrialOutcome:
        """Merge ``recipe`` into the live model and score every task on ``split``.

        ``rows`` (search split only): score just these rows (task -> indices into the task's
        search slice, in the order wanted); a task not named, or with no rows, is not scored.
        ``scores`` are then the means over those rows and ``rows`` their values in that order.
        """
        worker = f"{self._node_id}:{os.getpid()}"
        if split not in (*SPLITS, TEST_SPLIT):
            return TrialOutcome(None, 0.0, 0.0, f"unknown split {split!r} (expected one of {SPLITS} or "
                                f"{TEST_SPLIT!r})", worker)
        if rows is not None and split != "search":
            return TrialOutcome(None, 0.0, 0.0, f"rows are scored in stages on the search split only, not {split!r}",
                                worker)
        start = time.perf_counter()
        plain = recipe.to_dict() if isinstance(recipe, Recipe) else recipe
        try:
            if rows is None or plain != self._merged:
                self._merged = None  # a merge that fails half way leaves the model unknown
                parsed = recipe if isinstance(recipe, Recipe) else Recipe.from_dict(recipe)
                self.engine.merge_into(self.model, parsed)
                self._merged = plain if rows is not None else None
        except MergeError as exc:
            return TrialOutcome(None, time.perf_counter() - start, 0.0, f"merge failed: {exc}", worker)
        except Exception as exc:  # an engine bug must fail this trial, not the whole study
            return TrialOutcome(
                None, time.perf_counter() - start, 0.0,
                f"merge failed: {type(exc).__name__}: {exc}", worker,
            )
        merged = time.perf_counter()
        scores: dict[str, float] = {}
        values: dict[str, tuple[float, ...]] = {}
        generations: dict[str, list[dict[str, object]]] = {}
        try:
            from fitness.scoring import score_slice_rows

            with torch.inference_mode():
                for name, data in self.tasks.items():
                    if rows is not None and not rows.get(name):
                        continue  # this stage needs no row of this task
                    if isinstance(data, LmEvalTask):  # runs on self.model, which lm-eval's HFLM wraps
                        result = data.run(split, rows=None if rows is None else rows[name])
                        scores[name] = result.score
                        if result.rows is not None:
                            values[name] = tuple(result.rows)
                        continue
                    encoded = getattr(data, split)  # search, heldout or test (None: no test file)
                    if encoded is None:
                        raise FitnessError(f"task {name!r} has no {split} split (set its `{split}` file)")
                    if rows is not None:
                        encoded = self._selected(name, encoded, rows[name])
                    score, values[name], records = score_slice_rows(self.model, encoded, device=self.setup.device)
                    scores[name] = float(score)
                    if records is not None and split == "heldout":  # kept for the finalists only
                        generations[name] = records
        except Exception as exc:
            # A user scorer (any exception type) or a degenerate model: this trial fails,
            # the study goes on.
            failed_task = next((t for t in self.tasks if t not in scores), "?")
            # A FitnessError already names the task, split and scorer.
            reason = str(exc) if isinstance(exc, FitnessError) else f"{type(exc).__name__}: {exc}"
            return TrialOutcome(
                None, merged - start, time.perf_counter() - merged,
                f"scoring task {failed_task!r} failed: {reason}", worker,
            )
        bad = [t for t, v in scores.items() if v != v or v in (float("inf"), float("-inf"))]
        if bad:
            return TrialOutcome(
                None, merged - start, time.perf_counter() - merged,
                f"scoring produced a non-finite score for task(s) {bad}", worker,
            )
        return TrialOutcome(scores, merged - start, time.perf_counter() - merged, None, worker,
                            generations or None, values or None,
                            None if rows is not None else self._row_ids[split] or None)

    def _selected(self, task: str, encoded: EncodedSlice, rows: Sequence[int]) -> EncodedSlice:
        """The rows of one stage of ``task``, batched once (the stages are the same for every trial)."""
        from fitness.select import select_rows

        key = (task, tuple(rows))
        if key not in self._stage_slices:
            if len(self._stage_slices) >= 64:  # resumed trials' odd stages: keep the cache small
                self._stage_slices.clear()
            self._stage_slices[key] = select_rows(encoded, rows)
        return self._stage_slices[key]


def _node_id() -> str:
    """The Ray node id when running inside Ray, else the host name."""
    ray = sys.modules.get("ray")  # not imported: not in Ray (and importing it costs seconds)
    if ray is not None and ray.is_initialized():
        return str(ray.get_runtime_context().get_node_id())
    return socket.gethostname()
