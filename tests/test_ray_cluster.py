"""A real two-node Ray cluster on this machine: the pool joins it by address and uses both nodes.

``ray.cluster_utils.Cluster`` starts a head and a worker node (1 CPU each, their own
raylets and object stores); the pool joins through ``execution.address`` exactly as it
would join ``ray start --head`` on another machine, ships the project packages as
``py_modules`` and places one resident-model actor per node.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.checkpoints import TinyFamily
from tests.test_ray_pool import uniform_recipe, write_slice


@dataclass(frozen=True)
class TwoNodes:
    address: str
    node_ids: frozenset[str]
    cluster: object  # ray.cluster_utils.Cluster


@pytest.fixture(scope="module")
def two_node_cluster() -> Iterator[TwoNodes]:
    import ray
    from ray._private.utils import get_ray_address_file
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized(), "another test left a Ray runtime connected"
    # Cluster records its head as "the" local cluster (/tmp/ray/ray_current_cluster), which
    # a plain ray.init() elsewhere on this shared machine would then join: put it back.
    address_file = Path(get_ray_address_file(None))
    previous = address_file.read_text() if address_file.exists() else None
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        worker_node = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        if previous is None:
            address_file.unlink(missing_ok=True)
        else:
            address_file.write_text(previous)
        ids = frozenset({cluster.head_node.node_id, worker_node.node_id})
        yield TwoNodes(address=cluster.address, node_ids=ids, cluster=cluster)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


def test_pool_joins_cluster_and_runs_trials_on_both_nodes(
    two_node_cluster: TwoNodes, llama_family: TinyFamily, tmp_path: Path
) -> None:
    import ray

    from fitness.slices import TaskSpec
    from search.config import ExecutionConfig
    from search.ray_pool import RayPool
    from search.worker import WorkerSetup

    tasks = (TaskSpec(name="alpha", search=write_slice(tmp_path / "alpha.jsonl", 32, offset=3), limit=12),)
    setup = WorkerSetup(
        base=str(llama_family.base), sources=tuple(str(s) for s in llama_family.sources),
        tasks=tasks, device="cpu", dtype="float32", batch_size=8,
    )
    execution = ExecutionConfig(backend="ray", address=two_node_cluster.address, workers=2, cpus_per_worker=1.0)
    pool = RayPool(setup, execution)
    try:
        assert {w["node_id"] for w in pool.workers()} == two_node_cluster.node_ids
        for ticket in range(6):
            pool.submit(ticket, uniform_recipe(llama_family, (0.1 * ticket, 0.5, 0.5)))
        outcomes = {}
        while len(outcomes) < 6:
            finished = pool.wait(timeout=120)
            assert finished, "cluster pool stalled"
            outcomes.update(finished)
        assert sorted(outcomes) == list(range(6))
        assert all(o.error is None and set(o.scores) == {"alpha"} for o in outcomes.values())
        nodes_used = {o.worker.rsplit(":", 1)[0] for o in outcomes.values()}
        assert nodes_used == two_node_cluster.node_ids  # trials ran on both nodes
    finally:
        pool.close()
    # the pool disconnected from the cluster it joined, and left the cluster running
    assert not ray.is_initialized()
    cluster = two_node_cluster.cluster
    assert all(node.remaining_processes_alive() for node in [cluster.head_node, *cluster.worker_nodes])
