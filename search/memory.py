"""How much memory one trial worker needs, which engine plan it runs, and whether a node can hold it.

A worker holds the engine's tensors (what depends on the engine plan, below), a live
model it merges into, scratch for one tensor's merge, the activations of one evaluation
batch and the Python / torch runtime itself. All of it follows from checkpoint shapes and
storage dtypes (read from the safetensors headers, nothing loaded), the methods the study
can run and the setup, so the check runs before anything loads, for every backend
(``check_local_memory`` for inline and ``search validate``, ``plan_workers`` per node for
Ray), and fails with the numbers instead of an OOM kill an hour into a study.

Engine plans (``merges.engine.ENGINE_PLANS``), fastest first; the fastest one that fits
the budget (``[execution] memory_gb``, else the device's free memory) is chosen:

* ``resident``: base + K task vectors in the arithmetic dtype, and the statistics the
  study's methods cache (sorted magnitudes or tie ranks, DARE keys, DELLA row positions:
  4 bytes per entry and source each; the sources themselves once linear-like methods run);
* ``lean``: base and sources as stored (bf16 stays bf16; a wider storage dtype is held in
  the arithmetic dtype), plus a small ``|delta|`` histogram per large tensor and source
  (``merges.methods.magnitude_sketch``: 128 KiB each), task vectors and density thresholds
  formed per tensor per trial; its scratch is one tensor's deltas, keys and tie temporaries;
* ``stream``: the lean plan holding no checkpoint: each chunk's tensors of the base and every
  source are read from the files (plain file reads into reused buffers: the page cache holds
  the files, not the worker; the next chunk is read while one merges), so it holds the
  histograms alone and its scratch adds two chunks' read buffers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from search.errors import SearchError

if TYPE_CHECKING:
    from search.worker import WorkerSetup

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
RUNTIME_BYTES = 640 * 1024**2
"""Python + torch + transformers + the Ray worker runtime: a Ray trial actor on the demo
family (tensors ~20 MB) measured 0.57 GiB RSS (benchmarks/search_throughput.py)."""
KEY_BYTES = 4
"""The engine's cached per-entry keys (magnitude ranks, DARE keys) are int32."""
DEFAULT_SEQ_LEN_CAP = 512
"""Sequence length assumed for evaluation activations when the caller does not know it."""
ENGINE_PLANS = ("resident", "lean", "stream")
"""merges.engine's plans, fastest first (kept in step with ``merges.engine.ENGINE_PLANS``;
this module imports no torch)."""
STORAGE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                 "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
"""Bytes per element of each safetensors dtype code."""
FLOATING_CODES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
KEY_KINDS = {"random": 1, "della_magprune": 2}
"""int32 keys per entry and source the lean plan holds for a chunk, by sparsification (see
``_lean_key_kinds``)."""
TIE_TEMP_BYTES = {"magnitude": 8, "magnitude_outliers": 12}
"""Per entry and tied cut replayed at once (merges.methods.tie_order, on the engine's threads),
the lean plan's temporaries by sparsification: one TIES cut needs an int32 word per entry
(``tied_cut_apply``, the engine's replay scratch) and, where it cannot be applied in place,
int32 keys; a breadcrumbs window (``window_keys``) (float32, int32) pairs and int32 keys. The
full sort (16: int64 argsort indices, sorted values, positions) runs only where the replay is
unavailable (no C compiler, or torch's sort order not reproduced on this machine)."""


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about the base checkpoint."""

    numel: int  # parameters of the checkpoint (every tensor once)
    largest_tensor: int  # elements of the biggest single tensor
    hidden: int
    intermediate: int
    vocab: int
    max_positions: int
    largest_name: str = ""  # the biggest tensor's name, for messages
    held_bytes: int = 0  # the lean plan's bytes of this checkpoint: storage dtype, or the arithmetic one if narrower
    sketch_bytes: int = 0  # the lean plan's |delta| histograms of this checkpoint's tensors, per source
    narrow_base: bool = False  # lean: the largest tensor held bf16 under float32 arithmetic (no float32 copy per chunk)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one worker needs, by part; ``total`` is what the check compares."""

    resident: int  # base + task vectors + order statistics
    live_model: int
    scratch: int  # one tensor's merge temporaries
    activations: int  # one evaluation batch
    runtime: int
    largest_tensor: int = 0  # bytes of the biggest single tensor in the arithmetic dtype
    largest_name: str = ""
    plan: str = "resident"  # the engine plan these bytes are for (ENGINE_PLANS)
    statistics: int = 0  # of ``resident``: the cached per-entry statistics (resident plan)

    @property
    def total(self) -> int:
        return self.resident + self.live_model + self.scratch + self.activations + self.runtime

    def describe(self) -> str:
        """One line: the total and its parts, in GiB, with the largest tensor named."""
        largest = ""
        if self.largest_tensor:
            largest = f" (largest tensor {self.largest_name or '?'}: {_gib(self.largest_tensor)})"
        if self.plan == "lean":
            held = "base and sources in their storage dtypes"
        elif self.plan == "stream":
            held = "no checkpoint: read per chunk; |delta| histograms"
        else:
            held = f"base + task vectors, {_gib(self.statistics)} of them statistics"
        return (
            f"{_gib(self.total)} per worker, engine plan {self.plan}: resident tensors {_gib(self.resident)} "
            f"({held}), live model {_gib(self.live_model)}, one tensor's merge {_gib(self.scratch)}{largest}, "
            f"evaluation batch {_gib(self.activations)}, runtime {_gib(self.runtime)}"
        )

    def advice(self) -> str:
        """What shrinks this estimate most, named by the study-file keys that change it."""
        if self.activations > self.resident + self.live_model:
            return "lower execution.batch_size (the evaluation batch is the largest part)"
        return (
            "use a machine with more memory, fewer sources (models.sources), or models.dtype = "
            '"bfloat16" (halves the tensors)'
        )


def _gib(size: int) -> str:
    """GiB, or MiB below one GiB (small parts would all read 0.00 GiB)."""
    return f"{size / GIB:.2f} GiB" if size >= GIB else f"{size / 1024**2:.1f} MiB"


@dataclass(frozen=True)
class NodeCapacity:
    """A node the workers may land on: its name, free memory and how many workers fit by CPU/GPU."""

    node: str
    available: int  # bytes free for workers (RAM, or GPU memory when workers use cuda)
    slots: int  # workers the node can take by its CPU / GPU count


def model_shape(checkpoint_dir: str, *, allow_pickle: bool = False, dtype: str = "float32") -> ModelShape:
    """Shapes of a checkpoint from its headers and config.json (no tensor is read).

    ``dtype``: the arithmetic dtype, for ``held_bytes``.
    """
    from merges.checkpoint import open_checkpoint  # lazy: merges imports torch

    checkpoint = open_checkpoint(checkpoint_dir, allow_pickle=allow_pickle)
    return shape_from_headers(checkpoint_dir, checkpoint.shapes, checkpoint.dtype_codes, checkpoint.config,
                              dtype=dtype, plain=type(checkpoint).__name__ == "Checkpoint")


def shape_from_headers(
    where: str, shapes: dict[str, tuple[int, ...]], dtype_codes: dict[str, str], config: object, *,
    dtype: str = "float32", plain: bool = True,
) -> ModelShape:
    """``ModelShape`` from tensor shapes, safetensors dtype codes and a config (dict or transformers').

    ``plain``: a checkpoint read as stored; a LoRA source or a vocabulary view is computed
    in the arithmetic dtype, so the lean plan holds it in that dtype.
    """
    from merges.methods.magnitude_sketch import sketch_bytes  # torch-free

    width = _width(dtype)
    sizes = [math.prod(shape) for shape in shapes.values()]
    if not sizes:
        raise SearchError(f"{where}: checkpoint has no tensors")
    largest = max(shapes, key=lambda name: math.prod(shapes[name]))
    held = sketches = 0
    for name, shape in shapes.items():
        code = dtype_codes.get(name, "F32")
        stored = STORAGE_BYTES.get(code, 4)
        if code in FLOATING_CODES:  # as merges.engine's lean plan keeps it
            stored = min(stored, width) if plain else width
            sketches += sketch_bytes(math.prod(shape))
        held += math.prod(shape) * stored
    return ModelShape(
        numel=sum(sizes),
        largest_tensor=max(sizes),
        largest_name=largest,
        hidden=int(_config_value(config, "hidden_size", "n_embd", "d_model", default=1)),
        intermediate=int(_config_value(config, "intermediate_size", "n_inner", default=0) or 0),
        vocab=int(_config_value(config, "vocab_size", default=1)),
        max_positions=int(
            _config_value(config, "max_position_embeddings", "n_positions", default=DEFAULT_SEQ_LEN_CAP)
        ),
        held_bytes=held,
        sketch_bytes=sketches,
        # merges.engine's _narrow_base: the fused pass and the task vectors read the held bf16 base
        narrow_base=plain and dtype == "float32" and dtype_codes.get(largest) == "BF16",
    )


def _width(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise SearchError(f"execution dtype: expected one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    return DTYPE_BYTES[dtype]


def _config_value(config: object, *names: str, default: int) -> int:
    """First of ``names`` set on a config (a transformers config or a plain dict)."""
    for name in names:
        value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
        if value is not None:
            return int(value)
    return default


_WHOLE_MODEL_PLANNERS = frozenset({"linear", "slerp", "model_stock", "passthrough", "karcher", "arcee_fusion",
                                    "nuslerp", "multislerp"})
"""Planners that read the sources themselves (``TensorContext.tensor``), which the resident
plan then keeps next to the task vectors (merges.engine's ``_exact_source``)."""


def statistics_bytes(methods: Sequence[str], *, numel: int, n_sources: int, width: int) -> int:
    """Bytes the resident plan caches for ``methods`` beyond base and task vectors (merges.engine)."""
    from merges.methods.registry import METHODS  # torch-free catalogue

    kinds: set[str] = set()
    for method in methods:
        spec = METHODS.get(method)
        if spec is None:
            raise SearchError(f"genome.method: unknown method {method!r}")
        if spec.family is not None and spec.family.sparsification is not None:
            kinds.add(spec.family.sparsification)
        elif spec.planner in _WHOLE_MODEL_PLANNERS:
            kinds.add("sources")
    per_entry = {"magnitude": KEY_BYTES, "magnitude_outliers": KEY_BYTES, "random": KEY_BYTES,
                 "della_magprune": 2 * KEY_BYTES, "sources": width}  # sorted |delta| or tie ranks; keys; + row positions
    once = sum(_once_per_entry(method, width) for method in set(methods))
    return sum(per_entry[kind] for kind in kinds) * numel * n_sources + once * numel


def _lean_key_kinds(methods: Sequence[str]) -> int:
    """int32 keys per entry and source the lean plan holds for a chunk (merges.engine): DARE's
    random keys (1), DELLA's keys and row positions (2). A TIES tied cut is applied to the delta
    in place (tie_order.tied_cut_apply) and a breadcrumbs window's keys are sort temporaries: none."""
    return max((KEY_KINDS.get(kind, 0) for kind in _sparsifications(methods)), default=0)


def _tie_bytes(methods: Sequence[str] | None) -> int:
    """``TIE_TEMP_BYTES`` of the study's methods (the widest; every kind's without methods)."""
    if methods is None:
        return max(TIE_TEMP_BYTES.values())
    return max((TIE_TEMP_BYTES.get(kind, 0) for kind in _sparsifications(methods)), default=0)


def _sparsifications(methods: Sequence[str]) -> list[str]:
    """Each method's sparsification kind (``""`` for none), in order; an unknown method is an error."""
    from merges.methods.registry import METHODS  # torch-free catalogue

    kinds = []
    for method in methods:
        spec = METHODS.get(method)
        if spec is None:
            raise SearchError(f"genome.method: unknown method {method!r}")
        kinds.append((spec.family.sparsification if spec.family is not None else None) or "")
    return kinds


def _once_per_entry(method: str, width: int) -> int:
    """Bytes per entry a method caches once per tensor (not per source), merges.methods' planners:
    sce's variance order (int32; half: the variance), what karcher / ram / arcee_fusion compute
    from the sources alone (the mean, the merge, the importance scores), ramplus_tl's merge
    outside the unique entries (float32 from half) and their indices (int32, at most one each)."""
    return {"sce": KEY_BYTES, "karcher": width, "ram": width, "arcee_fusion": width,
            "ramplus_tl": max(width, 4) + KEY_BYTES}.get(method, 0)


def estimate_from_shape(
    shape: ModelShape, *, n_sources: int, dtype: str, batch_size: int, seq_len: int | None = None,
    key_kinds: int = 1, methods: Sequence[str] | None = None, plan: str = "resident",
    sources_held: int | None = None, threads: int = 1, device: str = "cpu",
) -> MemoryEstimate:
    """The per-worker estimate for a model of ``shape`` merged from ``n_sources`` fine-tunes.

    ``methods``: what the study runs (the resident plan's statistics follow from them);
    without them ``key_kinds`` per-entry statistics are counted (1 for ties / dare /
    breadcrumbs, 2 for della; 0 for linear-only studies). ``plan``: one of ``ENGINE_PLANS``.
    ``sources_held``: the lean plan's bytes of all sources (default: like the base);
    ``threads``: the engine's threads (the lean plan's tie replays run side by side);
    ``device``: the engine's (the |delta| histograms are kept on the CPU in float32 only).
    """
    width = _width(dtype)
    if plan not in ENGINE_PLANS:
        raise SearchError(f"engine plan: expected one of {ENGINE_PLANS}, got {plan!r}")
    tensor_bytes = shape.numel * width
    k = n_sources
    if plan == "resident":
        # base + K task vectors in the arithmetic dtype, plus the cached statistics
        statistics = (statistics_bytes(methods, numel=shape.numel, n_sources=k, width=width)
                      if methods is not None else shape.numel * KEY_BYTES * k * key_kinds)
        resident = tensor_bytes * (1 + k) + statistics
        # merging one tensor holds the K weighted deltas, a mask and the result at once
        scratch = shape.largest_tensor * width * (k + 2)
    else:
        statistics = 0
        held = shape.held_bytes or tensor_bytes
        all_held = held + (sources_held if sources_held is not None else held * k)
        sketched = device == "cpu" and dtype == "float32"  # merges.engine's _sketched
        sketches = shape.sketch_bytes * k if sketched else 0
        resident = sketches + (all_held if plan == "lean" else 0)
        # one chunk (at most the largest tensor's entries): K deltas in the arithmetic dtype and
        # the base too where it is held narrower and not read as held (a base held in the
        # arithmetic dtype is used as it is), the per-entry keys its methods hold
        # (_lean_key_kinds), the temporaries of the tied cuts replayed side by side, and
        # without histograms a float32 |delta| per source for the selection of a threshold
        kinds = _lean_key_kinds(methods) if methods is not None else key_kinds
        base_copy = 0 if shape.narrow_base or held >= tensor_bytes else width
        ties = _tie_bytes(methods)  # 0: no magnitude cut to select
        selection = 0 if sketched or not ties else 4 * k
        per_entry = width * k + base_copy + KEY_BYTES * k * kinds + selection + ties * max(1, min(k, threads))
        scratch = shape.largest_tensor * per_entry
        if plan == "stream":
            # + the chunk's tensors of every checkpoint as read (held dtypes, mean bytes per
            # entry), twice: the next chunk's are read while this one merges
            scratch += 2 * -(-shape.largest_tensor * all_held // shape.numel)
    seq = min(seq_len or DEFAULT_SEQ_LEN_CAP, shape.max_positions)
    # inference only: logits (kept in float32 by the scorer) + a few hidden-size buffers of one layer
    per_token = 4 * shape.vocab * 2 + width * (4 * shape.hidden + 2 * max(shape.intermediate, shape.hidden))
    activations = batch_size * seq * per_token
    return MemoryEstimate(
        resident, tensor_bytes, scratch, activations, RUNTIME_BYTES,
        largest_tensor=shape.largest_tensor * width, largest_name=shape.largest_name, plan=plan,
        statistics=statistics,
    )


def plan_estimates(setup: WorkerSetup, *, seq_len: int | None = None) -> list[MemoryEstimate]:
    """The estimate of every engine plan for ``setup`` (fastest first; only the forced one
    when ``setup.engine_plan`` is set), from checkpoint headers alone."""
    shape = model_shape(setup.base, allow_pickle=setup.allow_pickle, dtype=setup.dtype)
    sources_held = sum(model_shape(source, allow_pickle=setup.allow_pickle, dtype=setup.dtype).held_bytes
                       for source in setup.sources)
    plans = (setup.engine_plan,) if setup.engine_plan else ENGINE_PLANS
    return [
        estimate_from_shape(shape, n_sources=len(setup.sources), dtype=setup.dtype, batch_size=setup.batch_size,
                            seq_len=seq_len, methods=setup.methods or None, plan=plan,
                            sources_held=sources_held,
                            threads=setup.merge_threads or os.cpu_count() or 1,
                            device=setup.device)
        for plan in plans
    ]


def estimate_worker_memory(setup: WorkerSetup, *, seq_len: int | None = None) -> int:
    """Bytes one ``TrialWorker`` built from ``setup`` needs at its peak."""
    return worker_memory_breakdown(setup, seq_len=seq_len).total


def worker_memory_breakdown(setup: WorkerSetup, *, seq_len: int | None = None, workers: int = 1) -> MemoryEstimate:
    """The estimate of the engine plan ``workers`` workers of ``setup`` run: the fastest that fits
    the budget (``setup.memory_gb``, else this machine's free memory on the setup's device),
    else the leanest (whose numbers the caller's placement check then reports)."""
    estimates = plan_estimates(setup, seq_len=seq_len)
    available = budget_bytes(setup)
    for estimate in estimates:
        if _on_device(estimate, setup.device) * workers <= available:
            return estimate
    return estimates[-1]


def budget_bytes(setup: WorkerSetup) -> int:
    """What the plan must fit in: ``[execution] memory_gb``, else the device's free memory now."""
    if setup.memory_gb is not None:
        return int(setup.memory_gb * GIB)
    return local_capacity(setup.device).available


def _on_device(estimate: MemoryEstimate, device: str) -> int:
    """Bytes that must fit in the device's memory (on cuda the runtime lives in RAM)."""
    return estimate.total - estimate.runtime if device == "cuda" else estimate.total


def plan_workers(
    per_worker: int, workers: int, nodes: Sequence[NodeCapacity], *, memory_kind: str,
    estimate: MemoryEstimate | None = None,
) -> dict[str, int]:
    """Place ``workers`` on ``nodes`` so each fits by slots and memory; SearchError naming the numbers.

    Returns node -> worker count (fullest nodes first, as Ray packs). ``memory_kind`` names
    the memory in the message ("RAM", "GPU memory"); ``estimate`` (the parts of
    ``per_worker``) adds the breakdown and advice on what to change when not even one fits.
    """
    if workers < 1:
        raise SearchError(f"execution.workers: must be >= 1, got {workers}")
    placed: dict[str, int] = {}
    remaining = workers
    for node in sorted(nodes, key=lambda n: n.available, reverse=True):
        fits = min(node.slots, node.available // per_worker if per_worker > 0 else node.slots, remaining)
        if fits > 0:
            placed[node.node] = fits
            remaining -= fits
        if remaining == 0:
            return placed
    fit = workers - remaining
    need = f"{workers} worker{'s' if workers > 1 else ''} × {per_worker / GIB:.2f} GiB needed"
    if fit == 0:
        # Not even one worker fits: fewer workers cannot help, a smaller worker can.
        largest = max(nodes, key=lambda n: n.available, default=None)
        where = (
            f"at most {largest.available / GIB:.2f} GiB {memory_kind} available (node {largest.node})"
            if largest is not None else "no alive nodes"
        )
        detail = f" ({estimate.describe()})" if estimate is not None else ""
        advice = estimate.advice() if estimate is not None else (
            "lower execution.batch_size or the number of sources, or use a machine with more memory"
        )
        raise SearchError(f"{need}, {where}: not even one worker fits{detail}; {advice}")
    if len(nodes) == 1:
        node = nodes[0]
        if node.slots >= workers:
            raise SearchError(
                f"{need}, {node.available / GIB:.2f} GiB {memory_kind} available on node {node.node}; "
                f"{fit} fit: lower execution.workers to {fit} (or execution.batch_size / the number of sources)"
            )
    have = "; ".join(
        f"node {n.node}: {n.available / GIB:.2f} GiB {memory_kind} available, {n.slots} worker slots"
        for n in nodes
    )
    raise SearchError(f"{need}, {fit} fit ({have}); lower execution.workers to {fit}, or add nodes")


def local_capacity(device: str) -> NodeCapacity:
    """This machine as one node: free RAM, or free memory of the current GPU on ``cuda``."""
    import socket

    if device == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        return NodeCapacity(node=f"{socket.gethostname()} (cuda)", available=int(free), slots=1 << 30)
    import psutil

    return NodeCapacity(node=socket.gethostname(), available=int(psutil.virtual_memory().available), slots=1 << 30)


def check_local_memory(setup: WorkerSetup, *, workers: int = 1) -> MemoryEstimate:
    """The estimate of the engine plan ``workers`` workers built from ``setup`` run here; refuses them
    (SearchError with needed / available / largest tensor) when not even the leanest plan fits.

    Runs before anything is loaded (only checkpoint headers are read). On ``cuda`` the
    tensors and activations must fit in the GPU's free memory, the runtime in RAM.
    ``[execution] memory_gb`` (``setup.memory_gb``) replaces the free memory when set.
    """
    estimate = worker_memory_breakdown(setup, workers=workers)
    node = local_capacity(setup.device)
    if setup.memory_gb is not None:
        node = NodeCapacity(node=f"{node.node}, execution.memory_gb", available=budget_bytes(setup), slots=node.slots)
    kind = "GPU memory" if setup.device == "cuda" else "RAM"
    plan_workers(_on_device(estimate, setup.device), workers, [node], memory_kind=kind, estimate=estimate)
    return estimate


def plan_totals(setup: WorkerSetup) -> str:
    """Every plan's bytes per worker, for ``search validate``: ``plans: resident 9.1 GiB, lean 4.2 GiB``."""
    return "plans: " + ", ".join(f"{e.plan} {_gib(e.total)}" for e in plan_estimates(setup))
