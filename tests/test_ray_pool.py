"""RayPool on one local Ray runtime: dead workers, ticket bookkeeping, the memory check.

One Ray runtime for the whole module (each ``ray.init`` costs ~6 s on this machine);
each test builds its own small pool on it. Worker death is made deterministic by
freezing the actor (SIGSTOP) before handing it a trial and then SIGKILLing it: the
trial is certainly in flight and never finished when the worker dies.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from search.errors import SearchError
from search.memory import (
    GIB,
    NodeCapacity,
    estimate_from_shape,
    estimate_worker_memory,
    model_shape,
    plan_workers,
)
from tests.checkpoints import TinyFamily

pytestmark = pytest.mark.ray  # see conftest: Ray tests share one xdist worker


# -- memory estimate (no Ray) -----------------------------------------------------------


def test_estimate_covers_the_resident_checkpoints(llama_family: TinyFamily) -> None:
    shape = model_shape(str(llama_family.base))
    weights = sum(path.stat().st_size for path in llama_family.base.glob("*.safetensors"))
    estimate = estimate_from_shape(shape, n_sources=3, dtype="float32", batch_size=8, seq_len=32)
    # base + 3 task vectors held resident, plus a live model: at least 5 checkpoints' worth
    assert estimate.resident + estimate.live_model >= 5 * shape.numel * 4
    assert shape.numel * 4 <= weights < shape.numel * 4 + 64 * 1024  # header only on top
    assert estimate.total > estimate.resident + estimate.live_model + estimate.runtime


def test_estimate_grows_with_sources_batch_and_width(llama_family: TinyFamily) -> None:
    shape = model_shape(str(llama_family.base))
    one = estimate_from_shape(shape, n_sources=1, dtype="float32", batch_size=8).total
    three = estimate_from_shape(shape, n_sources=3, dtype="float32", batch_size=8).total
    big_batch = estimate_from_shape(shape, n_sources=1, dtype="float32", batch_size=512).total
    half = estimate_from_shape(shape, n_sources=1, dtype="bfloat16", batch_size=8).total
    assert three - one == 2 * 2 * shape.numel * 4 + 2 * shape.largest_tensor * 4
    assert big_batch > one > half
    # int32 rank keys do not shrink with the arithmetic dtype
    half_resident = estimate_from_shape(shape, n_sources=1, dtype="bfloat16", batch_size=8).resident
    assert half_resident == shape.numel * (2 * 2 + 4)


def test_unknown_dtype_is_named() -> None:
    from search.memory import ModelShape

    shape = ModelShape(numel=10, largest_tensor=5, hidden=4, intermediate=8, vocab=16, max_positions=32)
    with pytest.raises(SearchError, match="execution dtype.*'int8'"):
        estimate_from_shape(shape, n_sources=1, dtype="int8", batch_size=1)


def test_budget_overrun_names_the_numbers() -> None:
    per_worker = int(3.1 * GIB)
    node = NodeCapacity(node="node-a", available=int(7.8 * GIB), slots=4)
    with pytest.raises(SearchError) as info:
        plan_workers(per_worker, 4, [node], memory_kind="RAM")
    message = str(info.value)
    assert "4 workers × 3.10 GiB needed" in message
    assert "7.80 GiB RAM available on node node-a" in message
    assert "lower execution.workers" in message
    assert plan_workers(per_worker, 2, [node], memory_kind="RAM") == {"node-a": 2}


@settings(max_examples=60, deadline=None)
@given(
    per_worker=st.integers(1, 10 * GIB),
    workers=st.integers(1, 8),
    nodes=st.lists(st.tuples(st.integers(0, 40 * GIB), st.integers(0, 4)), min_size=1, max_size=4),
)
def test_plan_respects_slots_and_memory(per_worker: int, workers: int, nodes: list[tuple[int, int]]) -> None:
    capacities = [NodeCapacity(node=f"n{i}", available=a, slots=s) for i, (a, s) in enumerate(nodes)]
    room = sum(min(c.slots, c.available // per_worker) for c in capacities)
    if room < workers:
        with pytest.raises(SearchError, match=rf"{workers} workers? × "):
            plan_workers(per_worker, workers, capacities, memory_kind="RAM")
        return
    plan = plan_workers(per_worker, workers, capacities, memory_kind="RAM")
    assert sum(plan.values()) == workers
    by_name = {c.node: c for c in capacities}
    for name, count in plan.items():
        assert 0 < count <= by_name[name].slots
        assert count * per_worker <= by_name[name].available


# -- the pool on a real Ray runtime -------------------------------------------------------


def write_slice(path: Path, rows: int, *, offset: int) -> Path:
    """Prompt/answer rows over the tiny vocabulary (w0..w59), distinct prompts."""
    lines = []
    for i in range(rows):
        a, b, c = (offset + i) % 60, (offset + 7 * i) % 60, (offset + 13 * i + i // 60) % 60
        lines.append(json.dumps({"prompt": f"w{a} w{b} w{c} w{i % 60}", "answer": f"w{(a + b) % 60}"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def write_study(folder: Path, family: TinyFamily, address: str | None = None, trials: int = 4) -> Path:
    """A small TPE study over the tiny Llama family on 2 Ray workers (joining ``address`` if given)."""
    sources = "\n".join(f's{i} = "{path}"' for i, path in enumerate(family.sources))
    tasks = "\n".join(
        f'[[tasks]]\nname = "{name}"\nsearch = "{write_slice(folder / f"{name}.jsonl", 48, offset=k * 5)}"\n'
        f"limit = 12\n"
        for k, name in enumerate(("alpha", "beta"))
    )
    study = folder / "study.toml"
    study.write_text(f"""
[study]
name = "cluster"
seed = 1
output = "{folder / 'run'}"
trials = {trials}
sampler = "tpe"
top_k = 2

[models]
base = "{family.base}"
[models.sources]
{sources}

[genome]
method = "linear"
layer_granularity = 2

{tasks}
[execution]
backend = "ray"
{f'address = "{address}"' if address else ""}
workers = 2
cpus_per_worker = 1.0
device = "cpu"
batch_size = 8
""")
    return study


@pytest.fixture(scope="module")
def ray_runtime() -> Iterator[None]:
    import ray

    from search.ray_pool import _connect

    started = _connect(None)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def setup_and_execution(llama_family: TinyFamily, tmp_path_factory: pytest.TempPathFactory):
    from fitness.spec import TaskSpec
    from search.config import ExecutionConfig
    from search.worker import WorkerSetup

    data = tmp_path_factory.mktemp("slices")
    tasks = tuple(
        TaskSpec(name=name, search=write_slice(data / f"{name}.jsonl", 40, offset=k * 11), limit=16)
        for k, name in enumerate(("alpha", "beta"))
    )
    setup = WorkerSetup(
        base=str(llama_family.base), sources=tuple(str(s) for s in llama_family.sources),
        tasks=tasks, device="cpu", dtype="float32", batch_size=8, threads=1,
    )
    execution = ExecutionConfig(backend="ray", workers=2, cpus_per_worker=1.0, max_worker_restarts=3)
    return setup, execution


def uniform_recipe(family: TinyFamily, weights: tuple[float, ...]) -> dict:
    from merges.recipe import Recipe

    recipe = Recipe.uniform(
        "linear", None, [str(s) for s in family.sources], 4,
        tensor_params={"weight": weights}, global_params={"normalize": True},
    )
    return recipe.to_dict()


def test_unreachable_address_fails_fast_naming_it(setup_and_execution) -> None:
    import socket
    from dataclasses import replace

    import ray

    from search.ray_pool import RayPool

    assert not ray.is_initialized()  # runs before this module's Ray runtime starts
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    setup, execution = setup_and_execution
    with pytest.raises(SearchError, match=f"execution.address: nothing answers at 127.0.0.1:{port}"):
        RayPool(setup, replace(execution, address=f"127.0.0.1:{port}"))
    assert not ray.is_initialized()


def test_pool_starts_and_stops_its_own_local_runtime(setup_and_execution, llama_family: TinyFamily) -> None:
    from dataclasses import replace

    import ray

    from search.ray_pool import RayPool

    assert not ray.is_initialized()  # runs before this module's shared Ray runtime starts
    setup, execution = setup_and_execution
    pool = RayPool(setup, replace(execution, workers=1))
    try:
        assert ray.is_initialized()
        (node,) = [n for n in ray.nodes() if n["Alive"]]  # a private one-node runtime
        assert pool.workers()[0]["node_id"] == node["NodeID"]
        pool.submit(7, uniform_recipe(llama_family, (0.2, 0.3, 0.5)))
        [(ticket, outcome)] = pool.wait(timeout=120)
        assert ticket == 7 and outcome.error is None and set(outcome.scores) == {"alpha", "beta"}
        # a promoted trial's next stage goes before the trials queued behind it (search.staged ranks finished ones)
        stage = {"alpha": [0, 1], "beta": [0]}
        for ticket in (1, 2, 3):
            pool.submit(ticket, uniform_recipe(llama_family, (0.2, 0.3, 0.5)), rows=stage)
        [(ticket, _)] = pool.wait(timeout=120)  # trial 1; the freed worker takes trial 2 at once
        pool.submit(ticket, uniform_recipe(llama_family, (0.2, 0.3, 0.5)), rows={"alpha": [2], "beta": [1]})
        pool.submit(4, uniform_recipe(llama_family, (0.2, 0.3, 0.5)), rows=stage)  # a new trial: at the back
        assert (ticket, pool.pending()) == (1, [1, 3, 4])
        told = [t for _ in range(4) for t, _ in pool.wait(timeout=120)]
        assert told == [2, 1, 3, 4]
    finally:
        pool.close()
    assert not ray.is_initialized()  # the pool started this runtime, so close() stopped it


def test_killed_worker_trial_reruns_and_no_ticket_is_lost(
    ray_runtime: None, setup_and_execution, llama_family: TinyFamily
) -> None:
    import ray

    from search.ray_pool import RayPool

    setup, execution = setup_and_execution
    pool = RayPool(setup, execution)
    try:
        assert pool.size == 2 and pool.free_slots() == 4  # one running + one queued per worker
        before = pool.workers()
        pids = {int(w["pid"]) for w in before}
        assert len(pids) == 2 and os.getpid() not in pids

        victim = int(before[0]["pid"])
        os.kill(victim, signal.SIGSTOP)  # frozen: it will receive the trial but never finish it
        recipes = {t: uniform_recipe(llama_family, (0.2 + 0.1 * t, 0.3, 0.5)) for t in range(6)}
        pool.submit(0, recipes[0])  # actor 0 (the frozen one) takes ticket 0
        pool.submit(1, recipes[1])
        assert pool.free_slots() == 2 and pool.pending() == []
        for ticket in range(2, 6):  # queued behind the busy workers, past the free slots
            pool.submit(ticket, recipes[ticket])
        assert pool.free_slots() == 0 and pool.pending() == [2, 3, 4, 5]
        with pytest.raises(SearchError, match="ticket 3 is already"):
            pool.submit(3, recipes[3])
        os.kill(victim, signal.SIGKILL)

        outcomes: dict[int, list] = {}
        while sum(len(v) for v in outcomes.values()) < 6:
            finished = pool.wait(timeout=120)
            assert finished, "pool stalled after a worker died"
            for ticket, outcome in finished:
                outcomes.setdefault(ticket, []).append(outcome)

        assert sorted(outcomes) == list(range(6))  # none lost
        assert all(len(v) == 1 for v in outcomes.values())  # none reported twice
        for outcome in (v[0] for v in outcomes.values()):
            assert outcome.error is None, outcome.error
            assert set(outcome.scores) == {"alpha", "beta"}
        rerun = outcomes[0][0]
        assert int(rerun.worker.rsplit(":", 1)[1]) != victim  # re-run on a live worker
        assert pool.wait(timeout=120) == []  # nothing left over

        # Ray restarts the killed actor (new pid) on its own schedule: on a busy machine it may
        # still be starting when the last outcome arrives, so wait for that state (hang guard only)
        deadline = time.monotonic() + 300
        after = pool.workers()
        while len(after) < 2 and time.monotonic() < deadline:
            assert pool.wait(timeout=1) == []  # collects the restarted actor's answer to its probe
            after = pool.workers()
        assert len(after) == 2 and victim not in {int(w["pid"]) for w in after}
        assert pool.free_slots() == 4
        # the same recipe gives the same scores on any worker (resident models, in-place merge)
        pool.submit(10, recipes[0])
        pool.submit(11, recipes[0])
        again = dict(pool.wait(timeout=120))
        while len(again) < 2:
            again.update(pool.wait(timeout=120))
        assert again[10].scores == again[11].scores == rerun.scores
    finally:
        pool.close()
    assert ray.is_initialized()  # the pool did not start this runtime, so it leaves it running


def test_queued_trials_are_released_not_failed_when_no_worker_is_left(
    ray_runtime: None, setup_and_execution, llama_family: TinyFamily
) -> None:
    from dataclasses import replace

    from search.ray_pool import NoWorkersLeftError, RayPool

    setup, execution = setup_and_execution
    pool = RayPool(setup, replace(execution, workers=1, max_worker_restarts=0))
    try:
        pid = int(pool.workers()[0]["pid"])
        os.kill(pid, signal.SIGSTOP)
        pool.submit(0, uniform_recipe(llama_family, (0.3, 0.3, 0.4)))
        pool.submit(1, uniform_recipe(llama_family, (0.5, 0.2, 0.3)))
        os.kill(pid, signal.SIGKILL)
        # Ticket 0's worker died under it (it gets one re-run), ticket 1 never started: with no
        # worker left neither is a failure of its own; both are handed back, unrun.
        with pytest.raises(NoWorkersLeftError, match=f"no live Ray workers left .*:{pid} is gone") as caught:
            pool.wait(timeout=120)
        assert caught.value.tickets == [0, 1]
        with pytest.raises(SearchError, match="no live Ray workers left"):
            pool.submit(2, uniform_recipe(llama_family, (0.3, 0.3, 0.4)))
    finally:
        pool.close()


def test_a_worker_restarted_behind_the_pool_s_back_is_named_by_its_own_pid(
    ray_runtime: None, setup_and_execution, llama_family: TinyFamily
) -> None:
    from dataclasses import replace

    import ray
    from ray.exceptions import RayActorError

    from search.ray_pool import NoWorkersLeftError, RayPool

    setup, execution = setup_and_execution
    pool = RayPool(setup, replace(execution, workers=1, max_worker_restarts=1))
    try:
        first = int(pool.workers()[0]["pid"])
        os.kill(first, signal.SIGKILL)  # idle: Ray restarts it without the pool seeing it
        actor = pool._actors[0]
        for _ in range(1000):  # the restarted process, asked directly (the pool still records the first)
            try:
                second = int(ray.get(actor.identity.remote(), timeout=120)["pid"])
                break
            except RayActorError:  # still restarting
                time.sleep(0.1)
        assert second != first and int(pool.workers()[0]["pid"]) == first
        os.kill(second, signal.SIGKILL)  # its last restart: gone for good
        pool.submit(0, uniform_recipe(llama_family, (0.3, 0.3, 0.4)))
        with pytest.raises(NoWorkersLeftError) as caught:
            pool.wait(timeout=120)
        assert f":{second} is gone" in str(caught.value) and f":{first}" not in str(caught.value)
    finally:
        pool.close()


def test_trials_never_run_for_want_of_workers_are_not_spent_and_run_on_resume(
    ray_runtime: None, llama_family: TinyFamily, tmp_path: Path
) -> None:
    from dataclasses import replace

    import optuna
    from optuna.trial import TrialState

    from search import ranking
    from search.config import load_study
    from search.driver import run_study
    from search.plan import worker_setup
    from search.ray_pool import RayPool

    config = load_study(write_study(tmp_path, llama_family, trials=6))
    config = replace(config, execution=replace(config.execution, workers=1, max_worker_restarts=0))

    class KillsItsWorker(RayPool):
        """A real pool whose only worker is SIGKILLed as the third search trial is submitted."""

        search_submits = 0

        def submit(self, ticket: int, recipe: dict, split: str = "search") -> None:
            if ticket >= first_search_trial:
                self.search_submits += 1
                if self.search_submits == 3:
                    os.kill(int(self.workers()[0]["pid"]), signal.SIGKILL)
            super().submit(ticket, recipe, split)

    from search.baselines import baseline_recipes

    first_search_trial = len(baseline_recipes(  # baselines are trials 0..n-1; the pool gets indexes
        config.genome, base=str(config.models.base), sources=[str(p) for p in config.models.sources.values()],
        labels=tuple(config.models.sources), n_layers=4, seed=config.seed,
    ))
    pool = KillsItsWorker(worker_setup(config), config.execution)
    try:
        with pytest.raises(SearchError, match="no live Ray workers left"):
            run_study(config, quiet=True, pool=pool)
    finally:
        pool.close()
    trials = optuna.load_study(study_name=config.name, storage=config.storage).get_trials()
    search = [t for t in trials if t.user_attrs.get("kind") == "search"]
    spent = sum(ranking.counts_toward_budget(t) for t in search)
    assert spent == sum(t.state == TrialState.COMPLETE for t in search) < 3  # no "worker died" failures
    released = [t for t in search if t.state == TrialState.FAIL]
    assert released and all(t.user_attrs["failure"] == ranking.DRIVER_STOPPED for t in released)

    result = run_study(config, quiet=True)  # resume on a fresh pool
    assert result.done == 6
    trials = optuna.load_study(study_name=config.name, storage=config.storage).get_trials()
    search = [t for t in trials if t.user_attrs.get("kind") == "search"]
    assert sum(t.state == TrialState.COMPLETE for t in search) == 6
    rerun = {t.user_attrs.get("rerun_of") for t in search if t.state == TrialState.COMPLETE}
    assert {t.number for t in released} <= rerun  # the released trials ran, with their genes


def test_pool_refuses_workers_that_do_not_fit(ray_runtime: None, setup_and_execution) -> None:
    from dataclasses import replace

    from search.ray_pool import RayPool

    setup, execution = setup_and_execution
    huge = replace(setup, batch_size=1 << 22)  # activations alone far beyond this machine's RAM
    need = estimate_worker_memory(huge)
    with pytest.raises(SearchError, match=rf"2 workers × {need / GIB:.2f} GiB needed"):
        RayPool(huge, execution)
    with pytest.raises(SearchError, match="5 workers × 1 CPU requested, the Ray cluster has room for 2"):
        RayPool(setup, replace(execution, workers=5))


def test_study_survives_a_killed_worker_with_every_trial_recorded_once(
    ray_runtime: None, llama_family: TinyFamily, tmp_path: Path
) -> None:
    import threading

    import optuna
    from optuna.trial import TrialState

    from search.config import load_study
    from search.driver import run_study
    from search.plan import worker_setup
    from search.ray_pool import RayPool

    config = load_study(write_study(tmp_path, llama_family, trials=6))
    pool = RayPool(worker_setup(config), config.execution)
    try:
        victim = int(pool.workers()[0]["pid"])
        os.kill(victim, signal.SIGSTOP)  # the driver's first trial goes to this frozen worker

        capacity = pool.free_slots()

        def kill_when_it_holds_a_trial() -> None:
            # The first trial submitted goes to actor 0, the frozen one, and stays there: once
            # the free slots drop below the capacity, it holds a trial it will never finish.
            while pool.free_slots() >= capacity:
                threading.Event().wait(0.05)
            os.kill(victim, signal.SIGKILL)

        killer = threading.Thread(target=kill_when_it_holds_a_trial, daemon=True)
        killer.start()
        result = run_study(config, quiet=True, pool=pool)
        killer.join(timeout=60)
        assert not killer.is_alive()
    finally:
        pool.close()

    assert result.done == 6 and not result.interrupted
    trials = optuna.load_study(study_name=config.name, storage=config.storage).get_trials(deepcopy=False)
    assert [t.number for t in trials] == list(range(len(trials)))
    assert all(t.state == TrialState.COMPLETE for t in trials), [t.user_attrs.get("failure") for t in trials]
    search = [t for t in trials if t.user_attrs["kind"] == "search"]
    baselines = [t.user_attrs["baseline"] for t in trials if t.user_attrs["kind"] == "baseline"]
    assert len(search) == 6  # the budget, no trial lost or run twice
    assert len(baselines) == len(set(baselines)) > 0  # each baseline recorded once
    assert all(int(t.user_attrs["worker"].rsplit(":", 1)[1]) != victim for t in trials)
