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

from merges.errors import RecipeError
from merges.methods import sparsify
from merges.methods.fused import Delta, FusedJob, consensus_mix
from merges.methods.planning import Plan, RankKey, TensorContext
from merges.methods.registry import FAMILY

SPARSIFIERS = (None, "magnitude", "random", "magnitude_outliers", "della_magprune")
PAIRED = (None, "magnitude", "random")  # sparsifiers whose deltas only the fused pass reads (ctx.task_vector)


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
        mixed, divisor = consensus_mix(stacked, w)
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


def plan(ctx: TensorContext) -> Plan:
    """One fused pass: each delta masked by a magnitude band or key window (no sort per
    trial), weighted, optionally sign-elected, summed, normalised, scaled, added to the base.

    Where equal magnitudes straddle a cut the engine fills in mergekit's sort positions
    (``ranks``); rescaled items get their L1 factor from the engine (``rescale``).
    """
    family = ctx.spec.family
    assert family is not None
    weights = ctx.tensor_values("weight")
    densities = ctx.tensor_values("density")
    rescale = bool(ctx.global_value("rescale"))
    normalize = bool(ctx.global_value("normalize"))
    lam = float(ctx.global_value("lambda"))
    name, numel, positions = ctx.name, ctx.numel, ctx.positions
    models = [ctx.model_of(p) for p in positions]
    deltas: list[Delta] = []
    keys: list[torch.Tensor | None] = []
    windows: list[tuple[int, int]] = []
    to_rescale: list[int] = []
    pending: list[tuple[int, RankKey]] = []
    bands: list[sparsify.Band | None] = []
    kind = family.sparsification
    if kind == "magnitude" and not rescale:  # the cuts of task vectors asked for by task_vector, below
        wanted: dict[int, list[int]] = {}
        for position, model in zip(positions, models, strict=True):
            if densities[position] < 1 and ctx.rank(("descending", name, model)) is None:
                count = sparsify.magnitude_keep_count(densities[position], numel)
                wanted.setdefault(model, []).extend(sparsify.magnitude_band_positions(numel, count))
        if wanted:
            ctx.prefetch_sorted(wanted)
    for item, (position, model) in enumerate(zip(positions, models, strict=True)):
        delta: Delta | None = None  # formed after the cut's lookups: a lean engine may form it while it selects
        density = densities[position]
        # a delta the fused pass alone reads (not rescaled, no DELLA): asked for before the lookups,
        # so a lean engine that hands it out not formed selects without forming it
        vector = ctx.task_vector(model) if kind in PAIRED and not (rescale and density < 1) else None
        key, window, band = None, (0, 0), None
        if kind == "magnitude" and density < 1:
            count = sparsify.magnitude_keep_count(density, numel)
            window = (0, count)
            key = ctx.rank(("descending", name, model))
            if key is None:
                band = sparsify.magnitude_band(ctx.sorted_magnitudes(model), count)
                if band is None:  # a tie at the cut: mergekit's sort order decides
                    pending.append((item, ("descending", name, model)))
        elif kind == "magnitude_outliers" and density < 1:
            gamma = ctx.tensor_values("gamma")[position]
            window = sparsify.outlier_window(density, gamma, numel)
            key = ctx.rank(("ascending", name, model))
            if key is None:
                band = sparsify.outlier_band(ctx.sorted_magnitudes(model), *window)
                if band is None:
                    pending.append((item, ("ascending", name, model)))
        elif kind == "random" and density < 1:
            key = ctx.random_key(position, model)
            window = (0, sparsify.key_threshold(density))
        elif kind == "della_magprune" and density < 1:
            epsilon = ctx.tensor_values("epsilon")[position]
            if density <= 0:
                delta = torch.zeros_like(ctx.delta(model))
            else:
                try:
                    sparsify.check_della_bounds(density, epsilon, f"tensor {name!r}")
                except ValueError as exc:
                    raise RecipeError(str(exc)) from None
                delta = ctx.della(position, model, density, epsilon, rescale)
        masked = key is not None or band is not None or (pending and pending[-1][0] == item)
        if masked and rescale and not (kind == "magnitude" and density <= 0):
            to_rescale.append(item)
        if delta is None:
            delta = vector if vector is not None and item not in to_rescale else ctx.delta(model)
        deltas.append(delta)
        keys.append(key)
        windows.append(window)
        bands.append(band if key is None else None)
    used = [weights[p] for p in positions]
    divisor = float(torch.tensor(used, dtype=ctx.dtype).sum()) if used else 0.0
    if abs(divisor) < 1e-8:
        divisor = 1.0
    job = FusedJob(ctx.out, ctx.fused_base, deltas, used, keys=keys, windows=windows, bands=bands,
                   scales=[None] * len(deltas), consensus=family.consensus,
                   normalize=normalize, divisor=divisor, lam=lam)
    return Plan(job=job, rescale=to_rescale, ranks=pending)
