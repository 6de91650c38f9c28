"""NearSwap (mergekit 0.1.5 ``nearswap``): take the other model's value where it is near the base.

Per entry, ``w = clamp(t / max(|base - other|, 1e-6), 0, 1)`` and the result is
``w * other + (1 - w) * base``: entries closer than ``t`` are swapped in, farther ones
move towards the other model by ``t / distance``. Computed in the arithmetic dtype on the
models themselves (mergekit's inputs), so float16 / bfloat16 results are mergekit's bit for bit.
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
    """One elementwise pass over base and the other model, chunked (elementwise: chunks give
    the same bits). The other model's own tensor, not base + delta (not always it when rounded)."""
    (position,) = ctx.positions
    model = ctx.model_of(position)
    t = float(ctx.global_value("t"))
    base, other, out = ctx.base, ctx.tensor(model), ctx.out
    assert base is not None

    def compute() -> torch.Tensor:
        for start in range(0, out.numel(), CHUNK):
            end = start + CHUNK
            out[start:end] = nearswap(t, base[start:end], other[start:end])
        return out

    return Plan(eager=compute)
