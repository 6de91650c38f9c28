"""Linear merge (mergekit 0.1.5 ``linear``): ``sum(w_i x_i)``, divided by ``sum(w_i)`` when normalising."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], *,
           normalize: bool = True) -> torch.Tensor:
    """Weighted sum of same-shaped tensors, accumulated in input order like mergekit."""
    first = tensors[0]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    result = torch.zeros_like(first, dtype=dtype)
    for tensor, weight in zip(tensors, weights, strict=True):
        result.addcmul_(tensor, torch.tensor(weight, dtype=dtype, device=first.device))
    if normalize:
        result.div_(torch.tensor(list(weights), dtype=dtype, device=first.device).sum())
    return result.to(first.dtype)
