"""nearswap's float32 C pass against mergekit 0.1.5's nearswap on the inputs a random family never
has: NaN (quiet, signalling, either sign), inf, signed zeros, subnormals, values whose difference
overflows, distances at the 1e-6 clamp.

Bits are compared wherever no input is NaN (the pass itself may make a NaN there: inf - inf).
Where an input is NaN the result is only checked to be NaN: which input NaN x86 returns depends on
the operand order the compiler picks, as it does inside torch. The engine refuses NaN inputs at
load and any non-finite result, so no NaN payload ever reaches a checkpoint.
"""

from __future__ import annotations

import pytest
import torch
from mergekit.merge_methods import registry as mk_registry
from mergekit.merge_methods.base import TensorGroup

from merges.methods import nearswap

_SPECIAL_BITS = [
    0x00000000, 0x80000000,  # +0.0, -0.0
    0x7F800000, 0xFF800000,  # +inf, -inf
    0x7FC00000, 0xFFC00000, 0x7FC12345,  # quiet NaNs, both signs, a payload
    0x7F800001, 0xFFA00000,  # signalling NaNs
    0x00000001, 0x80000001, 0x007FFFFF, 0x807FFFFF, 0x00800000,  # subnormals, the smallest normal
    0x7F7FFFFF, 0xFF7FFFFF,  # +-max: their difference overflows
]
_SPECIAL_VALUES = [1e-6, -1e-6, 5e-7, 1.5e-6, 1.0, -1.0, 0.02]


def _specials() -> torch.Tensor:
    raw = torch.tensor([b - (1 << 32) if b >= 1 << 31 else b for b in _SPECIAL_BITS], dtype=torch.int32)
    return torch.cat([raw.view(torch.float32), torch.tensor(_SPECIAL_VALUES)])


def _pairs() -> tuple[torch.Tensor, torch.Tensor]:
    """Every (base, other) pair of special values, between ordinary entries (so both the vector
    body and the scalar tail of the pass see them)."""
    special = _specials()
    m = special.numel()
    generator = torch.Generator().manual_seed(17)
    base = torch.randn(1003, generator=generator) * 0.02
    other = base + torch.randn(1003, generator=generator) * 0.002
    a = torch.cat([base[:500], special.repeat_interleave(m), base[500:], special])
    b = torch.cat([other[:500], special.repeat(m), other[500:], special.flip(0)])
    return a.contiguous(), b.contiguous()


@pytest.mark.parametrize("t", [0.0, 0.001, 0.5, 4.0])
def test_pass_gives_mergekits_bits_on_special_values(t: float) -> None:
    lib = nearswap.library()
    if lib is None:
        pytest.skip("no C compiler: the kernel path cannot run here")
    a, b = _pairs()
    theirs = mk_registry.get("nearswap").merge_group(TensorGroup.from_tensors([a, b], base_index=0), t=t)
    ours = torch.full_like(a, 7.0)
    lib.nearswap(0, a.numel(), t, a.data_ptr(), b.data_ptr(), ours.data_ptr())
    assert torch.equal(ours.isnan(), theirs.isnan())
    no_nan_input = ~(a.isnan() | b.isnan())
    assert torch.equal(ours.view(torch.int32)[no_nan_input], theirs.view(torch.int32)[no_nan_input])
    # the inputs reach the cases that matter: a NaN the pass makes (inf - inf), inf results
    assert bool(theirs[no_nan_input].isnan().any()) and bool(theirs[no_nan_input].isinf().any())
