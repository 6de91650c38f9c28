"""The per-worker memory estimate guards every backend before anything loads, and says what to change.

The big checkpoints here are real safetensors folders whose headers declare more
parameters than this machine has memory for, over sparse files: opening them reads the
headers only, so a check that loaded anything would show in the process's peak RSS.
Sizes follow this machine's total RAM, so the study is too big on any machine.
"""

from __future__ import annotations

import json
import math
import resource
import struct
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from search.config import load_study
from search.errors import SearchError
from search.memory import GIB, NodeCapacity, estimate_from_shape, model_shape, plan_workers
from search.plan import worker_setup
from search.pool import make_pool
from tests.checkpoints import TinyFamily, make_family, tiny_tokenizer
from tests.studies import write_study

REPO = Path(__file__).resolve().parents[1]
TINY_HIDDEN = 32  # tests.checkpoints' Llama: hidden 32, intermediate 64, key/value width 16


def _header_only(folder: Path, shapes: dict[str, list[int]], config: dict[str, object]) -> Path:
    """A checkpoint whose bf16 tensors are declared in the header over a sparse (unwritten) data region."""
    folder.mkdir(parents=True)
    header: dict[str, object] = {}
    offset = 0
    for name, shape in shapes.items():
        size = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    file = folder / "model.safetensors"
    with file.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)  # a hole: no block is written
    (folder / "config.json").write_text(json.dumps(config))
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def big_family(tmp_path_factory: pytest.TempPathFactory) -> TinyFamily:
    """Base + 1 source of the tiny Llama layout scaled up (hidden size) past this machine's RAM."""
    root = tmp_path_factory.mktemp("big")
    tiny = make_family(root / "tiny", n_sources=0)
    config = json.loads((tiny.base / "config.json").read_text())
    # ~36 hidden² parameters; float32 in the engine: base + task vector + live model alone
    # take 12 bytes each, the rank keys 4 more
    hidden = math.isqrt(psutil.virtual_memory().total // (12 * 36)) // 8 * 8 + 8
    scale = {TINY_HIDDEN: hidden, 2 * TINY_HIDDEN: 2 * hidden, TINY_HIDDEN // 2: hidden // 2}
    config.update(hidden_size=hidden, intermediate_size=2 * hidden)
    from safetensors import safe_open

    with safe_open(str(tiny.base / "model.safetensors"), "pt") as handle:
        shapes = {name: list(handle.get_slice(name).get_shape()) for name in handle.offset_keys()}
    for name, shape in shapes.items():  # the vocabulary (64 rows) stays as it is
        shapes[name] = [shape[0], hidden] if "embed" in name or "lm_head" in name else [scale[d] for d in shape]
    base = _header_only(root / "base", shapes, config)
    source = _header_only(root / "source0", shapes, config)
    return TinyFamily(base, (source,))


def _peak_rss_mib_children() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def test_the_estimate_reads_headers_only(big_family: TinyFamily) -> None:
    shape = model_shape(str(big_family.base))
    assert shape.numel * 4 * 3 > psutil.virtual_memory().total
    assert shape.largest_name.startswith("model.layers.0.mlp.")
    estimate = estimate_from_shape(shape, n_sources=1, dtype="float32", batch_size=8)
    assert estimate.largest_tensor == shape.largest_tensor * 4
    assert f"largest tensor {shape.largest_name}: " in estimate.describe()


@pytest.mark.parametrize("command", ["validate", "start"])
def test_inline_study_too_big_for_this_machine_is_refused_before_loading(
    big_family: TinyFamily, tmp_path: Path, command: str
) -> None:
    path = write_study(tmp_path, big_family, trials=2, tasks=("alpha",))
    before = _peak_rss_mib_children()
    done = subprocess.run(
        [sys.executable, "-m", "search.cli", command, str(path), *(["--quiet"] if command == "start" else [])],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    err = done.stderr
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: {path}: memory: 1 worker × "), err
    assert "GiB RAM available (node " in err and "not even one worker fits" in err
    assert "(largest tensor model.layers.0.mlp." in err
    assert "lower execution.workers" not in err  # there is only one
    assert "more memory" in err and "models.dtype" in err
    # nothing was loaded: the child's peak RSS stays far below the bytes it would have needed
    assert _peak_rss_mib_children() < max(before, 4096)
    assert not (tmp_path / "out").exists()


def test_the_inline_pool_checks_memory_itself(big_family: TinyFamily, tmp_path: Path) -> None:
    """Callers that skip validation (run_study, finalize) still get the check, before any tensor loads."""
    config = load_study(write_study(tmp_path, big_family, trials=2, tasks=("alpha",)))
    rss = psutil.Process().memory_info().rss
    with pytest.raises(SearchError, match=r"^1 worker × [\d.]+ GiB needed, at most [\d.]+ GiB RAM available"):
        make_pool(worker_setup(config), config.execution)
    assert psutil.Process().memory_info().rss - rss < GIB


def test_validate_prints_the_estimate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from search.cli import main

    family = make_family(tmp_path / "family", n_sources=2)
    path = write_study(tmp_path, family, trials=2, tasks=("alpha",))
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    memory = next(line for line in out.splitlines() if line.startswith("memory: "))
    assert " per worker: resident tensors " in memory and "largest tensor " in memory
    assert memory.endswith("1 worker(s) fit in this machine's free RAM")


# -- the advice, as plain numbers ---------------------------------------------------------


def _estimate(batch_size: int) -> object:
    from search.memory import ModelShape

    shape = ModelShape(numel=3_300_000_000, largest_tensor=500_000_000, hidden=3072, intermediate=8192,
                       vocab=128_000, max_positions=4096, largest_name="model.embed_tokens.weight")
    return estimate_from_shape(shape, n_sources=2, dtype="float32", batch_size=batch_size)


def test_one_worker_that_does_not_fit_is_told_what_would_fit() -> None:
    estimate = _estimate(8)
    node = NodeCapacity(node="here", available=16 * GIB, slots=4)
    with pytest.raises(SearchError) as info:
        plan_workers(estimate.total, 1, [node], memory_kind="RAM", estimate=estimate)  # type: ignore[attr-defined]
    message = str(info.value)
    assert message.startswith(f"1 worker × {estimate.total / GIB:.2f} GiB needed, at most 16.00 GiB RAM available")  # type: ignore[attr-defined]
    assert "largest tensor model.embed_tokens.weight: 1.86 GiB" in message
    assert "lower execution.workers" not in message
    assert "models.dtype" in message

    # when the evaluation batch is what does not fit, the batch size is the advice
    batchy = _estimate(1 << 16)
    with pytest.raises(SearchError, match="lower execution.batch_size"):
        plan_workers(batchy.total, 1, [node], memory_kind="RAM", estimate=batchy)  # type: ignore[attr-defined]


def test_some_workers_fit_names_how_many() -> None:
    node = NodeCapacity(node="here", available=10 * GIB, slots=8)
    with pytest.raises(SearchError, match=r"^4 workers × 3\.00 GiB needed, 10\.00 GiB RAM available on node here; "
                                          r"3 fit: lower execution\.workers to 3"):
        plan_workers(3 * GIB, 4, [node], memory_kind="RAM")
