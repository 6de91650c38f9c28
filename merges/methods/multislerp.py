"""Multi-SLERP (mergekit 0.1.5 ``multislerp``): barycentric interpolation of several models on a
hypersphere (of their task vectors when there is a base).

Each input is projected onto the unit sphere, the weighted mean direction is taken, the
inputs are mapped to the tangent space there, interpolated, mapped back by the exponential
map and scaled by the weighted mean norm. One model alone is returned as it is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merges.errors import RecipeError
from merges.methods.planning import Plan, TensorContext


def multislerp(vectors: Sequence[torch.Tensor], weights: Sequence[float],
               base: torch.Tensor | None = None, *, normalize_weights: bool = True,
               eps: float = 1e-8, where: str = "") -> torch.Tensor:
    """mergekit's ``multislerp`` (same order of operations). ``vectors``: the models, or
    with ``base`` their task vectors (model - base)."""
    if len(vectors) == 1:
        return vectors[0] if base is None else base + vectors[0]
    stacked = torch.stack(list(vectors), dim=0)
    flat = stacked.view(stacked.shape[0], -1)
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if stacked.shape[0] == 2:  # mergekit falls back to linear interpolation
            result = (stacked[0] * w[0] + stacked[1] * w[1]).view(stacked.shape[1:])
            return result if base is None else result + base
        raise RecipeError(f"multislerp{where}: the weighted sum of the inputs is zero (antipodal "
                          "inputs whose weights cancel); use other weights")
    mean = mean / mean_norm
    dots = (units * mean).sum(-1, keepdim=True)
    tangents = units - dots * mean
    tangent = (tangents * w.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    result = result * (norms.squeeze(-1) * w).sum()
    result = result.view(stacked.shape[1:])
    return result if base is None else result + base


def plan(ctx: TensorContext) -> Plan:
    positions = ctx.positions
    models = [ctx.model_of(p) for p in positions]
    all_weights = ctx.tensor_values("weight")
    weights = [all_weights[p] for p in positions]
    normalize = bool(ctx.global_value("normalize_weights"))
    eps = float(ctx.global_value("eps"))
    base = ctx.base if ctx.uses_base else None

    def compute() -> torch.Tensor:
        vectors = [ctx.delta(m) if base is not None else ctx.tensor(m) for m in models]
        return multislerp(vectors, weights, base, normalize_weights=normalize, eps=eps,
                          where=f" (tensor {ctx.name!r})")

    return Plan(eager=compute)
