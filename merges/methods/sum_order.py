"""Where summing K sources in order, from zero, gives torch's ``sum(dim=0)`` bits.

mergekit sums task vectors with ``stacked.sum(dim=0)`` over a contiguous ``[K, N]`` tensor.
torch's CPU float kernel for that (SumKernel.cpp, ``vectorized_outer_sum``) adds, for each
group of 4 vectors of columns, the K rows in order into one accumulator while they fit one
level of its cascade (16 rows; a 17th is added to the 16 rows' sum, which commutes), and sums
the columns after the last whole group (``N`` mod 4 vectors) as ``row_sum`` does: four
interleaved accumulators, then added in order, which rounds differently from in order once
``K > 4``. Measured against torch in ``tests/test_sum_order.py``. A C pass that sums in order
therefore serves only tensors where that is torch's order; the others go through torch.
"""

from __future__ import annotations

IN_ORDER_MAX_SOURCES = 17
GROUP = 64  # 4 vectors of up to 16 float lanes (torch sums floats in 8 here, with AVX2 or AVX-512)


def sums_in_order(sources: int, entries: int) -> bool:
    """True when torch's dim-0 sum of ``sources`` rows of ``entries`` adds them in order."""
    return sources <= IN_ORDER_MAX_SOURCES and (sources <= 4 or entries % GROUP == 0)
