"""NuSLERP (mergekit 0.1.5 ``nuslerp``): spherical interpolation of two models, of their task
vectors when there is a base, flattened (default) or per row / column.

``t = w1 / (w0 + w1)`` (0.5 when the weights sum to ~0). Flattened, the angle between
the two inputs does not depend on the weights: the engine caches it per tensor and a trial
is one fused pass ``base + c0 * d0 + c1 * d1``. In float16 / bfloat16 that single rounding of
float64 coefficients is not mergekit's result: there the tensor is computed eagerly in mergekit's
order, in the dtype itself (``torch.equal`` to mergekit).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from merges.methods.fused import FusedJob
from merges.methods.planning import HALF, Plan, TensorContext

EPS = 1e-8  # mergekit's colinearity threshold (on 1 - cos^2, squared)
NORM_EPS = 1e-7  # mergekit's clamp of the norms


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=NORM_EPS)


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, dim: int = -1,
            flatten: bool = False) -> torch.Tensor:
    """mergekit's ``nuslerp`` (same order of operations)."""
    out_shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    cos_theta = torch.sum(_normalize(v0) * _normalize(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= EPS**2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(out_shape)


def interpolation_t(weights: tuple[float, float]) -> float:
    total = weights[0] + weights[1]
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


@dataclass(frozen=True)
class _Angle:
    colinear: bool
    theta: float


def _angle(v0: torch.Tensor, v1: torch.Tensor) -> _Angle:
    cos_theta = torch.sum(_normalize(v0.reshape(-1)) * _normalize(v1.reshape(-1))).clamp(-1, 1)
    colinear = bool((1 - cos_theta.square()) <= EPS**2)
    theta = torch.acos(torch.where(torch.tensor(colinear), 0, cos_theta))
    return _Angle(colinear, float(theta))


def plan(ctx: TensorContext) -> Plan:
    positions = ctx.positions
    models = [ctx.model_of(p) for p in positions]
    weights = ctx.tensor_values("weight")
    t = interpolation_t((weights[positions[0]], weights[positions[1]]))
    row_wise = bool(ctx.global_value("nuslerp_row_wise"))
    flatten = bool(ctx.global_value("nuslerp_flatten"))
    base = ctx.base if ctx.uses_base else None
    inputs = [ctx.delta(m) if base is not None else ctx.tensor(m) for m in models]
    if not flatten or ctx.dtype in HALF:
        shape = ctx.shape

        def compute() -> torch.Tensor:
            v0, v1 = (x.view(shape) for x in inputs)
            result = nuslerp(t, v0, v1, dim=0 if row_wise else -1, flatten=flatten).reshape(-1)
            return result if base is None else base + result

        return Plan(eager=compute)
    angle = ctx.cached(("nuslerp", ctx.name, *models, base is not None),
                       lambda: _angle(inputs[0], inputs[1]))
    if angle.colinear:
        c0, c1 = 1 - t, t
    else:
        theta = torch.tensor(angle.theta, dtype=torch.float64)
        sin_theta = torch.sin(theta)
        c0 = float(torch.sin((1 - t) * theta) / sin_theta)
        c1 = float(torch.sin(t * theta) / sin_theta)
    if base is None:
        return Plan(job=FusedJob(ctx.out, None, inputs, [c0, c1], linear=True))
    return Plan(job=FusedJob(ctx.out, base, inputs, [c0, c1]))
