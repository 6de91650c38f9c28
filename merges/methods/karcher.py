"""Karcher mean (mergekit 0.1.5 ``karcher``): the weighted Riemannian mean of the models'
directions on the unit hypersphere (equal weights), scaled by their mean norm.

The base is not an input of its own (mergekit ignores ``base_model``); a listed base is one
more model. Iterates at most ``max_iter`` times, until the tangent step is below ``tol``.
Nothing in it is a gene, so the engine keeps each tensor's mean once computed (``plan``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merges.methods import karcher_kernel
from merges.methods.planning import Plan, TensorContext


def karcher(tensors: Sequence[torch.Tensor], alphas: Sequence[float], *, max_iter: int = 10,
            tol: float = 1e-5) -> torch.Tensor:
    """mergekit's ``karcher_merge_tensors``, the same bits: its dots, norms and branches as torch
    calls on the same operands, its elementwise expressions as one pass each per iteration
    (``karcher_kernel``: the same float operations and roundings per entry) writing into buffers
    allocated once per call; torch's own operations into those buffers where the kernel cannot
    run (another device, float64, no C compiler)."""
    if len(tensors) == 1:
        return tensors[0]
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    wide: dict[torch.dtype, torch.Tensor] = {}

    def widened(x: torch.Tensor) -> torch.Tensor | None:
        """A reused ``dtype`` buffer shaped like ``x`` (None: ``x`` is in ``dtype`` already)."""
        if x.dtype == dtype:
            return None
        if x.dtype not in wide:
            wide[x.dtype] = torch.empty(x.shape, dtype=dtype, device=x.device)
        return wide[x.dtype]

    def norm(x: torch.Tensor) -> torch.Tensor:
        """``vector_norm(x.to(dtype))``, the widened copy in the reused buffer."""
        buffer = widened(x)
        return torch.linalg.vector_norm(x if buffer is None else buffer.copy_(x))

    norms, units = [], []
    for tensor in tensors:
        norm_ = norm(tensor)
        norms.append(norm_)
        units.append(torch.zeros_like(tensor) if norm_.item() == 0.0
                     else (tensor / norm_).to(tensor.dtype))
    valid = [i for i, norm_ in enumerate(norms) if norm_.item() > tol]
    if not valid:
        return sum(tensor * 0 for tensor in tensors)  # type: ignore[return-value]
    valid_alphas = [alphas[i] for i in valid]
    alpha_sum = sum(valid_alphas)
    weights = [alpha / alpha_sum for alpha in valid_alphas]
    valid_units = [units[i] for i in valid]
    mean = torch.zeros_like(valid_units[0])
    step = torch.empty_like(mean)  # one term at a time
    for alpha, unit in zip(weights, valid_units, strict=True):
        mean += torch.mul(unit, alpha, out=step)  # alpha * unit
    mean_norm = norm(mean)
    if mean_norm.item() < tol:
        mean = valid_units[0].clone()
    else:
        mean.div_(mean_norm)  # (mean / mean_norm), already mean's dtype
    lib = karcher_kernel.library() if karcher_kernel.supports([mean, *valid_units]) else None
    tangent = torch.empty_like(mean)
    wide_mean = widened(mean)  # the kernel's float32 copy of what it writes, for the norms
    for _ in range(max_iter):
        active, dots, coefficients = [], [], []
        for alpha, unit in zip(weights, valid_units, strict=True):
            dot = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            active.append(unit)
            dots.append(dot)
            coefficients.append(alpha * (theta / torch.sin(theta)))
        if lib is not None:  # exact values in float32: dot and coefficient are in mean's dtype
            karcher_kernel.tangent(lib, active, [d.item() for d in dots],
                                   [c.item() for c in coefficients], mean, tangent, wide_mean)
            tangent_norm = torch.linalg.vector_norm(tangent if wide_mean is None else wide_mean)
        else:
            tangent.zero_()
            for unit, dot, coefficient in zip(active, dots, coefficients, strict=True):
                torch.mul(dot, mean, out=step)
                torch.sub(unit, step, out=step)
                tangent += torch.mul(coefficient, step, out=step)  # alpha * (theta / sin) * (unit - dot * mean)
            tangent_norm = norm(tangent)
        if tangent_norm.item() < tol:
            break
        # mean = cos(|t|) * mean + sin(|t|) * (t / |t|), each product in mean's dtype
        cos, sin = torch.cos(tangent_norm), torch.sin(tangent_norm)
        if lib is not None:  # torch rounds a 0-d multiplier in the first operand to mean's dtype
            karcher_kernel.update(lib, cos.to(mean.dtype).item(), sin.to(mean.dtype).item(),
                                  tangent_norm.item(), mean, tangent, wide_mean)
            unit_norm = torch.linalg.vector_norm(mean if wide_mean is None else wide_mean)
        else:
            torch.div(tangent, tangent_norm, out=tangent)
            torch.mul(sin, tangent, out=tangent)
            torch.mul(cos, mean, out=mean)
            mean += tangent
            unit_norm = norm(mean)
        if unit_norm.item() > tol:
            mean.div_(unit_norm)
    scale = sum(alpha * norm_ for alpha, norm_ in zip(alphas, norms, strict=True))
    return torch.mul(scale, mean, out=mean)  # type: ignore[call-overload]


def plan(ctx: TensorContext) -> Plan:
    """The Karcher mean depends on the sources and on ``max_iter`` / ``tol`` only (no gene moves
    it: they are fixed values, not searched), so it is a per-tensor statistic: computed on the
    first recipe that needs it, then each trial copies it (the engine writes it into ``out``)."""
    models = tuple(ctx.model_of(p) for p in ctx.positions)
    max_iter = int(ctx.global_value("max_iter"))
    tol = float(ctx.global_value("tol"))

    def mean() -> torch.Tensor:
        tensors = [ctx.tensor(m) for m in models]
        return karcher(tensors, [1.0 / len(tensors)] * len(tensors), max_iter=max_iter, tol=tol)

    return Plan(eager=lambda: ctx.cached(("karcher", ctx.name, models, max_iter, tol), mean))
