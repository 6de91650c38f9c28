"""karcher's fast path (merges.methods.karcher_kernel) and its torch fallback against mergekit's
``karcher_merge_tensors`` itself, bit for bit, on inputs that take every branch: all ``max_iter``
iterations, an early stop on ``tol``, a source skipped for coinciding with the mean, a zero tensor."""

from __future__ import annotations

import pytest
import torch
from mergekit.merge_methods.karcher import karcher_merge_tensors

from merges.methods import karcher_kernel
from merges.methods.karcher import karcher


def _inputs(case: str, n: int, dtype: torch.dtype) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(n)
    base = torch.randn(n, generator=generator) * 0.02
    sources = [base + torch.randn(n, generator=generator) * 0.002 * i for i in (1, 2, 3)]
    if case == "coinciding":  # every source the same: each theta is 0, all skipped
        sources = [base, base.clone()]
    elif case == "zero":  # a zero tensor has no direction (its unit is zero, its weight dropped)
        sources[1] = torch.zeros(n)
    return [base.to(dtype), *(s.to(dtype) for s in sources)]


@pytest.mark.parametrize("fast", [True, False], ids=["kernel", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(("case", "n", "max_iter", "tol"), [
    ("spread", 1000, 10, 1e-5),  # stops on tol in float32 (after 2), all 10 in float16 / bfloat16
    ("spread", 3000, 10, 1e-9),  # all 10 in every dtype (float32's rounding noise stays above tol)
    ("spread", 777, 2, 1e-3),
    ("coinciding", 300, 10, 1e-5),
    ("zero", 513, 4, 1e-5),
])
def test_karcher_matches_mergekit_bit_for_bit(fast: bool, dtype: torch.dtype, case: str, n: int,
                                              max_iter: int, tol: float,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    if fast and karcher_kernel.library() is None:
        pytest.skip("no C compiler: the kernel path cannot run here")
    if fast:  # chunks of 256 entries on 3 threads: the split changes no bit either
        monkeypatch.setattr(karcher_kernel, "CHUNK", 256)
        monkeypatch.setattr(karcher_kernel, "_threads", lambda: 3)
    else:
        monkeypatch.setattr(karcher_kernel, "library", lambda: None)
    tensors = _inputs(case, n, dtype)
    alphas = [1.0 / len(tensors)] * len(tensors)
    ours = karcher(tensors, alphas, max_iter=max_iter, tol=tol)
    theirs = karcher_merge_tensors(tensors, alphas, max_iter=max_iter, tol=tol)
    assert ours.dtype == theirs.dtype
    assert torch.equal(ours, theirs), (ours.double() - theirs.double()).abs().max().item()
