"""Arcee Fusion (mergekit 0.1.5 ``arcee_fusion``): take the other model's value where it matters.

Importance of an entry: ``|other - base|`` times the KL divergence of the rows' softmaxes
(along the last axis). Entries at or above ``median + 1.5 * IQR`` of the importance take
the other model's value; the rest keep the base's. Quantiles are exact up to 1M entries;
above that mergekit estimates them from 1M entries drawn at random (the engine seeds its
draw per tensor; mergekit reproduces it in distribution only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from merges.methods.planning import Plan, TensorContext

QUANTILE_SAMPLE_SIZE = 1_000_000  # mergekit's


def importance(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    diff = (other - base).abs()
    eps = 1e-8
    p = F.softmax(other, dim=-1) + eps
    q = F.softmax(base, dim=-1) + eps
    return diff * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def threshold(scores: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``median + 1.5 * (q3 - q1)`` by mergekit's index rule on the sorted (sampled) scores."""
    flat = scores.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE_SIZE:
        picks = torch.randint(flat.numel(), (QUANTILE_SAMPLE_SIZE,), device=flat.device,
                              generator=generator)
        flat = flat[picks]
    ordered, _ = torch.sort(flat)
    q = torch.tensor([0.25, 0.5, 0.75])
    q1, median, q3 = ordered[(q.to(ordered.device) * (ordered.numel() - 1)).long()]
    return median + 1.5 * (q3 - q1)


def arcee_fusion(base: torch.Tensor, other: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    scores = importance(other, base)
    mask = (scores >= threshold(scores, generator)).float()
    return base + (other - base) * mask


def plan(ctx: TensorContext) -> Plan:
    (position,) = ctx.positions
    model = ctx.model_of(position)
    base = ctx.base
    assert base is not None
    shape = ctx.shape

    def compute() -> torch.Tensor:
        generator = ctx.generator(position) if ctx.numel > QUANTILE_SAMPLE_SIZE else None
        other = ctx.tensor(model).view(shape)
        return arcee_fusion(base.view(shape), other, generator).reshape(-1)

    return Plan(eager=compute)
