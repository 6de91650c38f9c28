"""Arcee Fusion (mergekit 0.1.5 ``arcee_fusion``): take the other model's value where it matters.

Importance of an entry: ``|other - base|`` times the KL divergence of the rows' softmaxes
(along the last axis). Entries at or above ``median + 1.5 * IQR`` of the importance take
the other model's value; the rest keep the base's. Quantiles are exact up to 1M entries;
above that mergekit estimates them from 1M entries drawn with replacement by
``torch.randint`` on its global generator. ``mergekit-yaml --random-seed SEED`` seeds that
generator once (``transformers.set_seed``) and merges the tensors in the order of their names
(its scheduler sorts tasks by tensor name), so each large tensor's draw is the next one
from a CPU generator seeded with SEED, in name order: the engine replays that stream
(generator states cached per seed) and matches ``mergekit-yaml --random-seed`` bit for bit;
without ``--random-seed`` mergekit's draws are unseeded.

Computed in the arithmetic dtype as mergekit does; its float mask makes the result float32
for float16 / bfloat16 inputs (``MethodSpec.float32_result``).
"""

from __future__ import annotations

from collections.abc import Mapping

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


def sample_picks(numel: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """mergekit's draw: ``QUANTILE_SAMPLE_SIZE`` indices with replacement (CPU)."""
    return torch.randint(numel, (QUANTILE_SAMPLE_SIZE,), generator=generator)


def threshold(scores: torch.Tensor, picks: torch.Tensor | None = None) -> torch.Tensor:
    """``median + 1.5 * (q3 - q1)`` by mergekit's index rule on the sorted (sampled) scores;
    ``picks``: the sample's indices, needed above ``QUANTILE_SAMPLE_SIZE`` entries."""
    flat = scores.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE_SIZE:
        if picks is None:
            raise ValueError(f"{flat.numel()} scores: more than {QUANTILE_SAMPLE_SIZE}, pass the picks")
        flat = flat[picks.to(flat.device)]
    ordered, _ = torch.sort(flat)
    q = torch.tensor([0.25, 0.5, 0.75])
    q1, median, q3 = ordered[(q.to(ordered.device) * (ordered.numel() - 1)).long()]
    return median + 1.5 * (q3 - q1)


def arcee_fusion(base: torch.Tensor, other: torch.Tensor,
                 picks: torch.Tensor | None = None) -> torch.Tensor:
    scores = importance(other, base)
    mask = (scores >= threshold(scores, picks)).float()
    return base + (other - base) * mask


def draw_states(seed: int, numels: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """Per tensor above ``QUANTILE_SAMPLE_SIZE`` entries, the state of mergekit's seeded CPU
    generator just before its draw (tensors drawn in name order)."""
    generator = torch.Generator().manual_seed(seed)
    states = {}
    for name in sorted(n for n, numel in numels.items() if numel > QUANTILE_SAMPLE_SIZE):
        states[name] = generator.get_state()
        sample_picks(numels[name], generator)  # advances the stream as mergekit's draw does
    return states


def plan(ctx: TensorContext) -> Plan:
    """No gene enters arcee_fusion: a tensor's importance scores (the sources only) are computed
    once, its threshold once per seed (the seed's draws above 1M entries), and a trial is
    mergekit's last line, ``base + (other - base) * mask``, on the resident task vector (the
    engine's ``other - base``, the same subtraction in the same dtype)."""
    (position,) = ctx.positions
    model = ctx.model_of(position)
    base = ctx.base
    assert base is not None
    shape = ctx.shape
    large = ctx.numel > QUANTILE_SAMPLE_SIZE
    state = None
    if large:
        state = ctx.cached(("arcee_fusion draws", ctx.seed), lambda: draw_states(
            ctx.seed, {name: _numel(s) for name, s in ctx.shapes.items()}))[ctx.name]

    def scores() -> torch.Tensor:
        return importance(ctx.tensor(model).view(shape), base.view(shape)).reshape(-1)

    def compute() -> torch.Tensor:
        flat = ctx.cached(("arcee_fusion importance", ctx.name, model), scores)

        def cut() -> torch.Tensor:  # the picks only now: one tensor's at a time
            picks = None if state is None else sample_picks(ctx.numel, torch.Generator().set_state(state))
            return threshold(flat, picks)

        limit = ctx.cached(("arcee_fusion threshold", ctx.name, model, ctx.seed if large else None), cut)
        return base + ctx.delta(model) * (flat >= limit).float()

    return Plan(eager=compute)


def _numel(shape: tuple[int, ...]) -> int:
    numel = 1
    for size in shape:
        numel *= size
    return numel
