"""SCE's per-trial work in float32 as two C passes (``sce.py``), the same bits as mergekit's torch.

A trial of ``sce`` depends on its gene (``select_topk``) only through ``keep``, how many of the
entries in the cached variance order are kept (``position < keep``). Pass one writes the kept
task vectors' squares (mergekit's ``tvs.square()``, ``[K, N]``) for torch's own ``mean(dim=1)``
(its reduction order gives the weights' bits); pass two is the rest of ``sce_merge`` per entry:
the sign election over the sum, the erased weights, their weighted sum and its division, the
base added. Sums over the sources run as torch's dim-0 sum does (from zero, in source order).
Each C operation is one float32 rounding (no FMA contraction, ``native.EXACT_FLAGS``).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from functools import lru_cache

import torch

from merges.methods.karcher_kernel import split
from merges.methods.native import EXACT_FLAGS, build_library

MAX_SOURCES = 15  # torch's dim-0 sum adds rows in order into one accumulator below 16 rows

_C_SOURCE = r"""
#include <stdint.h>
#define MAXK 15
#define BLOCK 256  /* entries per step: each loop below is elementwise over a block (vectorised) */

/* m[i] = 1 where entry b + i is kept (its position in the variance order is below keep), else 0;
   position NULL: every entry kept when keep > 0, none otherwise */
static void kept(const int32_t *position, int64_t keep, int64_t b, int n, float *m) {
    if (!position) { for (int i = 0; i < n; ++i) m[i] = keep > 0 ? 1.0f : 0.0f; return; }
    for (int i = 0; i < n; ++i) m[i] = position[b + i] < keep ? 1.0f : 0.0f;
}

/* squares[j * len + i] = (delta_j[i] * m)^2 for entries [s, e) */
void sce_squares(int64_t s, int64_t e, int64_t len, int k, const float *const *deltas,
                 const int32_t *position, int64_t keep, float *squares) {
    float m[BLOCK];
    for (int64_t b = s; b < e; b += BLOCK) {
        int n = (int)(e - b < BLOCK ? e - b : BLOCK);
        kept(position, keep, b, n, m);
        for (int j = 0; j < k; ++j) {
            const float *d = deltas[j] + b;
            float *o = squares + (int64_t)j * len + b;
            for (int i = 0; i < n; ++i) { float v = d[i] * m[i]; o[i] = v * v; }
        }
    }
}

/* out = base + sum_j v_j * (w_j * agree_j) / clamp(sum_j w_j * agree_j, 1e-6), v_j = delta_j * m,
   agree_j: sign(v_j) equals the sign elected by sum_j v_j (+ where it is >= 0) */
void sce_merge(int64_t s, int64_t e, int k, const float *const *deltas, const int32_t *position,
               int64_t keep, const float *weight, const float *base, float *out) {
    float m[BLOCK], v[MAXK][BLOCK], sum[BLOCK], mixed[BLOCK], total[BLOCK];
    for (int64_t b = s; b < e; b += BLOCK) {
        int n = (int)(e - b < BLOCK ? e - b : BLOCK);
        kept(position, keep, b, n, m);
        for (int i = 0; i < n; ++i) { sum[i] = 0.0f; mixed[i] = 0.0f; total[i] = 0.0f; }
        for (int j = 0; j < k; ++j) {
            const float *d = deltas[j] + b;
            for (int i = 0; i < n; ++i) { v[j][i] = d[i] * m[i]; sum[i] = sum[i] + v[j][i]; }
        }
        for (int j = 0; j < k; ++j) {
            float w = weight[j];
            for (int i = 0; i < n; ++i) {
                float x = v[j][i];
                int agree = sum[i] >= 0.0f ? x > 0.0f : x < 0.0f;
                float erased = w * (agree ? 1.0f : 0.0f);
                mixed[i] = mixed[i] + x * erased;
                total[i] = total[i] + erased;
            }
        }
        for (int i = 0; i < n; ++i) {
            float t = total[i] < 1e-6f ? 1e-6f : total[i];  /* clamp(min=1e-6); NaN stays NaN */
            out[b + i] = base[b + i] + mixed[i] / t;
        }
    }
}
"""


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled kernel (built on first use), None without a working C compiler."""
    lib = build_library("sce", _C_SOURCE, EXACT_FLAGS, [])
    if lib is None:
        return None
    pointers = ctypes.POINTER(ctypes.c_void_p)
    lib.sce_squares.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, pointers,
                                ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    lib.sce_squares.restype = None
    lib.sce_merge.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int, pointers, ctypes.c_void_p,
                              ctypes.c_int64, ctypes.POINTER(ctypes.c_float), ctypes.c_void_p,
                              ctypes.c_void_p]
    lib.sce_merge.restype = None
    return lib


def supports(base: torch.Tensor, deltas: Sequence[torch.Tensor], out: torch.Tensor) -> bool:
    """float32 CPU contiguous tensors, at most ``MAX_SOURCES`` task vectors."""
    return (0 < len(deltas) <= MAX_SOURCES
            and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
                    for t in (base, *deltas, out)))


def _sources(deltas: Sequence[torch.Tensor]) -> ctypes.Array[ctypes.c_void_p]:
    return (ctypes.c_void_p * len(deltas))(*[d.data_ptr() for d in deltas])


def squares(lib: ctypes.CDLL, deltas: Sequence[torch.Tensor], position: torch.Tensor | None,
            keep: int) -> torch.Tensor:
    """The kept task vectors' squares, ``[K, N]`` float32."""
    n = deltas[0].numel()
    out = torch.empty((len(deltas), n), dtype=torch.float32)
    pointers = _sources(deltas)
    where = None if position is None else position.data_ptr()
    split(n, lambda start, end: lib.sce_squares(start, end, n, len(deltas), pointers, where, keep,
                                                out.data_ptr()))
    return out


def merge(lib: ctypes.CDLL, base: torch.Tensor, deltas: Sequence[torch.Tensor],
          position: torch.Tensor | None, keep: int, weights: Sequence[float], out: torch.Tensor) -> None:
    """``out`` = mergekit's ``sce_merge`` of the kept task vectors with these weights."""
    pointers = _sources(deltas)
    where = None if position is None else position.data_ptr()
    values = (ctypes.c_float * len(weights))(*weights)
    split(out.numel(), lambda start, end: lib.sce_merge(start, end, len(deltas), pointers, where, keep,
                                                        values, base.data_ptr(), out.data_ptr()))
