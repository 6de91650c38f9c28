"""SCE (mergekit 0.1.5 ``sce``): select, calculate, erase.

Keep the ``select_topk`` fraction of entries whose task vectors vary most across the
models (of the entries that vary at all), weight each task vector by its mean square
(share of the total), erase entries whose sign disagrees with the weighted majority
(TIES' sum election), and add the weighted mean of what is left to the base.

In float16 / bfloat16 variances tie often, and which tied entries mergekit's ``topk`` keeps is
its own order, so there the mask is mergekit's ``topk`` itself (per trial, on the variance
cached per tensor) rather than the cached stable order: ``torch.equal`` to mergekit.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import NamedTuple

import torch

from merges.methods import sce_kernel
from merges.methods.planning import HALF, Plan, TensorContext


def sce_mask(vectors: torch.Tensor, density: float, mask_dtype: torch.dtype,
             variance: torch.Tensor | None = None) -> torch.Tensor:
    """mergekit's ``sce_mask``: the top ``density`` share of nonzero-variance entries
    (``variance``: ``vectors``' own, when already computed)."""
    if density <= 0:
        return torch.zeros_like(vectors[0], dtype=mask_dtype)
    if density >= 1:
        return torch.ones_like(vectors[0], dtype=mask_dtype)
    var = torch.var(vectors, dim=0, unbiased=False) if variance is None else variance
    k = int(torch.count_nonzero(var) * density)
    if k == 0:
        return torch.zeros_like(var, dtype=mask_dtype)
    _, indices = torch.topk(var.abs().view(-1), k=k, largest=True)
    mask = torch.zeros_like(var, dtype=mask_dtype)
    mask.view(-1)[indices] = 1
    return mask


def sce_weight(vectors: torch.Tensor) -> torch.Tensor:
    return weights_of_means(vectors.square().reshape(vectors.shape[0], -1).mean(dim=1))


def weights_of_means(weights: torch.Tensor) -> torch.Tensor:
    """``sce_weight`` after its ``mean``: each task vector's share of the mean squares."""
    total = torch.sum(weights).item()
    if abs(total) < 1e-6:
        return torch.ones_like(weights) / weights.shape[0]
    return weights / total


class VarianceOrder(NamedTuple):
    """Per tensor, independent of the recipe: each entry's position in the descending order of
    the task vectors' variance (int32; mergekit's ``topk`` picks the first ``k``), and how many
    entries vary at all. (A tuple: the lean plan drops tensor statistics after each chunk.)"""

    position: torch.Tensor
    nonzero: int


def variance_order(vectors: torch.Tensor) -> VarianceOrder:
    var = torch.var(vectors, dim=0, unbiased=False).reshape(-1)
    order = torch.argsort(var.abs(), descending=True, stable=True)
    position = torch.empty_like(order, dtype=torch.int32)
    position[order] = torch.arange(order.numel(), dtype=torch.int32, device=order.device)
    return VarianceOrder(position, int(torch.count_nonzero(var)))


def keep_count(nonzero: int, select_topk: float) -> int:
    """mergekit's ``k = int(count_nonzero(var) * density)``: an int64 tensor times a Python float
    is a float32 product in torch (not a float64 one: at 10M entries the two can differ by one)."""
    return 0 if select_topk <= 0 else int(torch.tensor(nonzero) * select_topk)


def sce(base: torch.Tensor, deltas: Sequence[torch.Tensor], *, select_topk: float = 1.0,
        int8_mask: bool = False, order: VarianceOrder | None = None,
        variance: torch.Tensor | None = None) -> torch.Tensor:
    """mergekit's ``sce_merge`` on task vectors ``deltas`` (same order of operations); ``order``
    (flat inputs) replaces the per-call variance ``topk`` by a lookup; ``variance`` (the
    deltas' own) spares computing it again."""
    if not deltas:
        return base
    mask_dtype = torch.int8 if int8_mask else base.dtype
    vectors = torch.stack(list(deltas), dim=0)
    if select_topk < 1:
        if order is None:
            mask = sce_mask(vectors, select_topk, mask_dtype, variance)
        else:
            k = keep_count(order.nonzero, select_topk)
            mask = (order.position < k).to(mask_dtype)
        vectors = vectors * mask.unsqueeze(0)
    sign = vectors.sign().to(mask_dtype)
    majority = (vectors.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1
    erase = sign == majority
    weights = sce_weight(vectors)
    while weights.dim() < vectors.dim():
        weights = weights.unsqueeze(-1)
    erased = weights * erase
    merged = (vectors * erased).sum(dim=0)
    return base + merged / torch.sum(erased, dim=0).clamp(min=1e-6)


def sce_native(lib: ctypes.CDLL, base: torch.Tensor, deltas: Sequence[torch.Tensor], select_topk: float,
               order: VarianceOrder | None, out: torch.Tensor) -> torch.Tensor:
    """``sce`` into ``out`` by ``sce_kernel`` (float32, CPU; ``order``: the deltas' own, needed
    when ``0 < select_topk < 1``): the same bits as mergekit's ``sce_merge``."""
    position, keep = None, int(select_topk >= 1)  # unmasked: all kept (x * 1 is x)
    if 0 < select_topk < 1:
        assert order is not None
        position, keep = order.position, keep_count(order.nonzero, select_topk)
    sums = sce_kernel.square_sums(lib, deltas, position, keep)
    if sums is not None:  # torch's CPU mean is its sum, then div_ by the count (mean_out)
        means = sums.div_(base.numel())
    else:
        mask = torch.full_like(base, float(keep > 0)) if position is None else (position < keep).to(base.dtype).reshape(base.shape)
        means = (torch.stack(list(deltas)) * mask).square().reshape(len(deltas), -1).mean(dim=1)
    weights = weights_of_means(means)
    sce_kernel.merge(lib, base, deltas, position, keep, weights.tolist(), out)
    return out


def plan(ctx: TensorContext) -> Plan:
    """The variance order is computed once per tensor (the sources only); a trial's gene,
    ``select_topk``, becomes how many entries of it are kept. float32 on the CPU: two C passes
    (``sce_kernel``: the kept squares' sums in torch's order, then the merge), else mergekit's torch
    steps (float16 / bfloat16: the variance is cached, ``topk`` runs per trial)."""
    base = ctx.base
    assert base is not None
    models = tuple(ctx.model_of(p) for p in ctx.positions)
    deltas = [ctx.delta(m) for m in models]
    select_topk = float(ctx.global_value("select_topk"))
    int8_mask = bool(ctx.global_value("int8_mask"))  # the same values either way (a mask of 0 / 1)
    masked = 0 < select_topk < 1
    lib = sce_kernel.library() if sce_kernel.supports(base, deltas, ctx.out) else None

    def order() -> VarianceOrder:
        return ctx.cached(("sce", ctx.name, models), lambda: variance_order(torch.stack(deltas, dim=0)))

    if lib is not None:
        return Plan(eager=lambda: sce_native(lib, base, deltas, select_topk,
                                             order() if masked else None, ctx.out))
    found = variance = None
    if masked and deltas:
        if ctx.dtype in HALF:
            variance = ctx.cached(("sce variance", ctx.name, models),
                                  lambda: torch.var(torch.stack(deltas, dim=0), dim=0, unbiased=False))
        else:
            found = order()

    def compute() -> torch.Tensor:
        return sce(base, deltas, select_topk=select_topk, int8_mask=int8_mask, order=found,
                   variance=variance)

    return Plan(eager=compute)
