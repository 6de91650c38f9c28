"""NearSwap (mergekit 0.1.5 ``nearswap``): take the other model's value where it is near the base.

Per entry, ``w = clamp(t / max(|base - other|, 1e-6), 0, 1)`` and the result is
``w * other + (1 - w) * base``: entries closer than ``t`` are swapped in, farther ones
move towards the other model by ``t / distance``. Computed in the arithmetic dtype on the
models themselves (mergekit's inputs), so float16 / bfloat16 results are mergekit's bit for bit.
float32 on the CPU: the same float operations per entry as one C pass (``_C_SOURCE``).
"""

from __future__ import annotations

import ctypes
from functools import lru_cache

import torch

from merges.methods.karcher_kernel import split
from merges.methods.native import EXACT_FLAGS, build_library
from merges.methods.planning import Plan, TensorContext

MIN_DISTANCE = 1e-6  # mergekit's clamp of |base - other|
CHUNK = 1 << 22  # entries per eager step: bounds the temporaries


def nearswap(t: float, base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """mergekit's formula, same order of operations."""
    distance = torch.abs(base - other)
    weight = (t / distance.clamp(min=MIN_DISTANCE)).clamp(min=0, max=1)
    return weight * other + (1 - weight) * base


# mergekit's torch steps per entry, each one float32 rounding: |a - b| (fabsf clears the sign bit as
# torch.abs does, a NaN's too: inf - inf gives mergekit's +NaN), clamp(min=1e-6) (NaN stays),
# t / x as torch's __rtruediv__ computes it (reciprocal(x) * t), clamp(0, 1), w * b + (1 - w) * a.
# EXACT_FLAGS alone: GCC 12 vectorises this loop (AVX-512 masks) without fused.py's
# -fno-trapping-math, which saved ~5% CPU time (benchmarks/nearswap_pass.py) and changed which
# NaN a NaN input yields.
_C_SOURCE = r"""
#include <math.h>
#include <stdint.h>
void nearswap(int64_t s, int64_t e, float t, const float *a, const float *b, float *out) {
    for (int64_t i = s; i < e; ++i) {
        float d = fabsf(a[i] - b[i]);
        d = d < 1e-6f ? 1e-6f : d;
        float w = (1.0f / d) * t;
        w = w < 0.0f ? 0.0f : w;
        w = w > 1.0f ? 1.0f : w;
        out[i] = w * b[i] + (1.0f - w) * a[i];
    }
}
"""


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled pass (built on first use), None without a working C compiler."""
    lib = build_library("nearswap", _C_SOURCE, EXACT_FLAGS, [])
    if lib is not None:
        lib.nearswap.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p,
                                 ctypes.c_void_p, ctypes.c_void_p]
        lib.nearswap.restype = None
    return lib


def _native(tensors: list[torch.Tensor]) -> ctypes.CDLL | None:
    if all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors):
        return library()
    return None


def plan(ctx: TensorContext) -> Plan:
    """One elementwise pass over base and the other model, chunked (elementwise: chunks give
    the same bits). The other model's own tensor, not base + delta (not always it when rounded)."""
    (position,) = ctx.positions
    model = ctx.model_of(position)
    t = float(ctx.global_value("t"))
    base, other, out = ctx.base, ctx.tensor(model), ctx.out
    assert base is not None

    lib = _native([base, other, out])
    if lib is not None:
        def native() -> torch.Tensor:
            split(out.numel(), lambda start, end: lib.nearswap(start, end, t, base.data_ptr(),
                                                               other.data_ptr(), out.data_ptr()))
            return out

        return Plan(eager=native)

    def compute() -> torch.Tensor:
        for start in range(0, out.numel(), CHUNK):
            end = start + CHUNK
            out[start:end] = nearswap(t, base[start:end], other[start:end])
        return out

    return Plan(eager=compute)
