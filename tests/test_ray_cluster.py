"""A real two-node Ray cluster on this machine: ``search start`` joins it by address and uses both nodes.

``ray.cluster_utils.Cluster`` starts a head and a worker node (1 CPU each, their own
raylets and object stores); the study's ``execution.address`` makes the driver's Ray pool
join it exactly as it would join ``ray start --head`` on another machine, ship the
project packages as ``py_modules`` and place one resident-model actor per node.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.checkpoints import TinyFamily
from tests.test_ray_pool import write_study

pytestmark = pytest.mark.ray  # see conftest: Ray tests share one xdist worker



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


def test_search_start_runs_the_study_on_both_nodes(
    two_node_cluster: TwoNodes, llama_family: TinyFamily, tmp_path: Path
) -> None:
    import optuna
    import ray
    from optuna.trial import TrialState

    from search.cli import main
    from search.config import load_study

    study_file = write_study(tmp_path, llama_family, two_node_cluster.address)
    assert main(["start", str(study_file), "--quiet"]) == 0

    config = load_study(study_file)
    trials = optuna.load_study(study_name=config.name, storage=config.storage).get_trials(deepcopy=False)
    search = [t for t in trials if t.user_attrs.get("kind") == "search"]
    assert len(search) == 4 and all(t.state == TrialState.COMPLETE for t in search)
    assert all(t.state == TrialState.COMPLETE for t in trials)
    nodes_used = {t.user_attrs["worker"].rsplit(":", 1)[0] for t in trials}
    assert nodes_used == two_node_cluster.node_ids  # trials ran on both nodes of the cluster
    # the driver disconnected from the cluster it joined, and left the cluster running
    assert not ray.is_initialized()
    cluster = two_node_cluster.cluster
    assert all(node.remaining_processes_alive() for node in [cluster.head_node, *cluster.worker_nodes])
