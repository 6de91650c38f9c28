"""The per-worker memory estimate guards every backend before anything loads, and says what to change.

The big checkpoints here are real safetensors folders whose headers declare more
parameters than this machine has memory for, over sparse files: opening them reads the
headers only, so a check that loaded anything would show in the process's peak RSS.
Sizes follow this machine's total RAM, so the study is too big on any machine.
"""

from __future__ import annotations

import json
import math
import os
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
    # ~36 hidden² parameters; even the stream engine plan, which holds no checkpoint, builds a
    # float32 live model (4 bytes each): more than this machine's RAM
    hidden = math.isqrt(psutil.virtual_memory().total // (4 * 36)) // 8 * 8 + 8
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
    assert " per worker, engine plan resident: resident tensors " in memory and "largest tensor " in memory
    assert "; 1 worker(s) fit in this machine's free RAM (plans: resident " in memory and ", lean " in memory
    assert ", stream " in memory


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


# -- the engine plan: the fastest that fits, chosen from headers ------------------------------


def _setup(family: TinyFamily, memory_gb: float | None, method: str = "ties") -> object:
    from search.worker import WorkerSetup

    return WorkerSetup(base=str(family.base), sources=tuple(str(s) for s in family.sources), tasks=(),
                       device="cpu", dtype="float32", batch_size=2, methods=("linear", method),
                       memory_gb=memory_gb)


def test_the_fastest_plan_that_fits_the_budget_is_chosen(llama_family: TinyFamily) -> None:
    from search.memory import check_local_memory, plan_estimates

    resident, lean, stream = plan_estimates(_setup(llama_family, None))  # type: ignore[arg-type]
    assert (resident.plan, lean.plan, stream.plan) == ("resident", "lean", "stream")
    # fp32 checkpoints are held as stored; the resident plan adds task vectors and statistics:
    # sorted magnitudes (ties) and the sources themselves (linear, the baselines)
    assert resident.statistics == resident.live_model * 3 + resident.live_model * 3
    # (tensors under 64Ki entries: no histograms, so the stream plan holds nothing)
    assert lean.resident == resident.live_model * 4 and lean.statistics == 0 and stream.resident == 0
    assert stream.total < lean.total < resident.total
    between = (lean.total + resident.total) / 2 / GIB
    assert check_local_memory(_setup(llama_family, resident.total / GIB)).plan == "resident"  # type: ignore[arg-type]
    assert check_local_memory(_setup(llama_family, between)).plan == "lean"  # type: ignore[arg-type]
    below = (stream.total + lean.total) / 2 / GIB
    assert check_local_memory(_setup(llama_family, below)).plan == "stream"  # type: ignore[arg-type]
    with pytest.raises(SearchError) as info:
        check_local_memory(_setup(llama_family, stream.total / GIB * 0.9))  # type: ignore[arg-type]
    message = str(info.value)
    assert message.startswith(f"1 worker × {stream.total / GIB:.2f} GiB needed, at most ")
    assert "GiB RAM available (node " in message and ", execution.memory_gb)" in message
    assert "engine plan stream" in message and "(largest tensor " in message


def test_the_statistics_follow_the_methods() -> None:
    from search.memory import statistics_bytes

    def per_entry(*methods: str) -> float:
        return statistics_bytes(methods, numel=1000, n_sources=2, width=2) / 2000

    assert per_entry("task_arithmetic") == 0
    assert per_entry("ties") == per_entry("breadcrumbs") == per_entry("dare_ties") == 4
    assert per_entry("della") == 8
    assert per_entry("linear") == per_entry("slerp") == 2  # the sources themselves, bf16
    assert per_entry("linear", "ties") == 6
    with pytest.raises(SearchError, match="unknown method 'frobnicate'"):
        per_entry("frobnicate")


def test_the_inline_worker_runs_the_chosen_plan(llama_family: TinyFamily, tmp_path: Path) -> None:
    """``[execution] memory_gb`` between the plans: the worker's engine is built lean."""
    from dataclasses import replace

    from search.memory import plan_estimates

    config = load_study(write_study(tmp_path, llama_family, trials=2, tasks=("alpha",)))
    setup = worker_setup(config)
    # inline: merges on every core the process may use, scores on cpus_per_worker threads; a Ray
    # worker merges on its CPU share (its pool sets engine_threads None again)
    assert (setup.threads, setup.engine_threads) == (1, len(os.sched_getaffinity(0)))
    assert worker_setup(replace(config, execution=replace(config.execution, backend="ray"))).engine_threads is None
    resident, lean, stream = plan_estimates(setup)

    for plan, low, high in (("lean", lean, resident), ("stream", stream, lean)):
        between = (low.total + high.total) / 2 / GIB
        pool = make_pool(replace(setup, memory_gb=between), replace(config.execution, backend="inline"))
        try:
            assert pool._worker.engine.plan == plan  # type: ignore[attr-defined]
        finally:
            pool.close()


def test_memory_gb_is_checked(tmp_path: Path, llama_family: TinyFamily) -> None:
    from search.config import StudyConfigError

    path = write_study(tmp_path, llama_family, trials=2, tasks=("alpha",))
    path.write_text(path.read_text().replace("[execution]", "[execution]\nmemory_gb = 0", 1))
    with pytest.raises(StudyConfigError, match=r"execution\.memory_gb: must be > 0, got 0"):
        load_study(path)


def test_llama_7b_with_3_sources_fits_an_80_gb_gpu() -> None:
    from benchmarks.memory_plans import dry_run

    rows = {(row["model"], row["device_gb"]): row for row in dry_run()}
    assert rows[("llama-7b", 80)]["plan"] == "lean"
    assert rows[("llama-7b", 24)]["plan"] == rows[("llama-13b", 80)]["plan"] == "stream"  # no checkpoint held
    assert rows[("llama-13b", 24)]["plan"] is None and rows[("llama-70b", 141)]["plan"] is None
    assert rows[("llama-13b", 141)]["plan"] == "lean"  # the resident plan needs 342 GiB


def test_a_study_runs_end_to_end_under_the_lean_plan(llama_family: TinyFamily, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """``search start`` with a budget only the lean plan fits: it says so and finishes its trials."""
    from search.cli import main
    from search.memory import plan_estimates

    path = write_study(tmp_path, llama_family, trials=2, tasks=("alpha",), method="ties")
    resident, lean, _ = plan_estimates(worker_setup(load_study(path)))
    between = (lean.total + resident.total) / 2 / GIB
    path.write_text(path.read_text().replace("[execution]", f"[execution]\nmemory_gb = {between:.6f}", 1))
    assert main(["start", str(path)]) == 0
    out = capsys.readouterr().out
    assert "per worker, engine plan lean: resident tensors " in out
    assert "2/2 search trials" in out or "export with:" in out


def test_the_lean_chunk_follows_the_methods_and_the_base() -> None:
    """The lean plan's chunk: a TIES tied cut holds no keys (applied to the delta in place), DARE
    keeps one int32 key per entry and source, DELLA two; a bf16 base under float32 arithmetic is
    read as held (no float32 copy), a float16 one is copied; each source's delta is always
    there; a TIES replay's scratch is 8 bytes per entry, a breadcrumbs window's 12; without
    histograms (off the CPU) a float32 |delta| per source for the selection. The stream plan's
    chunk adds the chunk's tensors of every checkpoint as held."""
    from dataclasses import replace

    from search.memory import shape_from_headers

    shapes = {"embed.weight": (1000, 64), "layer.weight": (64, 64)}
    bf16 = shape_from_headers("m", shapes, dict.fromkeys(shapes, "BF16"), {"hidden_size": 64})
    f16 = shape_from_headers("m", shapes, dict.fromkeys(shapes, "F16"), {"hidden_size": 64})
    assert bf16.narrow_base and not f16.narrow_base
    assert not shape_from_headers("m", shapes, dict.fromkeys(shapes, "BF16"), {}, dtype="bfloat16").narrow_base

    def per_entry(shape: object, *methods: str, plan: str = "lean", device: str = "cpu") -> float:
        estimate = estimate_from_shape(shape, n_sources=2, dtype="float32", batch_size=1,  # type: ignore[arg-type]
                                       methods=methods, plan=plan, threads=1, device=device)
        return estimate.scratch / 64_000

    assert per_entry(bf16, "ties") == 2 * 4 + 8 and per_entry(bf16, "breadcrumbs") == 2 * 4 + 12
    assert per_entry(bf16, "linear") == 2 * 4  # no cut: no replay, nothing selected
    assert per_entry(bf16, "dare_ties") == 2 * 4 + 2 * 4  # random keys, no cut
    assert per_entry(bf16, "della", "ties") == 2 * 4 + 2 * 8 + 8
    assert per_entry(f16, "ties") == per_entry(replace(bf16, narrow_base=False), "ties") == 3 * 4 + 8
    assert per_entry(bf16, "ties", device="cuda") == 2 * 4 + 8 + 2 * 4
    # held as read: base and both sources in bf16, 2 bytes an entry each
    # (twice: the next chunk is read while this one merges)
    assert per_entry(bf16, "ties", plan="stream") == per_entry(bf16, "ties") + 2 * 3 * 2
    f32 = shape_from_headers("m", shapes, dict.fromkeys(shapes, "F32"), {"hidden_size": 64})
    assert per_entry(f32, "ties") == 2 * 4 + 8  # a float32 base is used as held
    assert per_entry(f32, "ties", plan="stream") == 2 * 4 + 8 + 2 * 3 * 4
