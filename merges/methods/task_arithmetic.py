"""The task-vector family: task_arithmetic, ties, dare_*, breadcrumbs*, della*.

mergekit 0.1.5 implements them all as ``GeneralizedTaskArithmeticMerge``: sparsify
each delta, multiply by its weight, optionally elect a sign per entry (TIES
consensus), sum, optionally normalise by the summed weights, scale by ``lambda``,
add to the base. ``combine`` is that tail; ``merge_task_vectors`` is the whole
reference path (sorts and draws per call; the engine precomputes instead).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merges.methods import sparsify
from merges.methods.registry import FAMILY

SPARSIFIERS = (None, "magnitude", "random", "magnitude_outliers", "della_magprune")


def combine(base: torch.Tensor, deltas: Sequence[torch.Tensor], weights: Sequence[float], *,
            consensus: bool, normalize: bool, lam: float) -> torch.Tensor:
    """``base + lambda * mix(weights * deltas)`` for already sparsified deltas (mergekit's tail)."""
    if not deltas:
        return base
    stacked = torch.stack([d.to(base.dtype) for d in deltas])
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    while stacked.dim() > w.dim():
        w.unsqueeze_(-1)
    stacked.mul_(w)
    if consensus:
        sign = stacked.sign()
        majority = (stacked.sum(dim=0) >= 0).to(stacked.dtype) * 2 - 1
        mask = sign == majority  # zero entries never count
        mixed = (stacked * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = stacked.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    return (base + mixed).to(base.dtype)


def sparsify_delta(delta: torch.Tensor, kind: str | None, *, density: float, rescale: bool,
                   gamma: float = 0.01, epsilon: float = 0.15,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """One delta through the family's sparsifier (reference path: sorts/draws here)."""
    if kind is None:
        return delta
    if kind == "magnitude":
        return sparsify.magnitude(delta, density, rescale=rescale)
    if kind == "magnitude_outliers":
        return sparsify.magnitude_outliers(delta, density, gamma, rescale=rescale)
    if generator is None:
        raise ValueError(f"{kind} sparsification needs a torch.Generator")
    if kind == "random":
        return sparsify.bernoulli(delta, density, generator=generator, rescale=rescale)
    if kind == "della_magprune":
        return sparsify.della_magprune(delta, density, epsilon, generator=generator,
                                       rescale=rescale)
    raise ValueError(f"unknown sparsification {kind!r}; known: {SPARSIFIERS}")


def merge_task_vectors(method: str, base: torch.Tensor, sources: Sequence[torch.Tensor], *,
                       weights: Sequence[float], densities: Sequence[float] | None = None,
                       gammas: Sequence[float] | None = None,
                       epsilons: Sequence[float] | None = None,
                       normalize: bool | None = None, rescale: bool | None = None,
                       lam: float = 1.0,
                       generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """Reference merge of one tensor by a task-vector method (defaults from mergekit's registry)."""
    family = FAMILY[method]
    n = len(sources)
    densities = densities if densities is not None else [1.0] * n
    gammas = gammas if gammas is not None else [0.01] * n
    epsilons = epsilons if epsilons is not None else [0.15] * n
    do_rescale = family.default_rescale if rescale is None else rescale
    deltas = [
        sparsify_delta(source.to(base.dtype) - base, family.sparsification, density=densities[i],
                       rescale=do_rescale, gamma=gammas[i], epsilon=epsilons[i],
                       generator=generators[i] if generators is not None else None)
        for i, source in enumerate(sources)
    ]
    return combine(base, deltas, weights, consensus=family.consensus,
                   normalize=family.default_normalize if normalize is None else normalize,
                   lam=lam)
