"""Multi-SLERP (mergekit 0.1.5 ``multislerp``): barycentric interpolation of several models on a
hypersphere (of their task vectors when there is a base).

Each input is projected onto the unit sphere, the weighted mean direction is taken, the
inputs are mapped to the tangent space there, interpolated, mapped back by the exponential
map and scaled by the weighted mean norm. One model alone is returned as it is.

In float32 a trial is one fused pass whose coefficients come from the inputs' cached dot
products (within rtol 1e-5 of mergekit). In float16 / bfloat16 mergekit's arithmetic in the
dtype itself rounds at every step, so there the tensor is computed eagerly in its order
(``torch.equal`` to mergekit).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merges.errors import RecipeError
from merges.methods.fused import FusedJob
from merges.methods.planning import HALF, Plan, TensorContext


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


def coefficients(dots: torch.Tensor, weights: Sequence[float], *, normalize_weights: bool,
                 eps: float, where: str = "") -> list[float]:
    """``multislerp`` as ``sum_i c_i v_i``: the same steps on coefficients, from the inputs'
    dot products ``dots[i, j] = v_i . v_j`` (float64). Everything mergekit computes lies in
    the span of the inputs, so one fused pass then merges the tensor."""
    k = dots.shape[0]
    w = torch.tensor(list(weights), dtype=torch.float64)
    if normalize_weights:
        w = w / w.sum()
    if k == 1:
        return [1.0]
    norms = dots.diagonal().clamp(min=0).sqrt()
    inv = 1 / (norms + eps)
    gram = dots * inv.unsqueeze(0) * inv.unsqueeze(1)  # unit vectors' dot products
    mean_norm = (w @ gram @ w).clamp(min=0).sqrt()
    if mean_norm < eps:
        if k == 2:  # mergekit falls back to linear interpolation
            return [float(w[0]), float(w[1])]
        raise RecipeError(f"multislerp{where}: the weighted sum of the inputs is zero (antipodal "
                          "inputs whose weights cancel); use other weights")
    mean = w / mean_norm  # on the unit vectors
    along = gram @ mean  # each unit vector's dot product with the mean direction
    tangent = w - (w @ along) * mean  # sum_i w_i (u_i - along_i * mean)
    tangent_norm = (tangent @ gram @ tangent).clamp(min=0).sqrt() + eps
    on_units = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    scale = (norms * w).sum()
    return [float(c) for c in on_units * scale * inv]


def _dots(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    k = len(vectors)
    dots = torch.zeros((k, k), dtype=torch.float64)
    for i in range(k):
        for j in range(i, k):
            dots[i, j] = dots[j, i] = float(torch.dot(vectors[i].reshape(-1).double(), vectors[j].reshape(-1).double()))
    return dots


def plan(ctx: TensorContext) -> Plan:
    """One fused pass ``base + sum_i c_i * delta_i`` (or ``sum_i c_i * model_i``); the inputs'
    dot products are computed once per tensor."""
    positions = ctx.positions
    models = [ctx.model_of(p) for p in positions]
    all_weights = ctx.tensor_values("weight")
    weights = [all_weights[p] for p in positions]
    normalize = bool(ctx.global_value("normalize_weights"))
    eps = float(ctx.global_value("eps"))
    uses_base = ctx.uses_base
    if len(models) == 1:  # mergekit returns the model itself (not base + delta)
        return Plan(eager=lambda: ctx.tensor(models[0]))

    def vectors() -> list[torch.Tensor]:
        return [ctx.delta(m) if uses_base else ctx.tensor(m) for m in models]

    if ctx.dtype in HALF:
        def compute() -> torch.Tensor:
            return multislerp(vectors(), weights, ctx.base if uses_base else None,
                              normalize_weights=normalize, eps=eps,
                              where=f" (tensor {ctx.name!r})")

        return Plan(eager=compute)

    dots = ctx.cached(("multislerp", ctx.name, tuple(models), uses_base), lambda: _dots(vectors()))
    c = coefficients(dots, weights, normalize_weights=normalize, eps=eps,
                     where=f" (tensor {ctx.name!r})")
    deltas = [ctx.delta(m) for m in models]
    if uses_base:
        return Plan(job=FusedJob(ctx.out, ctx.base, deltas, c))
    return Plan(job=FusedJob(ctx.out, ctx.base, deltas, c, linear=True))
