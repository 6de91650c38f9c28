"""Passthrough (mergekit 0.1.5): one input per output tensor, optionally scaled."""

from __future__ import annotations

from merges.methods.fused import FusedJob
from merges.methods.planning import BASE, Plan, TensorContext


def plan(ctx: TensorContext) -> Plan:
    """The chosen model's tensor (base + delta), times the slice's scale, in one pass."""
    assert ctx.model is not None
    if ctx.model == BASE:
        return Plan(job=FusedJob(ctx.out, ctx.base, [], [], linear=True, base_weight=ctx.scale))
    return Plan(job=FusedJob(ctx.out, ctx.base, [ctx.delta(ctx.model)], [ctx.scale], linear=True))
