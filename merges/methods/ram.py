"""RAM and RAM+ tensor-local (mergekit 0.1.5 ``ram``, ``ramplus_tl``): Reinforced Agent Merging.

An entry of a task vector counts when ``|delta| > epsilon``. Entries only one model
changed keep that model's value; entries several changed take their mean. ``ramplus_tl``
scales each model's unique entries by ``1 + r * clamp(shared / unique, 0, alpha)``, its
count of entries shared with others over its count of unique ones (per tensor).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merges.methods.planning import Plan, TensorContext


def ram(base: torch.Tensor, deltas: Sequence[torch.Tensor], *, epsilon: float = 1e-5,
        plus: tuple[float, float] | None = None) -> torch.Tensor:
    """mergekit's ``ram_merge`` (``plus=None``) or ``ramplus_tl_merge`` (``plus=(r, alpha)``)."""
    if not deltas:
        return base
    flat = torch.stack(list(deltas), dim=0).view(len(deltas), -1)
    nonzero = flat.abs() > epsilon
    counts = nonzero.sum(dim=0, keepdim=True)
    overlap = counts > 1
    unique = counts == 1
    kept = flat * nonzero
    if plus is None:
        merged = ((kept * unique) + (kept * overlap / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    else:
        r, alpha = plus
        shared_counts = (nonzero & overlap).sum(dim=1)
        unique_counts = (nonzero & unique).sum(dim=1)
        rho = shared_counts / unique_counts.clamp(min=epsilon)
        lam = 1 + r * rho.clamp(min=0, max=alpha)
        merged = ((kept * unique * lam.unsqueeze(-1))
                  + (kept * overlap / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


def plan(ctx: TensorContext) -> Plan:
    base = ctx.base
    assert base is not None
    deltas = [ctx.delta(ctx.model_of(p)) for p in ctx.positions]
    epsilon = float(ctx.global_value("epsilon"))
    plus = None
    if ctx.spec.name == "ramplus_tl":
        plus = (float(ctx.global_value("r")), float(ctx.global_value("alpha")))

    def compute() -> torch.Tensor:
        return ram(base, deltas, epsilon=epsilon, plus=plus)

    return Plan(eager=compute)
