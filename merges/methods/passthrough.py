"""Passthrough (mergekit 0.1.5): one input per output tensor, optionally scaled."""

from __future__ import annotations

from merges.methods.fused import FusedJob
from merges.methods.planning import Plan, TensorContext


def plan(ctx: TensorContext) -> Plan:
    """The chosen model's own tensor times the slice's scale, rounded once (as mergekit)."""
    assert ctx.model is not None
    return Plan(job=FusedJob(ctx.out, None, [ctx.tensor(ctx.model)], [ctx.scale], linear=True))
