"""Linear merge (mergekit 0.1.5 ``linear``): ``sum(w_i x_i)``, divided by ``sum(w_i)`` when normalising."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merges.methods.fused import FusedJob
from merges.methods.planning import BASE, Plan, TensorContext


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
    """One fused pass; a source that is the base adds its weight to the base term."""
    weights = ctx.tensor_values("weight")
    normalize = bool(ctx.global_value("normalize"))
    deltas, used, base_weight = [], [], None
    for position in range(len(weights)):
        model = ctx.model_of(position)
        if model == BASE:
            base_weight = weights[position] + (base_weight or 0.0)
        else:
            deltas.append(ctx.delta(model))
            used.append(weights[position])
    divisor = float(torch.tensor(list(weights), dtype=torch.float32).sum())
    return Plan(job=FusedJob(ctx.out, ctx.base, deltas, used, linear=True, base_weight=base_weight,
                             normalize=normalize, divisor=divisor))
