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
        self._returned: int | None = None  # the ticket ``wait`` returned last

    def submit(self, ticket: int, recipe: dict, split: str = "search",
               rows: Mapping[str, Sequence[int]] | None = None) -> None:
        """``rows``: a multi-fidelity stage, only these search rows (``TrialWorker.evaluate``).

        The next stage of the trial ``wait`` just returned (promoted) runs before everything
        queued: a trial goes through its stages depth first, on the merge the model holds, and
        the trials after it are decided against it finished (``search.staged``: the rank rule
        ranks finished trials). Queued behind a CMA-ES generation instead, most members of a
        first generation went on to every row: none had finished when the others were ranked.
        """
        entry = (ticket, recipe, split, rows)
        if rows is not None and ticket == self._returned:
            self._queue.appendleft(entry)
        else:
            self._queue.append(entry)

    def free_slots(self) -> int:
        # A generation may be queued past ``size``; free slots never go negative.
        return max(0, self.size - len(self._queue))

    def wait(self, timeout: float | None = None) -> list[tuple[int, TrialOutcome]]:
        """Run the first queued trial and return it ([] when nothing is queued)."""
        if not self._queue:
            return []
        ticket, recipe, split, rows = self._queue.popleft()
        self._returned = ticket
        return [(ticket, self._worker.evaluate(recipe, split, rows))]

    def pending(self) -> list[int]:
        return [ticket for ticket, _, _, _ in self._queue]

    def close(self) -> None:
        self._queue.clear()


def make_pool(setup: WorkerSetup, execution: ExecutionConfig) -> WorkerPool:
    """The pool for ``execution.backend``: ``inline`` or ``ray``."""
    if execution.backend == "inline":
        return InlinePool(setup)
    if execution.backend == "ray":
        from search.ray_pool import RayPool

        return RayPool(setup, execution)
    raise SearchError(f"execution.backend: expected 'inline' or 'ray', got {execution.backend!r}")
