"""Worker pools: where trials run. ``InlinePool`` runs them in this process.

The driver talks to a pool through four calls: ``submit`` a ticket, ``free_slots``,
``wait`` for finished tickets, ``close``. Backends: ``inline`` (this module) and ``ray``
(``search.ray_pool.RayPool``, imported only when asked for).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Protocol

from search.config import ExecutionConfig
from search.errors import SearchError
from search.memory import check_local_memory
from search.worker import TrialOutcome, TrialWorker, WorkerSetup


class WorkerPool(Protocol):
    size: int

    def submit(self, ticket: int, recipe: dict, split: str = "search",
               rows: Mapping[str, Sequence[int]] | None = None) -> None: ...

    def free_slots(self) -> int: ...

    def wait(self, timeout: float | None = None) -> list[tuple[int, TrialOutcome]]: ...

    def close(self) -> None: ...


def evaluate_all(pool: WorkerPool, recipes: Sequence[dict], split: str) -> list[TrialOutcome]:
    """Evaluate recipes on the pool, keeping it full; outcomes in input order."""
    outcomes: dict[int, TrialOutcome] = {}
    next_index = 0
    while len(outcomes) < len(recipes):
        while next_index < len(recipes) and (pool.free_slots() > 0 or next_index - len(outcomes) == 0):
            pool.submit(next_index, recipes[next_index], split)
            next_index += 1
        for ticket, outcome in pool.wait():
            outcomes[ticket] = outcome
    return [outcomes[i] for i in range(len(recipes))]


class InlinePool:
    """One ``TrialWorker`` in the driver's process; submitted trials run inside ``wait``.

    ``size`` is 1: trials run one after another, and CMA-ES generations are still asked
    whole (the driver queues a generation, then waits for all of it).
    """

    def __init__(self, setup: WorkerSetup) -> None:
        self.size = 1
        # The same estimate the Ray pool checks, before a single tensor is loaded: an inline
        # study too big for this machine fails with the numbers instead of swapping to death.
        estimate = check_local_memory(setup)
        self._worker = TrialWorker(replace(setup, engine_plan=estimate.plan))
        self._queue: deque[tuple[int, dict, str, Mapping[str, Sequence[int]] | None]] = deque()
        self._ahead: dict[int, TrialOutcome] = {}  # queued stages evaluated before their turn (see wait)

    def submit(self, ticket: int, recipe: dict, split: str = "search",
               rows: Mapping[str, Sequence[int]] | None = None) -> None:
        """``rows``: a multi-fidelity stage, only these search rows (``TrialWorker.evaluate``)."""
        self._queue.append((ticket, recipe, split, rows))

    def free_slots(self) -> int:
        # A generation may be queued past ``size``; free slots never go negative.
        return max(0, self.size - len(self._queue))

    def wait(self, timeout: float | None = None) -> list[tuple[int, TrialOutcome]]:
        """Run the oldest queued trial and return it ([] when nothing is queued).

        Outcomes come back in the order submitted: the loop decides each stage on the trials told
        before it (``search.staged``), so that order is part of the study. What runs first may
        differ: a stage of the recipe the model holds (a trial promoted after the stage just told,
        queued behind a CMA-ES generation) is evaluated before the oldest trial merges over it,
        and kept until its turn; the same outcome (an evaluation depends on its recipe and rows
        alone), without merging that recipe again.
        """
        if not self._queue:
            return []
        ticket, recipe, split, rows = self._queue.popleft()
        outcome = self._ahead.pop(ticket, None)
        if outcome is None:
            for later, later_recipe, later_split, later_rows in self._queue:
                if later_rows is not None and later not in self._ahead and self._worker.holds(later_recipe):
                    self._ahead[later] = self._worker.evaluate(later_recipe, later_split, later_rows)
            outcome = self._worker.evaluate(recipe, split, rows)
        return [(ticket, outcome)]

    def pending(self) -> list[int]:
        return [ticket for ticket, _, _, _ in self._queue]

    def close(self) -> None:
        self._queue.clear()
        self._ahead.clear()


def make_pool(setup: WorkerSetup, execution: ExecutionConfig) -> WorkerPool:
    """The pool for ``execution.backend``: ``inline`` or ``ray``."""
    if execution.backend == "inline":
        return InlinePool(setup)
    if execution.backend == "ray":
        from search.ray_pool import RayPool

        return RayPool(setup, execution)
    raise SearchError(f"execution.backend: expected 'inline' or 'ray', got {execution.backend!r}")
