"""Spherical interpolation (mergekit 0.1.5 ``slerp``) between the base and one other model.

The angle between two tensors does not depend on ``t``; ``slerp_geometry`` computes it
once (mergekit's chunked norms and dot product, same order of operations) and
``slerp_apply`` interpolates for a given ``t``. ``slerp`` is both in one call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from merges.methods.fused import FusedJob
from merges.methods.planning import Plan, TensorContext

_CHUNK_ELEMENTS = 1024 * 1024  # mergekit's chunk: the chunked sums round the same way
DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


@dataclass(frozen=True)
class SlerpGeometry:
    """Angle between two flattened tensors; ``linear`` where mergekit falls back to lerp."""

    linear: torch.Tensor  # bool [1, 1]
    theta: torch.Tensor  # [1, 1]
    dtype: torch.dtype


def _compute_dtype(v0: torch.Tensor) -> torch.dtype:
    return torch.float64 if v0.dtype == torch.float64 else torch.float32


def slerp_geometry(v0: torch.Tensor, v1: torch.Tensor) -> SlerpGeometry:
    dtype = _compute_dtype(v0)
    a = v0.reshape(1, -1)
    b = v1.reshape(1, -1)
    if not a.shape[1]:
        flag = torch.ones((1, 1), dtype=torch.bool, device=v0.device)
        return SlerpGeometry(flag, torch.zeros((1, 1), dtype=dtype, device=v0.device), dtype)
    chunk = _CHUNK_ELEMENTS
    norm_a_parts, norm_b_parts = [], []
    for start in range(0, a.shape[1], chunk):
        norm_a_parts.append(torch.linalg.vector_norm(a[:, start:start + chunk].to(dtype), dim=1,
                                                     keepdim=True))
        norm_b_parts.append(torch.linalg.vector_norm(b[:, start:start + chunk].to(dtype), dim=1,
                                                     keepdim=True))
    norm_a = torch.linalg.vector_norm(torch.stack(norm_a_parts), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack(norm_b_parts), dim=0)
    norm_a = torch.where(norm_a > NORM_EPS, norm_a, 1)
    norm_b = torch.where(norm_b > NORM_EPS, norm_b, 1)
    dot_parts = []
    for start in range(0, a.shape[1], chunk):
        x = a[:, start:start + chunk].to(dtype) / norm_a
        y = b[:, start:start + chunk].to(dtype) / norm_b
        dot_parts.append((x * y).sum(dim=1, keepdim=True))
    dot = torch.stack(dot_parts).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > DOT_THRESHOLD
    theta = torch.acos(torch.where(linear, 0, dot))
    return SlerpGeometry(linear, theta, dtype)


def slerp_coefficients(t: float, geometry: SlerpGeometry) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients ``(c0, c1)`` with ``result = c0 * v0 + c1 * v1``."""
    tt = torch.tensor([[t]], dtype=geometry.dtype, device=geometry.theta.device)
    theta = geometry.theta
    sin_theta = torch.sin(theta)
    c0 = torch.where(geometry.linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    c1 = torch.where(geometry.linear, tt, torch.sin(tt * theta) / sin_theta)
    return c0, c1


def slerp_apply(t: float, geometry: SlerpGeometry, v0: torch.Tensor, v1: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
    c0, c1 = slerp_coefficients(t, geometry)
    c0, c1 = c0.reshape(()), c1.reshape(())
    a = v0.to(geometry.dtype)
    b = v1.to(geometry.dtype)
    result = torch.mul(a, c0)
    result.add_(torch.mul(b, c1))
    if out is None:
        return result
    out.copy_(result)
    return out


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """mergekit's slerp of ``v0`` (the base, ``t = 0``) towards ``v1`` (``t = 1``)."""
    return slerp_apply(t, slerp_geometry(v0, v1), v0, v1)


def plan(ctx: TensorContext) -> Plan:
    """The angle is cached per tensor; a trial is one fused ``c0 * base + c1 * source`` pass."""
    (position,) = ctx.positions
    model = ctx.model_of(position)
    base, other = ctx.base, ctx.tensor(model)
    assert base is not None
    geometry = ctx.cached(("slerp", ctx.name, model), lambda: slerp_geometry(base, other))
    c0, c1 = slerp_coefficients(float(ctx.global_value("t")), geometry)
    # mergekit: c0 * base + c1 * other in float32 (two products, one sum), rounded once
    return Plan(job=FusedJob(ctx.out, None, [base, other], [float(c0), float(c1)], linear=True))
