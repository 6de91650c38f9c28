"""NearSwap (mergekit 0.1.5 ``nearswap``): take the other model's value where it is near the base.

Per entry, ``w = clamp(t / max(|base - other|, 1e-6), 0, 1)`` and the result is
``w * other + (1 - w) * base``: entries closer than ``t`` are swapped in, farther ones
move towards the other model by ``t / distance``.
"""

from __future__ import annotations

import torch

from merges.methods.planning import Plan, TensorContext

MIN_DISTANCE = 1e-6  # mergekit's clamp of |base - other|
CHUNK = 1 << 22  # entries per eager step: bounds the temporaries


def nearswap(t: float, base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """mergekit's formula, same order of operations."""
    distance = torch.abs(base - other)
    weight = (t / distance.clamp(min=MIN_DISTANCE)).clamp(min=0, max=1)
    return weight * other + (1 - weight) * base


def plan(ctx: TensorContext) -> Plan:
    """One elementwise pass over base and the other model, chunked."""
    (position,) = ctx.positions
    model = ctx.model_of(position)
    t = float(ctx.global_value("t"))
    base, delta, out = ctx.base, ctx.delta(model), ctx.out
    assert base is not None

    def compute() -> torch.Tensor:
        for start in range(0, out.numel(), CHUNK):
            a = base[start:start + CHUNK]
            out[start:start + CHUNK] = nearswap(t, a, a + delta[start:start + CHUNK])
        return out

    return Plan(eager=compute)
