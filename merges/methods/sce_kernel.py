"""SCE's per-trial work in float32 as two C passes (``sce.py``), the same bits as mergekit's torch.

A trial of ``sce`` depends on its gene (``select_topk``) only through ``keep``, how many of the
entries in the cached variance order are kept (``position < keep``). Pass one sums each kept
task vector's squares (mergekit's ``mean(tvs ** 2)``) in torch's own summation order, without
writing the squares: torch's CPU float sum is a fixed cascade over vectors of W lanes
(``SumKernel.cpp``), so the same float additions in C give its bits. W is found on first use by
comparing with ``torch.sum`` (``lanes``); where no width agrees the squares go through torch
(``square_sums`` returns None). Pass two is the rest of ``sce_merge`` per entry:
the sign election over the sum, the erased weights, their weighted sum and its division, the
base added. Sums over the sources run as torch's dim-0 sum does, from zero in source order
(``sum_order``: only for tensors where that is torch's order).
Each C operation is one float32 rounding (no FMA contraction, ``native.EXACT_FLAGS``).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from functools import lru_cache

import torch

from merges.methods import karcher_kernel
from merges.methods.karcher_kernel import split
from merges.methods.native import EXACT_FLAGS, build_library
from merges.methods.sum_order import sums_in_order

MAX_SOURCES = 15  # the C arrays' size (MAXK)


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

/* torch's float32 sum of a contiguous row (SumKernel.cpp's cascade_sum, vectorized_inner_sum ->
   row_sum -> multi_row_sum), here over the kept squares (delta_j * m)^2 of each source j. The row is
   read as "ilp rows" of 4 vectors of W lanes (4 interleaved accumulators); each run of ``step`` ilp
   rows is summed from zero into level 0, then folded into levels 1..3 (a fold stops at the first
   level whose bits of the ilp-row count are not all zero). A run's level-0 sum does not depend on
   any other run, so threads compute runs (sce_run_sums) and one call folds them (sce_fold_sums). */
#define MAXW 32

static inline float kept_square(const float *d, const int32_t *position, int64_t keep, int64_t e) {
    float m = position ? (position[e] < keep ? 1.0f : 0.0f) : (keep > 0 ? 1.0f : 0.0f);
    float v = d[e] * m;
    return v * v;
}

/* runs [r0, r1) of ``step`` ilp rows (the last one may be shorter: it ends at ``rows``);
   sums[((j * runs) + r) * 4 * W + q * W + l]: source j, run r, accumulator q, lane l */
void sce_run_sums(int64_t r0, int64_t r1, int64_t step, int64_t rows, int64_t runs, int w, int k,
                  const float *const *deltas, const int32_t *position, int64_t keep, float *sums) {
    float m[4 * MAXW];
    float acc[MAXK][4 * MAXW];
    const int span = 4 * w;
    for (int64_t r = r0; r < r1; ++r) {
        int64_t first = r * step, last = first + step < rows ? first + step : rows;
        for (int j = 0; j < k; ++j) for (int i = 0; i < span; ++i) acc[j][i] = 0.0f;
        for (int64_t row = first; row < last; ++row) {
            int64_t b = row * span;
            kept(position, keep, b, span, m);
            for (int j = 0; j < k; ++j) {
                const float *d = deltas[j] + b;
                for (int i = 0; i < span; ++i) { float v = d[i] * m[i]; acc[j][i] = acc[j][i] + v * v; }
            }
        }
        for (int j = 0; j < k; ++j)
            for (int i = 0; i < span; ++i) sums[((int64_t)j * runs + r) * span + i] = acc[j][i];
    }
}

/* out[j] = torch's sum of source j's kept squares over n entries, from the run sums above
   (``full`` runs of ``step`` ilp rows, then ``runs - full`` shorter ones: 0 or 1) */
void sce_fold_sums(int64_t n, int w, int64_t step, int level_power, int64_t full, int64_t runs, int k,
                   const float *const *deltas, const int32_t *position, int64_t keep,
                   const float *sums, float *out) {
    const int span = 4 * w;
    int64_t vectors = n / w, rows = vectors / 4, mask = step - 1;
    for (int j = 0; j < k; ++j) {
        float acc[4][4 * MAXW];
        for (int lv = 0; lv < 4; ++lv) for (int i = 0; i < span; ++i) acc[lv][i] = 0.0f;
        int64_t done = 0;
        for (int64_t r = 0; r < full; ++r) {
            const float *s = sums + ((int64_t)j * runs + r) * span;
            for (int i = 0; i < span; ++i) acc[0][i] = s[i];  /* level 0 was zero: 0 + x is x */
            done += step;
            for (int lv = 1; lv < 4; ++lv) {
                for (int i = 0; i < span; ++i) { acc[lv][i] = acc[lv][i] + acc[lv - 1][i]; acc[lv - 1][i] = 0.0f; }
                if ((done & (mask << (lv * level_power))) != 0) break;
            }
        }
        if (runs > full) {
            const float *s = sums + ((int64_t)j * runs + full) * span;
            for (int i = 0; i < span; ++i) acc[0][i] = s[i];
        }
        for (int lv = 1; lv < 4; ++lv) for (int i = 0; i < span; ++i) acc[0][i] = acc[0][i] + acc[lv][i];
        /* vectors after the last whole ilp row go to accumulator 0 */
        for (int64_t v = rows * 4; v < vectors; ++v)
            for (int l = 0; l < w; ++l) acc[0][l] = acc[0][l] + kept_square(deltas[j], position, keep, v * w + l);
        for (int q = 1; q < 4; ++q) for (int l = 0; l < w; ++l) acc[0][l] = acc[0][l] + acc[0][q * w + l];
        float total = 0.0f;
        for (int64_t e = vectors * w; e < n; ++e) total = total + kept_square(deltas[j], position, keep, e);
        for (int l = 0; l < w; ++l) total = total + acc[0][l];
        out[j] = total;
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
    lib.sce_run_sums.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                 ctypes.c_int64, ctypes.c_int, ctypes.c_int, pointers, ctypes.c_void_p,
                                 ctypes.c_int64, ctypes.c_void_p]
    lib.sce_run_sums.restype = None
    lib.sce_fold_sums.argtypes = [ctypes.c_int64, ctypes.c_int, ctypes.c_int64, ctypes.c_int,
                                  ctypes.c_int64, ctypes.c_int64, ctypes.c_int, pointers, ctypes.c_void_p,
                                  ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    lib.sce_fold_sums.restype = None
    lib.sce_merge.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int, pointers, ctypes.c_void_p,
                              ctypes.c_int64, ctypes.POINTER(ctypes.c_float), ctypes.c_void_p,
                              ctypes.c_void_p]
    lib.sce_merge.restype = None
    return lib


def supports(base: torch.Tensor, deltas: Sequence[torch.Tensor], out: torch.Tensor) -> bool:
    """float32 CPU contiguous tensors whose dim-0 sums torch adds in order (``sum_order``)."""
    return (0 < len(deltas) <= MAX_SOURCES and sums_in_order(len(deltas), base.numel())
            and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
                    for t in (base, *deltas, out)))


def _sources(deltas: Sequence[torch.Tensor]) -> ctypes.Array[ctypes.c_void_p]:
    return (ctypes.c_void_p * len(deltas))(*[d.data_ptr() for d in deltas])


MIN_ENTRIES = 1 << 12  # below this the squares go through torch: cheap, and no kernel layout to match


def _level_power(rows: int) -> int:
    """torch's ``max(4, CeilLog2(rows) / 4)``: a level of the cascade holds 2^this ilp rows."""
    ceil_log2 = 1 if rows <= 2 else (rows - 1).bit_length()
    return max(4, ceil_log2 // 4)


def _sums(lib: ctypes.CDLL, lanes: int, deltas: Sequence[torch.Tensor], position: torch.Tensor | None,
          keep: int) -> torch.Tensor:
    n, k = deltas[0].numel(), len(deltas)
    rows = n // lanes // 4
    level_power = _level_power(rows)
    step = 1 << level_power
    full, runs = rows // step, -(-rows // step)
    run_sums = torch.empty(max(runs, 1) * k * 4 * lanes, dtype=torch.float32)
    pointers = _sources(deltas)
    where = None if position is None else position.data_ptr()
    split(runs, lambda first, last: lib.sce_run_sums(first, last, step, rows, runs, lanes, k, pointers, where,
                                                     keep, run_sums.data_ptr()),
          chunk=max(1, karcher_kernel.CHUNK // (step * 4 * lanes)))
    out = torch.empty(k, dtype=torch.float32)
    lib.sce_fold_sums(n, lanes, step, level_power, full, runs, k, pointers, where, keep, run_sums.data_ptr(),
                      out.data_ptr())
    return out


@lru_cache(maxsize=1)
def lanes() -> int | None:
    """The float lanes of torch's summing vectors on this machine (8 with AVX2, and here with
    AVX-512 too), found by comparing ``_sums`` with ``torch.sum(dim=1)`` on rows of several
    lengths (every fold level, odd tails) and a wide range of magnitudes; None when no width
    agrees (then the squares go through torch)."""
    lib = library()
    if lib is None:
        return None
    generator = torch.Generator().manual_seed(20261201)
    rows = []
    for n in (MIN_ENTRIES, 4097, 65_563, 300_007, 1_048_583):
        rows.append(torch.randn(2, n, generator=generator) * torch.randn(2, n, generator=generator).mul(4).exp())
    for width in (8, 16, 4, 32):
        if all(torch.equal(_sums(lib, width, list(r), None, 1), r.square().sum(dim=1)) for r in rows):
            return width
    return None


def square_sums(lib: ctypes.CDLL, deltas: Sequence[torch.Tensor], position: torch.Tensor | None,
                keep: int) -> torch.Tensor | None:
    """Each kept task vector's sum of squares, float32 ``[K]``, with the bits torch's
    ``(tvs * mask).square().reshape(K, -1).sum(dim=1)`` gives: torch's CPU reduction over
    ``K >= 2`` rows splits its threads over the rows, so each row is one serial cascade (one
    row alone would be split over threads). None where that does not hold or ``lanes`` is
    unknown: fewer than 2 task vectors, or fewer than ``MIN_ENTRIES`` entries."""
    if len(deltas) < 2 or deltas[0].numel() < MIN_ENTRIES:
        return None
    width = lanes()
    return None if width is None else _sums(lib, width, deltas, position, keep)


def merge(lib: ctypes.CDLL, base: torch.Tensor, deltas: Sequence[torch.Tensor],
          position: torch.Tensor | None, keep: int, weights: Sequence[float], out: torch.Tensor) -> None:
    """``out`` = mergekit's ``sce_merge`` of the kept task vectors with these weights."""
    pointers = _sources(deltas)
    where = None if position is None else position.data_ptr()
    values = (ctypes.c_float * len(weights))(*weights)
    split(out.numel(), lambda start, end: lib.sce_merge(start, end, len(deltas), pointers, where, keep,
                                                        values, base.data_ptr(), out.data_ptr()))
