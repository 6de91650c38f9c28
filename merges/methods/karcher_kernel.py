"""Karcher's two elementwise passes per iteration as one C loop each (``karcher.py``).

Each entry goes through the same float operations as mergekit's torch expressions, one
rounding into the tensor's dtype after each (torch's CPU kernels compute float16 / bfloat16
in float32 and round each result to nearest even; float32 products and sums are single IEEE
operations, built without contraction into FMAs). What torch reduces (dots, norms) stays torch's.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import torch

from merges.methods.native import EXACT_FLAGS, build_library, chunk_spans

DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_C_SOURCE = r"""
#include <stdint.h>
#include <string.h>

#define BLOCK 256  /* entries per step: each loop below is elementwise over a block (vectorised) */

static inline float from_bf16(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t to_bf16(float f) {  /* c10::BFloat16's round to nearest even */
    uint32_t u; memcpy(&u, &f, 4);
    uint16_t r = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return f != f ? (uint16_t)0x7FC0 : r;
}

#define F32_LOAD(p, i) (((const float *)(p))[i])
#define F32_ROUND(x) (x)
#define F32_STORE(p, i, x) (((float *)(p))[i] = (x))
#define F16_LOAD(p, i) ((float)((const _Float16 *)(p))[i])
#define F16_ROUND(x) ((float)(_Float16)(x))
#define F16_STORE(p, i, x) (((_Float16 *)(p))[i] = (_Float16)(x))
#define BF16_LOAD(p, i) from_bf16(((const uint16_t *)(p))[i])
#define BF16_ROUND(x) from_bf16(to_bf16(x))
#define BF16_STORE(p, i, x) (((uint16_t *)(p))[i] = to_bf16(x))

/* tangent = sum_j coef[j] * (unit[j] - dot[j] * mean), rounded per operation, in unit order;
   wide (may be NULL): the tangent in float32 as well */
#define TANGENT(T)                                                                              \
static void tangent_##T(int64_t s, int64_t e, int k, const void *const *units, const float *dot, \
                        const float *coef, const void *mean, void *tangent, float *wide) {      \
    float m[BLOCK], acc[BLOCK];                                                                 \
    for (int64_t b = s; b < e; b += BLOCK) {                                                    \
        int n = (int)(e - b < BLOCK ? e - b : BLOCK);                                          \
        for (int i = 0; i < n; ++i) { m[i] = T##_LOAD(mean, b + i); acc[i] = 0.0f; }            \
        for (int j = 0; j < k; ++j) {                                                           \
            const void *u = units[j];                                                           \
            float d = dot[j], c = coef[j];                                                      \
            for (int i = 0; i < n; ++i) {                                                       \
                float t = T##_ROUND(d * m[i]);                                                  \
                t = T##_ROUND(T##_LOAD(u, b + i) - t);                                          \
                t = T##_ROUND(c * t);                                                           \
                acc[i] = T##_ROUND(acc[i] + t);                                                 \
            }                                                                                   \
        }                                                                                       \
        for (int i = 0; i < n; ++i) T##_STORE(tangent, b + i, acc[i]);                          \
        if (wide) for (int i = 0; i < n; ++i) wide[b + i] = acc[i];                             \
    }                                                                                           \
}
/* mean = cos * mean + sin * (tangent / norm), rounded per operation; wide as above */
#define UPDATE(T)                                                                               \
static void update_##T(int64_t s, int64_t e, float c, float sn, float norm, void *mean,          \
                       const void *tangent, float *wide) {                                      \
    float m[BLOCK];                                                                             \
    for (int64_t b = s; b < e; b += BLOCK) {                                                    \
        int n = (int)(e - b < BLOCK ? e - b : BLOCK);                                          \
        for (int i = 0; i < n; ++i) {                                                           \
            float x = T##_ROUND(c * T##_LOAD(mean, b + i));                                     \
            float y = T##_ROUND(sn * T##_ROUND(T##_LOAD(tangent, b + i) / norm));               \
            m[i] = T##_ROUND(x + y);                                                            \
        }                                                                                       \
        for (int i = 0; i < n; ++i) T##_STORE(mean, b + i, m[i]);                               \
        if (wide) for (int i = 0; i < n; ++i) wide[b + i] = m[i];                               \
    }                                                                                           \
}
TANGENT(F32) TANGENT(F16) TANGENT(BF16)
UPDATE(F32) UPDATE(F16) UPDATE(BF16)

void karcher_tangent(int dtype, int64_t s, int64_t e, int k, const void *const *units, const float *dot,
                     const float *coef, const void *mean, void *tangent, float *wide) {
    if (dtype == 0) tangent_F32(s, e, k, units, dot, coef, mean, tangent, wide);
    else if (dtype == 1) tangent_F16(s, e, k, units, dot, coef, mean, tangent, wide);
    else tangent_BF16(s, e, k, units, dot, coef, mean, tangent, wide);
}

void karcher_update(int dtype, int64_t s, int64_t e, float c, float sn, float norm, void *mean,
                    const void *tangent, float *wide) {
    if (dtype == 0) update_F32(s, e, c, sn, norm, mean, tangent, wide);
    else if (dtype == 1) update_F16(s, e, c, sn, norm, mean, tangent, wide);
    else update_BF16(s, e, c, sn, norm, mean, tangent, wide);
}
"""


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled kernel (built on first use), None without a working C compiler."""
    lib = build_library("karcher", _C_SOURCE, EXACT_FLAGS, [])
    if lib is None:
        return None
    lib.karcher_tangent.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
                                    ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_float),
                                    ctypes.POINTER(ctypes.c_float), ctypes.c_void_p, ctypes.c_void_p,
                                    ctypes.c_void_p]
    lib.karcher_tangent.restype = None
    lib.karcher_update.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_float,
                                   ctypes.c_float, ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p,
                                   ctypes.c_void_p]
    lib.karcher_update.restype = None
    return lib


def supports(tensors: Sequence[torch.Tensor]) -> bool:
    return all(t.device.type == "cpu" and t.dtype in DTYPES and t.is_contiguous() for t in tensors)


CHUNK = 1 << 18  # entries per native call: a thread's share of a large tensor


def _threads() -> int:
    return torch.get_num_threads()


@lru_cache(maxsize=4)
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="karcher")


def split(n: int, run: Callable[[int, int], None], chunk: int | None = None) -> None:
    """``run(start, end)`` over [0, n) in spans of ``chunk`` (default ``CHUNK``), on torch's number
    of threads (ctypes calls release the GIL; entries are independent, so the split does not
    change a bit)."""
    spans = chunk_spans(n, CHUNK if chunk is None else chunk)
    threads = min(_threads(), len(spans))
    if threads <= 1:
        run(0, n)
    else:
        list(_pool(threads).map(lambda span: run(*span), spans))


def tangent(lib: ctypes.CDLL, units: Sequence[torch.Tensor], dots: Sequence[float], coefs: Sequence[float],
            mean: torch.Tensor, out: torch.Tensor, wide: torch.Tensor | None) -> None:
    k = len(units)
    pointers = (ctypes.c_void_p * k)(*[u.data_ptr() for u in units])
    dot_values, coef_values = (ctypes.c_float * k)(*dots), (ctypes.c_float * k)(*coefs)
    wide_pointer = None if wide is None else wide.data_ptr()
    split(mean.numel(), lambda start, end: lib.karcher_tangent(
        DTYPES[mean.dtype], start, end, k, pointers, dot_values, coef_values, mean.data_ptr(),
        out.data_ptr(), wide_pointer))


def update(lib: ctypes.CDLL, cos: float, sin: float, norm: float, mean: torch.Tensor,
           tangent_: torch.Tensor, wide: torch.Tensor | None) -> None:
    wide_pointer = None if wide is None else wide.data_ptr()
    split(mean.numel(), lambda start, end: lib.karcher_update(
        DTYPES[mean.dtype], start, end, cos, sin, norm, mean.data_ptr(), tangent_.data_ptr(),
        wide_pointer))
