"""Model Stock (mergekit 0.1.5 ``model_stock``): interpolate the base towards the sources'
average by a ratio derived from the mean cosine between task vectors."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merges.methods.planning import Plan, TensorContext


def model_stock(base: torch.Tensor, sources: Sequence[torch.Tensor], *,
                filter_wise: bool = False) -> torch.Tensor:
    """Needs at least two sources; ``filter_wise`` computes one ratio per output row."""
    w_0, ws = base, list(sources)
    out_shape = w_0.shape
    if filter_wise:
        if w_0.dim() == 1:
            w_0 = w_0.unsqueeze(0)
            ws = [w.unsqueeze(0) for w in ws]
    else:
        w_0 = w_0.reshape(-1)
        ws = [w.reshape(-1) for w in ws]
    offsets = [w - w_0 for w in ws]
    cos_thetas = []
    for index, offset_a in enumerate(offsets):
        for offset_b in offsets[index + 1:]:
            norm_product = torch.norm(offset_a, dim=-1) * torch.norm(offset_b, dim=-1)
            cos_thetas.append(((offset_a * offset_b).sum(dim=-1)
                               / norm_product.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cos_thetas).mean(dim=0).unsqueeze(-1)
    count = len(ws)
    denominator = 1 + (count - 1) * cos_theta
    singular = denominator.abs() < 1e-6  # no finite estimate: keep the base
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos_theta), (count * cos_theta) / safe)
    average = sum(ws) / count
    return (t * average + (1 - t) * w_0).reshape(out_shape)


def plan(ctx: TensorContext) -> Plan:
    filter_wise = bool(ctx.global_value("filter_wise"))
    shape, base = ctx.shape, ctx.base
    assert base is not None
    models = [ctx.model_of(p) for p in ctx.positions]

    def compute() -> torch.Tensor:
        sources = [ctx.tensor(model).view(shape) for model in models]  # the sources themselves
        return model_stock(base.view(shape), sources, filter_wise=filter_wise).reshape(-1)

    return Plan(eager=compute)
