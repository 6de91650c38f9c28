"""How much memory one trial worker needs, and whether a node can hold the workers asked for.

A worker keeps the study's tensors resident (base + one task vector per source + the
int32 rank keys sparsifying methods select by, as ``merges.engine`` documents), a live model it merges into, a scratch
buffer for one tensor's merge, the activations of one evaluation batch and the Python /
torch runtime itself. All of it follows from checkpoint shapes (read from the
safetensors headers, nothing loaded) and the setup, so the check runs before any actor
starts and fails with the numbers instead of an OOM kill an hour into a study.
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


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one worker needs, by part; ``total`` is what the check compares."""

    resident: int  # base + task vectors + order statistics
    live_model: int
    scratch: int  # one tensor's merge temporaries
    activations: int  # one evaluation batch
    runtime: int

    @property
    def total(self) -> int:
        return self.resident + self.live_model + self.scratch + self.activations + self.runtime


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
    return ModelShape(
        numel=sum(sizes),
        largest_tensor=max(sizes),
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
    return MemoryEstimate(resident, tensor_bytes, scratch, activations, RUNTIME_BYTES)


def estimate_worker_memory(setup: WorkerSetup, *, seq_len: int | None = None) -> int:
    """Bytes one ``TrialWorker`` built from ``setup`` needs at its peak."""
    return worker_memory_breakdown(setup, seq_len=seq_len).total


def worker_memory_breakdown(setup: WorkerSetup, *, seq_len: int | None = None) -> MemoryEstimate:
    """``estimate_worker_memory`` by part (for the benchmark and error messages)."""
    shape = model_shape(setup.base, allow_pickle=setup.allow_pickle)
    return estimate_from_shape(
        shape, n_sources=len(setup.sources), dtype=setup.dtype, batch_size=setup.batch_size, seq_len=seq_len
    )


def plan_workers(per_worker: int, workers: int, nodes: Sequence[NodeCapacity], *, memory_kind: str) -> dict[str, int]:
    """Place ``workers`` on ``nodes`` so each fits by slots and memory; SearchError naming the numbers.

    Returns node -> worker count (fullest nodes first, as Ray packs). ``memory_kind`` names
    the memory in the message ("RAM", "GPU memory").
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
    need = f"{workers} workers × {per_worker / GIB:.2f} GiB needed"
    if len(nodes) == 1:
        node = nodes[0]
        if node.slots >= workers:
            raise SearchError(
                f"{need}, {node.available / GIB:.2f} GiB {memory_kind} available on node {node.node}; "
                "lower execution.workers (or execution.batch_size / the number of sources)"
            )
    have = "; ".join(
        f"node {n.node}: {n.available / GIB:.2f} GiB {memory_kind} available, {n.slots} worker slots"
        for n in nodes
    ) or "no alive nodes"
    raise SearchError(f"{need}, {workers - remaining} fit ({have}); lower execution.workers")
