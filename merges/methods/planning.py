"""The narrow interface between the engine and a method's planner.

For each output tensor the engine hands a method's ``plan(context)`` (the module named by
``MethodSpec.planner``) a ``TensorContext``: the tensor's resident inputs (base, deltas =
source - base), the recipe's parameter values for its cell, and the engine's cached
per-tensor statistics. The planner returns a ``Plan``: a fused job (one elementwise pass,
``merges.methods.fused``) or an eager function, plus what the engine still fills in
for all tensors at once (L1 rescale factors, tied-cut sort positions).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch

from merges.methods.fused import Delta, FusedJob
from merges.methods.registry import MethodSpec

BASE = -1  # model index of the base; sources are 0..K-1
# float16 / bfloat16: mergekit rounds at every step of a method there, so only its own order of
# operations gives its bits (planners that take a faster route in float32 follow it here)
HALF = (torch.float16, torch.bfloat16)
RankKey = tuple[str, str, int]  # ("descending" | "ascending", tensor name, model)
T = TypeVar("T")


@dataclass
class Plan:
    """How one output tensor is computed: a fused job, or an eager function."""

    job: FusedJob | None = None
    eager: Callable[[], torch.Tensor] | None = None  # returns the flat result
    rescale: list[int] | None = None  # job items whose L1 scale is still to compute
    ranks: list[tuple[int, RankKey]] | None = None  # (job item, rank key) still to fill


class TensorContext(Protocol):
    """One output tensor of one recipe, as a planner sees it."""

    spec: MethodSpec
    name: str  # the input tensor's name
    shape: tuple[int, ...]
    numel: int
    shapes: Mapping[str, tuple[int, ...]]  # every tensor of the merge by input name (arcee_fusion's draws)
    out: torch.Tensor  # flat, engine dtype and device
    seed: int
    dtype: torch.dtype
    positions: tuple[int, ...]  # recipe source positions that are not the base
    uses_base: bool  # the recipe has a base and the method takes it as an input
    model: int | None  # passthrough: which model supplies this tensor (BASE or a source)
    scale: float  # passthrough scale

    @property
    def base(self) -> torch.Tensor | None:
        """The base tensor (flat), None without a base checkpoint."""

    @property
    def fused_base(self) -> torch.Tensor | None:
        """The base for ``FusedJob.base`` only: ``base``, or the lean plan's bfloat16 copy as held
        where the arithmetic is float32 (the fused pass widens it exactly; no float32 copy)."""

    def model_of(self, position: int) -> int:
        """The engine's model index (``BASE`` or 0..K-1) of recipe source ``position``."""

    def delta(self, model: int) -> torch.Tensor:
        """Model ``model``'s tensor minus the base (flat; the tensor itself without a base)."""

    def task_vector(self, model: int) -> Delta:
        """``delta`` for a ``FusedJob``'s ``deltas`` alone: possibly a ``PairDelta`` the fused pass
        forms itself. Asked before the cut's lookups, so that a lean engine does not form it while
        it selects; nothing else may read it (ask ``delta`` for that)."""

    def tensor(self, model: int) -> torch.Tensor:
        """Model ``model``'s own tensor (flat; read again from its checkpoint on first use, since
        base + delta is not always the source in floating point and mergekit uses the source)."""

    def tensor_values(self, param: str) -> tuple[float, ...]:
        """A per-source parameter for this tensor's cell, one value per recipe source."""

    def global_value(self, param: str) -> float | bool:
        """A shared parameter for this tensor's cell (the catalogue default when unset)."""

    def cached(self, key: tuple[object, ...], compute: Callable[[], T]) -> T:
        """A per-engine statistic (not dependent on the recipe's numbers), computed once."""

    def sorted_magnitudes(self, model: int) -> torch.Tensor:
        """``|delta|`` ascending (CPU), for magnitude bands."""

    def prefetch_sorted(self, wanted: Mapping[int, Sequence[int]]) -> None:
        """Say which ascending positions of ``|delta|`` ``sorted_magnitudes(model)`` will be read at,
        per model (positions the cuts read, for task vectors asked for by ``task_vector``): a lean
        engine then finds them for every model in one pass over the tensors. A hint: nothing else
        changes."""

    def rank(self, key: RankKey) -> torch.Tensor | None:
        """mergekit's sort positions of a delta, if already computed (else None)."""

    def generator(self, position: int) -> torch.Generator:
        """A generator seeded by (recipe seed, tensor, source position), on the engine's device."""

    def random_key(self, position: int, model: int) -> torch.Tensor:
        """Uniform int32 keys of (recipe seed, tensor, source position)."""

    def della(self, position: int, model: int, density: float, epsilon: float,
              rescale: bool) -> torch.Tensor:
        """DELLA's sparsified (and rescaled) delta."""
