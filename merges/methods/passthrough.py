"""Passthrough (mergekit 0.1.5): one input per output tensor, optionally scaled."""

from __future__ import annotations

import torch


def passthrough(tensor: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    return tensor if scale is None else tensor * scale
