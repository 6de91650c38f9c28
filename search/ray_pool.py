"""Trial workers as Ray actors: resident models, asynchronous scheduling, restarts.

Each actor builds a ``TrialWorker`` from disk in its own ``__init__`` (base and sources
stay resident on its device), so Ray can rebuild it after a crash (``max_restarts``).
Per trial only the recipe dict goes in and only the ``TrialOutcome`` comes back; no
tensor crosses the object store. ``wait`` hands back trials as they finish, and a trial
queued behind each worker starts the moment that worker frees up, so the workers stay
busy while the driver stores results and samples, without a generation barrier.

A trial whose worker dies (SIGKILL, OOM kill, node loss) is re-run once on a live
worker; if that worker dies too, the trial comes back failed with the reason. A dead
actor is probed until Ray has restarted it, then takes trials again. When no worker is
left, trials still queued never ran: ``wait`` raises :class:`NoWorkersLeftError` naming
them instead of reporting them failed, so the driver releases them (they re-run on
resume) rather than spending budget on them.
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import psutil
import ray
from ray.exceptions import RayActorError, RayTaskError

from search.errors import SearchError
from search.memory import GIB, MemoryEstimate, NodeCapacity, plan_workers, worker_memory_breakdown

if TYPE_CHECKING:
    from search.config import ExecutionConfig
    from search.worker import TrialOutcome, WorkerSetup

QUEUED_PER_WORKER = 1
"""Trials queued behind each busy worker: the next one starts the moment a worker returns,
while the driver is still storing the last result and sampling (its time is then hidden
behind the workers' instead of added to every trial)."""
RERUNS_AFTER_DEATH = 1
"""How often a trial whose worker died is run again before it is reported failed."""
STARTUP_TIMEOUT_S = 900.0
"""Longest wait for every actor to load its checkpoints and slices."""
PROBE_PAUSE_S = 0.2
"""Pause between liveness probes of an actor Ray reports temporarily unavailable."""
PROJECT_PACKAGES = ("fitness", "genome", "merges", "search", "studies")
"""Shipped to the workers (job runtime_env py_modules) when the pool joins a cluster by address."""

log = logging.getLogger(__name__)


class NoWorkersLeftError(SearchError):
    """Every worker is gone; ``tickets`` were queued and never finished on a worker."""

    def __init__(self, message: str, tickets: list[int]) -> None:
        super().__init__(message)
        self.tickets = tickets


class _TrialActor:
    """The Ray actor: one ``TrialWorker`` with its models resident, built from disk."""

    def __init__(self, setup: WorkerSetup, memory_needed: int) -> None:
        """``memory_needed``: bytes the worker's tensors and activations take on its device."""
        import torch

        if setup.threads:
            torch.set_num_threads(setup.threads)
        if setup.device == "cuda":
            free, _ = torch.cuda.mem_get_info()
            if free < memory_needed:
                raise SearchError(
                    f"1 worker × {memory_needed / GIB:.2f} GiB needed, {free / GIB:.2f} GiB GPU memory "
                    f"free on node {ray.get_runtime_context().get_node_id()}; lower execution.batch_size "
                    "or the number of sources"
                )
        # lazy: the worker module pulls in torch / transformers
        from search.worker import TrialWorker

        self._worker = TrialWorker(setup)
        # Ray's node id, not the hostname: several Ray nodes may share one machine
        self._name = f"{ray.get_runtime_context().get_node_id()}:{os.getpid()}"

    def evaluate(self, recipe: dict, split: str, rows: dict[str, list[int]] | None = None) -> TrialOutcome:
        outcome = self._worker.evaluate(recipe, split, rows)
        return replace(outcome, worker=self._name)

    def identity(self) -> dict[str, str | int]:
        identity = dict(self._worker.identity())
        identity["node_id"] = ray.get_runtime_context().get_node_id()
        identity["pid"] = os.getpid()
        return identity


@dataclass
class _Job:
    ticket: int
    recipe: dict
    split: str
    rows: dict[str, list[int]] | None = None  # a multi-fidelity stage (TrialWorker.evaluate)
    deaths: int = 0  # how many workers died holding it


@dataclass
class _Running:
    job: _Job
    actor: int


class RayPool:
    """``execution.workers`` resident-model actors behind the ``WorkerPool`` protocol."""

    def __init__(self, setup: WorkerSetup, execution: ExecutionConfig) -> None:
        if execution.workers < 1:
            raise SearchError(f"execution.workers: must be >= 1, got {execution.workers}")
        self.size = execution.workers
        self._address = execution.address or os.environ.get("RAY_ADDRESS") or None
        self._connected = _connect(self._address)
        self._actors: list[ray.actor.ActorHandle | None] = []
        self._identities: dict[int, dict[str, str | int]] = {}
        self._idle: deque[int] = deque()
        self._pending: deque[_Job] = deque()
        self._running: dict[ray.ObjectRef, _Running] = {}
        self._probes: dict[ray.ObjectRef, int] = {}
        self._finished: list[tuple[int, TrialOutcome]] = []
        self._returned: set[int] = set()  # the tickets ``wait`` returned last
        self._last_death = ""
        try:
            self._start_actors(setup, execution)
        except BaseException:
            self.close()
            raise

    # -- WorkerPool -----------------------------------------------------------------

    def submit(self, ticket: int, recipe: dict, split: str = "search",
               rows: Mapping[str, Sequence[int]] | None = None) -> None:
        """Queue a trial; it starts on the next free actor (now, when one is idle).

        The next stage of a trial ``wait`` just returned (promoted) goes before the queued
        trials, as in ``InlinePool``: promoted trials finish first, and later trials are ranked
        against them (``search.staged``).
        """
        if self._alive() == 0:
            raise SearchError(f"no live Ray workers left ({self._last_death}); the study cannot go on")
        if self._holds(ticket):
            raise SearchError(f"ticket {ticket} is already in the Ray pool")
        job = _Job(ticket, recipe, split, None if rows is None else {task: list(r) for task, r in rows.items()})
        if rows is not None and ticket in self._returned:
            self._pending.appendleft(job)
        else:
            self._pending.append(job)
        self._dispatch()

    def free_slots(self) -> int:
        """Trials the pool takes now: a running one plus ``QUEUED_PER_WORKER`` waiting, per worker up."""
        up = self._alive() - len(self._probes)
        return max(0, up * (1 + QUEUED_PER_WORKER) - len(self._running) - len(self._pending))

    def wait(self, timeout: float | None = None) -> list[tuple[int, TrialOutcome]]:
        """Finished ``(ticket, outcome)`` pairs: at least one, unless ``timeout`` s pass or nothing is queued.

        With no trial queued or running it returns [] once every restarting worker is back
        (or gone), so ``wait()`` on an empty pool also means "all workers settled". With
        trials queued and no worker left it raises :class:`NoWorkersLeftError` (after
        handing back what did finish).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._finished:
            self._dispatch()
            refs = [*self._running, *self._probes]
            if not refs:
                break
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, rest = ray.wait(refs, num_returns=1, timeout=left)
            if not ready:
                break
            if rest:  # collect everything else that is already done too
                more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
                ready += more
            for ref in ready:
                if ref in self._running:
                    self._collect(ref)
                else:
                    self._probed(ref)
            if self._alive() == 0:
                break
        self._dispatch()  # freed workers take queued trials before the driver gets control
        finished, self._finished = self._finished, []
        self._returned = {ticket for ticket, _ in finished}
        if not finished and self._pending and self._alive() == 0:
            # Not failures of these trials: nothing is left to run them. They stay queued
            # (unspent) and the caller releases them.
            tickets = self.pending()
            raise NoWorkersLeftError(
                f"no live Ray workers left ({self._last_death}); trial(s) {', '.join(map(str, tickets))} "
                "were not run and run again on resume", tickets,
            )
        return finished

    def close(self) -> None:
        """Stop the actors; stop a local runtime this pool started, or leave a cluster it joined.

        A cluster joined by address keeps running (``ray.shutdown`` only disconnects this
        driver); a runtime that was already connected before the pool is left as it was.
        """
        if ray.is_initialized():
            for actor in self._actors:
                if actor is not None:
                    ray.kill(actor, no_restart=True)
        self._actors = []
        self._idle.clear()
        self._running.clear()
        self._probes.clear()
        if self._connected and ray.is_initialized():
            ray.shutdown()
        self._connected = False

    # -- introspection ----------------------------------------------------------------

    def pending(self) -> list[int]:
        """Tickets waiting for a free worker (submitted past the free slots, or re-queued)."""
        return [job.ticket for job in self._pending]

    def workers(self) -> list[dict[str, str | int]]:
        """``identity()`` (node_id, pid, hostname) of each actor that is up, by actor index.

        An actor Ray is restarting is left out until it answers again.
        """
        restarting = set(self._probes.values())
        return [self._identities[i] for i in sorted(self._identities) if i not in restarting]

    # -- internals ----------------------------------------------------------------------

    def _start_actors(self, setup: WorkerSetup, execution: ExecutionConfig) -> None:
        cuda = setup.device == "cuda"
        threads = setup.threads or max(1, math.floor(execution.cpus_per_worker))
        setup = replace(setup, threads=threads, engine_threads=None)  # a Ray worker merges on its CPU share
        estimate = worker_memory_breakdown(setup, workers=execution.workers)
        setup = replace(setup, engine_plan=estimate.plan)  # every worker runs the plan the estimate is for
        per_worker = estimate.total
        gpus = (execution.gpus_per_worker or 1.0) if cuda else 0.0
        _check_capacity(per_worker, execution, gpus=gpus, estimate=estimate)
        options: dict[str, object] = {
            "num_cpus": execution.cpus_per_worker,
            "num_gpus": gpus,
            "max_restarts": execution.max_worker_restarts,
            "max_task_retries": 0,  # the pool re-runs a dead worker's trial itself, once
        }
        if not cuda:
            options["memory"] = per_worker  # Ray then never packs more onto a node than fits
        actor_class = ray.remote(_TrialActor).options(**options)
        on_device = per_worker - estimate.runtime  # what must fit in GPU memory on cuda
        self._actors = [actor_class.remote(setup, on_device) for _ in range(execution.workers)]
        probes = {actor.identity.remote(): index for index, actor in enumerate(self._actors)}
        ready, not_ready = ray.wait(list(probes), num_returns=len(probes), timeout=STARTUP_TIMEOUT_S)
        if not_ready:
            raise SearchError(
                f"{len(not_ready)} of {execution.workers} Ray workers did not start within "
                f"{STARTUP_TIMEOUT_S:.0f} s; check the cluster's free CPUs/GPUs (`ray status`)"
            )
        for ref in ready:
            index = probes[ref]
            try:
                self._identities[index] = ray.get(ref)
            except (RayActorError, RayTaskError) as exc:
                raise SearchError(f"Ray worker {index} failed to start: {_reason(exc)}") from exc
            self._idle.append(index)
        self._idle = deque(sorted(self._idle))

    def _dispatch(self) -> None:
        while self._pending and self._idle:
            job = self._pending.popleft()
            index = self._idle.popleft()
            actor = self._actors[index]
            assert actor is not None  # dead actors never return to the idle queue
            ref = actor.evaluate.remote(job.recipe, job.split, job.rows)
            self._running[ref] = _Running(job, index)

    def _collect(self, ref: ray.ObjectRef) -> None:
        running = self._running.pop(ref)
        job, index = running.job, running.actor
        try:
            outcome: TrialOutcome = ray.get(ref)
        except RayActorError as exc:
            self._on_death(job, index, exc)
            return
        except RayTaskError as exc:  # TrialWorker.evaluate must not raise; keep the study going anyway
            outcome = _failed(f"worker error: {_reason(exc)}", self._name(index))
        self._idle.append(index)
        self._finished.append((job.ticket, outcome))

    def _on_death(self, job: _Job, index: int, exc: RayActorError) -> None:
        job.deaths += 1
        name = self._dead_name(index, exc)
        self._last_death = f"worker {name} died: {_reason(exc)}"
        log.warning("%s; trial %d %s", self._last_death, job.ticket,
                    "re-queued" if job.deaths <= RERUNS_AFTER_DEATH else "failed")
        if job.deaths <= RERUNS_AFTER_DEATH:
            self._pending.appendleft(job)
        else:
            reason = f"worker died: {name}: {_reason(exc)}"
            self._finished.append((job.ticket, _failed(reason, name)))
        self._probe(index)

    def _probe(self, index: int) -> None:
        """Ask a crashed actor who it is: Ray answers once it has restarted it, or says it is gone."""
        actor = self._actors[index]
        if actor is not None:
            self._probes[actor.identity.remote()] = index

    def _probed(self, ref: ray.ObjectRef) -> None:
        index = self._probes.pop(ref)
        try:
            self._identities[index] = ray.get(ref)
        except RayActorError as exc:
            if _is_gone(exc):
                self._last_death = f"worker {self._dead_name(index, exc)} is gone: {_reason(exc)}"
                log.warning("%s", self._last_death)
                self._actors[index] = None
                self._identities.pop(index, None)
            else:  # still restarting
                time.sleep(PROBE_PAUSE_S)
                self._probe(index)
            return
        self._idle.append(index)

    def _alive(self) -> int:
        return sum(actor is not None for actor in self._actors)

    def _holds(self, ticket: int) -> bool:
        return any(job.ticket == ticket for job in self._pending) or any(
            running.job.ticket == ticket for running in self._running.values()
        )

    def _name(self, index: int) -> str:
        identity = self._identities.get(index)
        return f"{identity['node_id']}:{identity['pid']}" if identity else f"actor {index}"

    def _dead_name(self, index: int, exc: RayActorError) -> str:
        """The process that died, by the pid Ray reports for it.

        The identity the pool recorded can be an earlier process of the same actor: Ray
        restarts an actor that dies while idle without the pool seeing it.
        """
        pid = _dead_pid(exc)
        identity = self._identities.get(index)
        if pid is None or identity is None:
            return self._name(index)
        return f"{identity['node_id']}:{pid}"


def _connect(address: str | None) -> bool:
    """Join ``address`` or start a local runtime; False when Ray was already connected."""
    if ray.is_initialized():
        return False
    quiet = logging.getLogger("ray._private.authentication.authentication_token_setup")
    previous = quiet.level
    quiet.setLevel(logging.ERROR)  # "token auth is enabled" on every local start
    try:
        if address is None:
            # "local" and not None: None would join whatever cluster /tmp/ray last recorded
            ray.init(address="local", include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING)
        else:
            _check_reachable(address)
            # Ray uploads local folders only at the job level, so the code ships here, once
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING,
                     runtime_env={"py_modules": _project_module_dirs()})
    except ConnectionError as exc:
        raise SearchError(f"execution.address: cannot join the Ray cluster at {address}: {exc}") from exc
    finally:
        quiet.setLevel(previous)
    return True


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Fail fast when nothing listens at a ``host:port`` address (Ray itself retries for minutes)."""
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if address == "auto" or not host or not port.isdigit():
        return  # "auto" or a form Ray resolves itself; let ray.init judge it
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise SearchError(
            f"execution.address: nothing answers at {target} ({exc.strerror or exc}); "
            "is `ray start --head` running there, and is the port open?"
        ) from exc


def _check_capacity(
    per_worker: int, execution: ExecutionConfig, *, gpus: float, estimate: MemoryEstimate | None = None
) -> None:
    """Fail before starting actors when the cluster cannot hold them by CPUs/GPUs or RAM.

    ``gpus``: the GPU share each worker asks for (0 on CPU); ``estimate``: the parts of
    ``per_worker``, named in the message when not even one worker fits.
    """
    cuda = gpus > 0
    here = ray.util.get_node_ip_address()
    nodes: list[NodeCapacity] = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        resources: Mapping[str, float] = node.get("Resources", {})
        cpu = execution.cpus_per_worker
        slots = int(resources.get("CPU", 0) // cpu) if cpu > 0 else execution.workers
        if cuda:
            slots = min(slots, int(resources.get("GPU", 0) // gpus))
        available = int(resources.get("memory", 0))
        if node.get("NodeManagerAddress") == here:
            available = min(available, psutil.virtual_memory().available)
        nodes.append(NodeCapacity(node=str(node["NodeID"]), available=available, slots=slots))
    unit = f"{gpus:g} GPU" if cuda else f"{execution.cpus_per_worker:g} CPU"
    if sum(node.slots for node in nodes) < execution.workers:
        have = sum(n.slots for n in nodes)
        lower = "execution.gpus_per_worker" if cuda else "execution.cpus_per_worker"
        advice = f"lower execution.workers to {have} or {lower}" if have else f"lower {lower}"
        raise SearchError(
            f"{execution.workers} workers × {unit} requested, the Ray cluster has room for {have}; "
            f"{advice}, or add nodes"
        )
    if not cuda:  # GPU memory is checked on the worker's own GPU, in the actor
        plan_workers(per_worker, execution.workers, nodes, memory_kind="RAM", estimate=estimate)


def _project_module_dirs() -> list[str]:
    import importlib

    return [os.path.dirname(importlib.import_module(name).__file__ or "") for name in PROJECT_PACKAGES]


def _is_gone(exc: RayActorError) -> bool:
    """True when Ray will not restart the actor (restarts used up, killed, node lost for good)."""
    from ray.exceptions import ActorUnavailableError

    return not isinstance(exc, ActorUnavailableError)


def _dead_pid(exc: RayActorError) -> int | None:
    """The pid in an ``ActorDiedError``'s message (Ray writes the dead process's ``pid: N`` line)."""
    match = re.search(r"^\s*pid: (\d+)\s*$", str(exc), re.MULTILINE)
    return int(match.group(1)) if match else None


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _failed(reason: str, worker: str) -> TrialOutcome:
    from search.worker import TrialOutcome

    return TrialOutcome(scores=None, merge_s=0.0, score_s=0.0, error=reason, worker=worker)

