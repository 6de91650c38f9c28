"""How much memory one trial worker needs, and whether a node can hold the workers asked for.

A worker keeps the study's tensors resident (base + one task vector per source + the
int32 rank keys sparsifying methods select by, as ``merges.engine`` documents), a live
model it merges into, a scratch buffer for one tensor's merge, the activations of one
evaluation batch and the Python / torch runtime itself. All of it follows from checkpoint
shapes (read from the safetensors headers, nothing loaded) and the setup, so the check
runs before anything loads, for every backend (``check_local_memory`` for inline and
``search validate``, ``plan_workers`` per node for Ray), and fails with the numbers
instead of an OOM kill an hour into a study.
"""

from __future__ import annotations

import math
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

    @property
    def total(self) -> int:
        return self.resident + self.live_model + self.scratch + self.activations + self.runtime

    def describe(self) -> str:
        """One line: the total and its parts, in GiB, with the largest tensor named."""
        largest = ""
        if self.largest_tensor:
            largest = f" (largest tensor {self.largest_name or '?'}: {_gib(self.largest_tensor)})"
        return (
            f"{_gib(self.total)} per worker: resident tensors {_gib(self.resident)} (base + task vectors + "
            f"rank keys), live model {_gib(self.live_model)}, one tensor's merge {_gib(self.scratch)}{largest}, "
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


def model_shape(checkpoint_dir: str, *, allow_pickle: bool = False) -> ModelShape:
    """Shapes of the base checkpoint from its headers and config.json (no tensor is read)."""
    from merges.checkpoint import open_checkpoint  # lazy: merges imports torch

    checkpoint = open_checkpoint(checkpoint_dir, allow_pickle=allow_pickle)
    sizes = [math.prod(shape) for shape in checkpoint.shapes.values()]
    if not sizes:
        raise SearchError(f"{checkpoint_dir}: checkpoint has no tensors")
    config = checkpoint.config
    largest = max(checkpoint.shapes, key=lambda name: math.prod(checkpoint.shapes[name]))
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
    )


def _config_value(config: object, *names: str, default: int) -> int:
    """First of ``names`` set on a config (a transformers config or a plain dict)."""
    for name in names:
        value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
        if value is not None:
            return int(value)
    return default


def estimate_from_shape(
    shape: ModelShape, *, n_sources: int, dtype: str, batch_size: int, seq_len: int | None = None,
    key_kinds: int = 1,
) -> MemoryEstimate:
    """The per-worker estimate for a model of ``shape`` merged from ``n_sources`` fine-tunes.

    ``key_kinds``: per-entry statistics the engine caches (1 for ties / dare / breadcrumbs,
    2 for della; 0 for linear-only studies).
    """
    if dtype not in DTYPE_BYTES:
        raise SearchError(f"execution dtype: expected one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    width = DTYPE_BYTES[dtype]
    tensor_bytes = shape.numel * width
    # merges.engine's bound: base + K task vectors in the arithmetic dtype, plus one int32
    # key per entry and source for the sparsifying method in use (ranks or DARE keys)
    resident = tensor_bytes * (1 + n_sources) + shape.numel * KEY_BYTES * n_sources * key_kinds
    # merging one tensor holds the K weighted deltas, a mask and the result at once
    scratch = shape.largest_tensor * width * (n_sources + 2)
    seq = min(seq_len or DEFAULT_SEQ_LEN_CAP, shape.max_positions)
    # inference only: logits (kept in float32 by the scorer) + a few hidden-size buffers of one layer
    per_token = 4 * shape.vocab * 2 + width * (4 * shape.hidden + 2 * max(shape.intermediate, shape.hidden))
    activations = batch_size * seq * per_token
    return MemoryEstimate(
        resident, tensor_bytes, scratch, activations, RUNTIME_BYTES,
        largest_tensor=shape.largest_tensor * width, largest_name=shape.largest_name,
    )


def estimate_worker_memory(setup: WorkerSetup, *, seq_len: int | None = None) -> int:
    """Bytes one ``TrialWorker`` built from ``setup`` needs at its peak."""
    return worker_memory_breakdown(setup, seq_len=seq_len).total


def worker_memory_breakdown(setup: WorkerSetup, *, seq_len: int | None = None) -> MemoryEstimate:
    """``estimate_worker_memory`` by part (for the benchmark and error messages)."""
    shape = model_shape(setup.base, allow_pickle=setup.allow_pickle)
    return estimate_from_shape(
        shape, n_sources=len(setup.sources), dtype=setup.dtype, batch_size=setup.batch_size, seq_len=seq_len
    )


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
    """Refuse ``workers`` workers built from ``setup`` that this machine cannot hold; their estimate.

    Runs before anything is loaded (only checkpoint headers are read). On ``cuda`` the
    tensors and activations must fit in the GPU's free memory, the runtime in RAM.
    """
    estimate = worker_memory_breakdown(setup)
    node = local_capacity(setup.device)
    if setup.device == "cuda":
        on_device = estimate.total - estimate.runtime
        plan_workers(on_device, workers, [node], memory_kind="GPU memory", estimate=estimate)
    else:
        plan_workers(estimate.total, workers, [node], memory_kind="RAM", estimate=estimate)
    return estimate
