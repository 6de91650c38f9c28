from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.checkpoints import TinyFamily, make_family


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``ray`` run one after another on one xdist worker: a Ray runtime keeps
    machine-wide state (``/tmp/ray``, the current-cluster file a plain ``ray.init()`` joins)."""
    for item in items:
        if item.get_closest_marker("ray"):
            item.add_marker(pytest.mark.xdist_group("ray"))


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory: pytest.TempPathFactory) -> TinyFamily:
    """Base + 3 fine-tune-like sources, Llama naming, 4 layers."""
    return make_family(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def gpt2_family(tmp_path_factory: pytest.TempPathFactory) -> TinyFamily:
    """Base + 3 fine-tune-like sources, GPT-2 naming (tied embeddings), 4 layers."""
    return make_family(tmp_path_factory.mktemp("gpt2"), "gpt2")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def demo_family_root() -> Path:
    """The demo family shipped in ``studies/logistics/family``, every file checked against its
    manifest (a changed file fails here, named, instead of as odd scores later)."""
    from studies.demo_family import shipped_family

    return shipped_family().root


@pytest.fixture(scope="module", params=["resident", "lean", "stream"])
def engine_plan(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every ``MergeEngine`` built without an explicit ``plan`` runs under each engine plan:
    the golden tests hold for all of them (merges.engine, "Engine plans")."""
    from merges.engine import ENGINE_PLANS, MergeEngine

    assert request.param in ENGINE_PLANS
    defaults = MergeEngine.__init__.__kwdefaults__
    saved = defaults["plan"]
    defaults["plan"] = request.param
    yield request.param
    defaults["plan"] = saved
