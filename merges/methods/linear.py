"""Linear merge (mergekit 0.1.5 ``linear``): ``sum(w_i x_i)``, divided by ``sum(w_i)`` when normalising."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merges.methods.fused import FusedJob, opmath_dtype
from merges.methods.planning import Plan, TensorContext


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], *,
           normalize: bool = True) -> torch.Tensor:
    """Weighted sum of same-shaped tensors, accumulated in input order like mergekit."""
    first = tensors[0]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    result = torch.zeros_like(first, dtype=dtype)
    for tensor, weight in zip(tensors, weights, strict=True):
        result.addcmul_(tensor, torch.tensor(weight, dtype=dtype, device=first.device))
    if normalize:
        result.div_(torch.tensor(list(weights), dtype=dtype, device=first.device).sum())
    return result.to(first.dtype)


def plan(ctx: TensorContext) -> Plan:
    """One fused pass, as mergekit computes it: the sources themselves (a listed base too) in the
    recipe's order, each added with ``addcmul_`` into a float32 sum, divided by the float32 sum of
    all weights, rounded once into the recipe's dtype."""
    weights = ctx.tensor_values("weight")
    normalize = bool(ctx.global_value("normalize"))
    sources = [ctx.tensor(ctx.model_of(position)) for position in range(len(weights))]
    divisor = float(torch.tensor([list(weights)], dtype=opmath_dtype(ctx.dtype)).sum(dim=1))
    return Plan(job=FusedJob(ctx.out, None, sources, list(weights), linear=True, normalize=normalize,
                             divisor=divisor, fma=True))
