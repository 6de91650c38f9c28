"""Karcher mean (mergekit 0.1.5 ``karcher``): the weighted Riemannian mean of the models'
directions on the unit hypersphere (equal weights), scaled by their mean norm.

The base is not an input of its own (mergekit ignores ``base_model``); a listed base is one
more model. Iterates at most ``max_iter`` times, until the tangent step is below ``tol``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merges.methods.planning import Plan, TensorContext


def karcher(tensors: Sequence[torch.Tensor], alphas: Sequence[float], *, max_iter: int = 10,
            tol: float = 1e-5) -> torch.Tensor:
    """mergekit's ``karcher_merge_tensors`` (same order of operations and branches)."""
    if len(tensors) == 1:
        return tensors[0]
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms, units = [], []
    for tensor in tensors:
        norm = torch.linalg.vector_norm(tensor.to(dtype))
        norms.append(norm)
        units.append(torch.zeros_like(tensor) if norm.item() == 0.0
                     else (tensor / norm).to(tensor.dtype))
    valid = [i for i, norm in enumerate(norms) if norm.item() > tol]
    if not valid:
        return sum(tensor * 0 for tensor in tensors)  # type: ignore[return-value]
    valid_alphas = [alphas[i] for i in valid]
    alpha_sum = sum(valid_alphas)
    weights = [alpha / alpha_sum for alpha in valid_alphas]
    valid_units = [units[i] for i in valid]
    mean = torch.zeros_like(valid_units[0])
    for alpha, unit in zip(weights, valid_units, strict=True):
        mean += alpha * unit
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = valid_units[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for alpha, unit in zip(weights, valid_units, strict=True):
            dot = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += alpha * (theta / torch.sin(theta)) * (unit - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent.to(dtype))
        if tangent_norm.item() < tol:
            break
        mean = (torch.cos(tangent_norm) * mean
                + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(dtype))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)
    scale = sum(alpha * norm for alpha, norm in zip(alphas, norms, strict=True))
    return scale * mean


def plan(ctx: TensorContext) -> Plan:
    models = [ctx.model_of(p) for p in ctx.positions]
    max_iter = int(ctx.global_value("max_iter"))
    tol = float(ctx.global_value("tol"))

    def compute() -> torch.Tensor:
        tensors = [ctx.tensor(m) for m in models]
        return karcher(tensors, [1.0 / len(tensors)] * len(tensors), max_iter=max_iter, tol=tol)

    return Plan(eager=compute)
