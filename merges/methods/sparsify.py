"""Sparsification of task vectors, with mergekit 0.1.5's semantics (``mergekit/sparsify.py``).

Each function takes one delta (source - base) and returns the sparsified delta. The
deterministic ones (``magnitude``, ``magnitude_outliers``) reproduce mergekit tensor for
tensor, including its tie order, because they make the same ``argsort`` calls.

The random ones (DARE's ``bernoulli``, DELLA's ``della_magprune``) draw from a caller's
``torch.Generator`` instead of the global RNG, so a recipe seed fixes the mask. Their
masks are built from integer keys: each entry gets a uniform key in ``[0, 2**24)`` and
is kept when ``key < round(p * 2**24)`` (``p`` its keep probability, so the keep
probability has float32 resolution). Keys are drawn once per (seed, tensor, source);
the engine caches them, so a density change costs no new random numbers and the
masks of two densities are nested.

The helpers that return ranks and keep windows are what the engine precomputes once:
a density then maps to a window of ranks, with no sort per trial.
"""

from __future__ import annotations

import numpy as np
import torch

KEY_BITS = 24
KEY_RANGE = 1 << KEY_BITS
RESCALE_EPS = 1e-7  # mergekit's ``rescaled_masked_tensor`` tolerance


# -- ranks and keep windows (what the engine precomputes) ----------------------------


def _inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    ranks = torch.empty(order.shape, dtype=torch.int32, device=order.device)
    ranks.scatter_(-1, order, torch.arange(order.shape[-1], dtype=torch.int32, device=order.device)
                   .expand(order.shape).contiguous())
    return ranks


def _magnitudes(delta: torch.Tensor) -> torch.Tensor:
    w = delta.abs().reshape(-1)
    return w.float() if w.device.type == "cpu" else w


def descending_ranks(delta: torch.Tensor) -> torch.Tensor:
    """Position of each entry (flattened) in mergekit's ``argsort(|delta|, descending=True)``."""
    return _inverse_permutation(torch.argsort(_magnitudes(delta), descending=True))


def ascending_ranks(delta: torch.Tensor) -> torch.Tensor:
    """Position of each entry (flattened) in mergekit's ``sort(|delta|).indices`` (breadcrumbs)."""
    return _inverse_permutation(torch.sort(_magnitudes(delta), descending=False).indices)


def magnitude_keep_count(density: float, numel: int) -> int:
    """How many entries ``magnitude`` keeps (mergekit: ``max(1, int(density * numel))``)."""
    if density >= 1:
        return numel
    if density <= 0 or numel == 0:
        return 0
    return max(1, int(density * numel))


def outlier_window(density: float, gamma: float, numel: int) -> tuple[int, int]:
    """Ascending-rank window ``[lo, hi)`` that ``magnitude_outliers`` keeps."""
    if density >= 1:
        return 0, numel
    target_n = int(density * numel)
    n_top = int(gamma * numel)
    n_bot = max(0, numel - target_n - n_top)
    lo = min(n_bot, numel)
    hi = min(max(n_bot + target_n, lo), numel)  # python slicing of an index list
    return lo, hi


Band = tuple[float, float]  # keep entries with band[0] <= |delta| <= band[1]
KEEP_NONE: Band = (float("inf"), float("-inf"))


def sorted_magnitudes(delta: torch.Tensor) -> torch.Tensor:
    """``|delta|`` flattened and sorted ascending (float32, on the CPU).

    On the CPU numpy's vectorised sort does it (about 100x faster than ``torch.sort`` here);
    sorted values do not depend on the algorithm, so the result is the same either way.
    """
    magnitudes = _magnitudes(delta).float()
    if magnitudes.device.type == "cpu":
        return torch.from_numpy(np.sort(magnitudes.numpy()))
    return torch.sort(magnitudes).values.cpu()


def _tied(ascending: torch.Tensor, inside: int, outside: int) -> bool:
    """True when positions ``inside`` (kept) and ``outside`` (dropped) hold one nonzero value:
    then a value threshold cannot say which of the equal entries mergekit's sort keeps.
    Equal zeros do not matter: a zero delta adds nothing however it is masked."""
    if not 0 <= outside < ascending.numel():
        return False
    value = float(ascending[inside])
    return value != 0.0 and float(ascending[outside]) == value


def magnitude_band(ascending: torch.Tensor, keep: int) -> Band | None:
    """Band that keeps the ``keep`` largest magnitudes; None when a tie makes it ambiguous.

    ``ascending`` is ``sorted_magnitudes(delta)``.
    """
    n = ascending.numel()
    if keep <= 0:
        return KEEP_NONE
    if keep >= n:
        return (0.0, float("inf"))
    return outlier_band(ascending, n - keep, n)


def magnitude_band_positions(numel: int, keep: int) -> tuple[int, ...]:
    """The ascending positions ``magnitude_band(ascending, keep)`` reads (of ``numel``): the two
    around the cut, for an engine that finds them all before the bands are asked for."""
    if keep <= 0 or keep >= numel:
        return ()
    lo = numel - keep
    return (lo - 1, lo)


def outlier_band(ascending: torch.Tensor, lo: int, hi: int) -> Band | None:
    """Band that keeps ascending ranks ``[lo, hi)``; None when a tie makes it ambiguous."""
    n = ascending.numel()
    if hi <= lo:
        return KEEP_NONE
    if _tied(ascending, lo, lo - 1) or _tied(ascending, hi - 1, hi):
        return None
    return (float(ascending[lo]) if lo > 0 else 0.0,
            float(ascending[hi - 1]) if hi < n else float("inf"))


def random_keys(shape: torch.Size | tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Uniform int32 keys in ``[0, 2**24)``, one per entry, on the generator's device."""
    return torch.randint(0, KEY_RANGE, tuple(shape), generator=generator, dtype=torch.int32,
                         device=generator.device)


def key_threshold(probability: float) -> int:
    """Keep ``key < key_threshold(p)``: probability ``p`` at float32 resolution."""
    return int(round(min(max(probability, 0.0), 1.0) * KEY_RANGE))


# -- the sparsifiers ------------------------------------------------------------------


def l1_scale(delta: torch.Tensor, masked: torch.Tensor) -> torch.Tensor | None:
    """Factor that restores the L1 norm of ``delta`` on ``masked``; None where mergekit skips it."""
    before = delta.abs().sum()
    after = masked.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return None
    return before / after


def rescaled(delta: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    """``delta * mask``, scaled to the L1 norm of ``delta`` when ``rescale`` (mergekit's order)."""
    masked = delta * mask
    if not rescale:
        return masked
    scale = l1_scale(delta, masked)
    return masked if scale is None else masked * scale


def magnitude(delta: torch.Tensor, density: float, *, rescale: bool = False) -> torch.Tensor:
    """Keep the ``max(1, int(density * numel))`` largest ``|delta|`` (TIES)."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    keep = descending_ranks(delta) < magnitude_keep_count(density, delta.numel())
    return rescaled(delta, keep.reshape(delta.shape).to(delta.dtype), rescale)


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float, *,
                       rescale: bool = False) -> torch.Tensor:
    """Drop the ``gamma`` largest, then the smallest, keeping ``int(density * numel)`` (breadcrumbs)."""
    if density >= 1:
        return delta
    lo, hi = outlier_window(density, gamma, delta.numel())
    ranks = ascending_ranks(delta)
    keep = (ranks >= lo) & (ranks < hi)
    return rescaled(delta, keep.reshape(delta.shape).to(delta.dtype), rescale)


def bernoulli(delta: torch.Tensor, density: float, *, generator: torch.Generator,
              rescale: bool = False, keys: torch.Tensor | None = None) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` (keys drawn from ``generator``)."""
    if density >= 1:
        return delta
    if keys is None:
        keys = random_keys(delta.shape, generator)
    keep = keys.reshape(delta.shape) < key_threshold(density)
    return rescaled(delta, keep.to(delta.dtype), rescale)


def della_row_position(delta: torch.Tensor) -> torch.Tensor:
    """mergekit's DELLA rank, normalised to [0, 1] along each row (1-D tensors are one row)."""
    magnitudes = delta.abs() if delta.dim() >= 2 else delta.abs().unsqueeze(0)
    ranks = torch.argsort(magnitudes, dim=1, descending=False).argsort(dim=1).to(torch.float32) + 1
    lowest = ranks.min(dim=1, keepdim=True).values
    highest = ranks.max(dim=1, keepdim=True).values
    return ((ranks - lowest) / (highest - lowest)).clamp(0, 1).reshape(delta.shape)


def check_della_bounds(density: float, epsilon: float, where: str) -> None:
    if density < 1 and density > 0 and (density + epsilon >= 1 or density - epsilon <= 0):
        raise ValueError(f"{where}: della epsilon {epsilon} must keep density {density} +/- "
                         "epsilon inside (0, 1)")


def della_magprune(delta: torch.Tensor, density: float, epsilon: float, *,
                   generator: torch.Generator, rescale: bool = False,
                   keys: torch.Tensor | None = None,
                   row_position: torch.Tensor | None = None) -> torch.Tensor:
    """DELLA: keep probability rises linearly with the magnitude rank inside each row."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    check_della_bounds(density, epsilon, "della_magprune")
    if row_position is None:
        row_position = della_row_position(delta)
    if keys is None:
        keys = random_keys(delta.shape, generator)
    probability = (density - epsilon) + row_position * (2 * epsilon)
    keep = keys.reshape(delta.shape).to(torch.float64) < torch.round(
        probability.to(torch.float64).clamp(0, 1) * KEY_RANGE)
    return rescaled(delta, keep.to(delta.dtype), rescale)
