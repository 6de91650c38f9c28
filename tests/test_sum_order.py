"""``sum_order``: where a C pass that adds K sources in order gives torch's ``sum(dim=0)``
bits (mergekit's task-vector sums), and that the kernels leave the other tensors to torch."""

from __future__ import annotations

import pytest
import torch

from merges.methods import sce_kernel
from merges.methods.fused import FusedJob, native_supports
from merges.methods.sum_order import sums_in_order


def _rows(k: int, n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)  # magnitudes over ~10 decades: orders round apart
    return torch.randn(k, n, generator=generator) * torch.randn(k, n, generator=generator).mul(3).exp()


def _in_order(rows: torch.Tensor) -> torch.Tensor:
    total = torch.zeros(rows.shape[1])
    for row in rows:
        total = total + row
    return total


@pytest.mark.parametrize(("k", "n"), [(2, 70_001), (4, 70_001), (5, 70_016), (9, 4096), (17, 4160)])
def test_in_order_where_the_rule_says_so(k: int, n: int) -> None:
    assert sums_in_order(k, n)
    rows = _rows(k, n, k)
    assert torch.equal(rows.sum(dim=0), _in_order(rows))


@pytest.mark.parametrize(("k", "n"), [(5, 70_001), (8, 4099), (18, 4096), (33, 4096)])
def test_not_in_order_where_the_rule_says_not(k: int, n: int) -> None:
    """The rule is not vacuous: there torch's bits differ from an in-order sum."""
    assert not sums_in_order(k, n)
    rows = _rows(k, n, k)
    assert not torch.equal(rows.sum(dim=0), _in_order(rows))


def test_kernels_leave_other_tensors_to_torch() -> None:
    def job(k: int, n: int, linear: bool) -> FusedJob:
        return FusedJob(out=torch.empty(n), base=torch.zeros(n), deltas=[torch.zeros(n)] * k,
                        weights=[1.0] * k, linear=linear, consensus=not linear)

    assert native_supports(job(5, 4096, False)) and native_supports(job(5, 4099, True))  # linear: addcmul_
    assert not native_supports(job(5, 4099, False)) and not native_supports(job(18, 4096, False))
    deltas = [torch.zeros(4099)] * 5
    assert sce_kernel.supports(deltas[0], deltas[:4], deltas[0])
    assert not sce_kernel.supports(deltas[0], deltas, deltas[0])
