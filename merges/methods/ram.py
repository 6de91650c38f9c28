"""RAM and RAM+ tensor-local (mergekit 0.1.5 ``ram``, ``ramplus_tl``): Reinforced Agent Merging.

An entry of a task vector counts when ``|delta| > epsilon``. Entries only one model
changed keep that model's value; entries several changed take their mean. ``ramplus_tl``
scales each model's unique entries by ``1 + r * clamp(shared / unique, 0, alpha)``, its
count of entries shared with others over its count of unique ones (per tensor).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

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


class Unique(NamedTuple):  # a tuple: the lean plan drops tensor statistics after each chunk
    """``ramplus_tl``'s per-tensor statistics (sources and ``epsilon`` only): the merge outside
    the entries only one model changed (``rest``: there no ``r`` / ``alpha`` enters), where each
    model's unique entries are (int32 indices), and its shared and unique counts."""

    rest: torch.Tensor
    entries: tuple[torch.Tensor, ...]
    shared_counts: torch.Tensor
    unique_counts: torch.Tensor


def unique_statistics(base: torch.Tensor, deltas: Sequence[torch.Tensor], epsilon: float) -> Unique:
    flat = torch.stack(list(deltas), dim=0).view(len(deltas), -1)
    nonzero = flat.abs() > epsilon
    del flat
    counts = nonzero.sum(dim=0, keepdim=True)
    overlap, unique = counts > 1, counts == 1
    entries = tuple(torch.nonzero(row & unique[0]).view(-1).to(torch.int32) for row in nonzero)
    shared_counts = (nonzero & overlap).sum(dim=1)
    unique_counts = (nonzero & unique).sum(dim=1)
    del nonzero, counts, overlap, unique
    # lambda 1 (r = 0): outside the unique entries each model's term is (+-0) * lambda or its
    # shared share, the same for any finite lambda > 0; the unique entries are written per trial
    rest = ram(base, deltas, epsilon=epsilon, plus=(0.0, 0.0)).reshape(-1)
    return Unique(rest, entries, shared_counts, unique_counts)


def ramplus_unique(stats: Unique, base: torch.Tensor, deltas: Sequence[torch.Tensor], epsilon: float,
                   r: float, alpha: float, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """``ramplus_tl_merge`` from ``stats``: ``rest`` with each unique entry replaced by mergekit's
    ``base + delta * lambda`` (its other terms there are zeros, which add nothing), computed in
    the result dtype as mergekit's promotion does. None where a lambda is not a finite positive
    number (``epsilon = 0`` with no unique entry): then zeros times lambda are not zeros.
    ``out``: where to write it when it has the result's dtype (else a new tensor)."""
    rho = stats.shared_counts / stats.unique_counts.clamp(min=epsilon)
    lam = 1 + r * rho.clamp(min=0, max=alpha)
    if not bool((torch.isfinite(lam) & (lam > 0)).all()):
        return None
    dtype = stats.rest.dtype
    out = stats.rest.clone() if out is None or out.dtype != dtype else out.copy_(stats.rest)
    for k, (entries, delta) in enumerate(zip(stats.entries, deltas, strict=True)):
        if entries.numel():
            index = entries.long()
            values = delta[index].to(dtype) * lam[k].to(dtype)
            out[index] = base[index].to(dtype) + values
    return out


def plan(ctx: TensorContext) -> Plan:
    """``ram`` has no gene (``epsilon`` is fixed, not searched): its merge of a tensor is computed
    once and copied per trial. ``ramplus_tl``: only its unique entries depend on ``r`` and
    ``alpha``; the rest is computed once (``unique_statistics``), those entries per trial."""
    base = ctx.base
    assert base is not None
    models = tuple(ctx.model_of(p) for p in ctx.positions)
    deltas = [ctx.delta(m) for m in models]
    epsilon = float(ctx.global_value("epsilon"))
    if not deltas:
        return Plan(eager=lambda: base)
    if ctx.spec.name != "ramplus_tl":
        return Plan(eager=lambda: ctx.cached(("ram", ctx.name, models, epsilon),
                                             lambda: ram(base, deltas, epsilon=epsilon)))
    r, alpha = float(ctx.global_value("r")), float(ctx.global_value("alpha"))

    def compute() -> torch.Tensor:
        stats = ctx.cached(("ramplus_tl", ctx.name, models, epsilon),
                           lambda: unique_statistics(base, deltas, epsilon))
        out = ramplus_unique(stats, base, deltas, epsilon, r, alpha, ctx.out)
        return ram(base, deltas, epsilon=epsilon, plus=(r, alpha)) if out is None else out

    return Plan(eager=compute)
