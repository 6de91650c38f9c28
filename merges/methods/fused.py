"""One fused pass per tensor for linear, slerp-style blends and the task-vector family.

The engine keeps the base and the deltas (source - base) resident, plus what turns a
density into a per-entry keep test without sorting: a magnitude band
``[band_lo, band_hi]`` on ``|delta|`` (TIES, breadcrumbs; looked up in sorted magnitudes)
or an int32 key per entry with a window ``[lo, hi)`` (DARE's random keys, and mergekit's
sort positions where equal magnitudes straddle a TIES cut). With that, a whole merge of
one tensor is a single elementwise pass, which this module runs either

* natively: a small C kernel (compiled once with the system C compiler into a cache
  folder, called through ctypes, which releases the GIL so a thread pool can split the
  work), CPU only; or
* eagerly: chunked torch operations, on any device (the CUDA path, and the CPU
  fallback when no C compiler is available).

Both compute what mergekit's ``GeneralizedTaskArithmeticMerge.merge_group`` and
``linear`` compute, with the same order of float operations per entry (the L1 norm of
a rescaled delta is summed in float64 natively, so it may differ by float32 rounding).

Dtypes, as mergekit 0.1.5 does them: linear mode (``linear``, ``slerp``, ``passthrough``)
accumulates in float32 (float64 for float64 tensors) whatever the tensors' dtype and
rounds once into ``out``; ``linear`` adds each term with torch's ``addcmul_``, which is a
fused multiply-add where torch's CPU kernels fuse it (``fma``; probed once, see
``addcmul_fuses``). Task-vector mode computes in the tensors' own dtype, as mergekit does.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import torch

from merges.methods.native import (
    EXACT_FLAGS,
    STREAM_STORE_C,
    WIDEN_BF16_C,
    build_library,
    chunk_spans,
)
from merges.methods.sum_order import sums_in_order

MAX_SOURCES = 32
CHUNK = 1 << 20  # elements per native call: enough to amortise the call, small enough to split


@dataclass(frozen=True)
class PairDelta:
    """A task vector the fused pass forms itself, ``float32(source) - float32(base)`` block by block
    (the lean plan's held tensors: both float32, torch.sub's values, or both bfloat16, widened
    exactly as ``bf16_delta`` does), so no pass writes it and reads it back. ``base`` is the job's
    own ``FusedJob.base``. Task-vector mode only; nothing may change its entries (``FusedJob.drops``
    masks a tied cut's dropped ones instead)."""

    source: torch.Tensor
    base: torch.Tensor

    def numel(self) -> int:
        return self.source.numel()

    def formed(self, start: int, end: int) -> torch.Tensor:
        """Entries ``[start, end)`` of the task vector, formed (float32)."""
        return self.source[start:end].float() - self.base[start:end].float()


Delta = torch.Tensor | PairDelta


def drop_mask(drop: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Entries ``[start, end)`` of a drop bitmap (``tie_order.tied_cut_drops``) as bools."""
    index = torch.arange(start, end)
    return ((drop[index // 64] >> (index % 64)) & 1).bool()


@dataclass
class FusedJob:
    """Everything one output tensor needs. Tensors are flat, contiguous, in the compute dtype
    (float32 arithmetic may take a bfloat16 ``base``: the lean plan's held base, widened exactly).

    ``linear`` mode: ``out = base_weight * base + sum_i weights[i] * (base + deltas[i])``
    (``base_weight`` None skips the first term; ``base`` None means zero), divided by
    ``divisor`` when ``normalize``.
    Task-vector mode: mask each delta (by its key window ``keys[i] in [lo, hi)``, else by
    its magnitude band ``band_lo <= |delta| <= band_hi``, else keep all), scale it, weight
    it, optionally elect signs (``consensus``), sum, normalise, multiply by ``lam``, add to
    ``base``. A delta may be a :class:`PairDelta` (task-vector mode), which ``drops`` can mask further:
    a bitmap per delta (``tie_order.tied_cut_drops``) whose set entries become +0.0 once kept.
    """

    out: torch.Tensor
    base: torch.Tensor | None
    deltas: Sequence[Delta]
    weights: Sequence[float]
    linear: bool = False
    base_weight: float | None = None
    keys: Sequence[torch.Tensor | None] = ()
    windows: Sequence[tuple[int, int]] = ()
    bands: Sequence[tuple[float, float] | None] = ()
    scales: Sequence[float | None] = ()
    consensus: bool = False
    normalize: bool = False
    divisor: float = 1.0  # without consensus: sum of weights (0 -> 1 handled by the caller)
    lam: float = 1.0
    fma: bool = False  # linear mode: add each term as torch's addcmul_ does (mergekit linear)
    drops: Sequence[torch.Tensor | None] = ()

    def key(self, i: int) -> torch.Tensor | None:
        return self.keys[i] if self.keys else None

    def window(self, i: int) -> tuple[int, int]:
        return self.windows[i] if self.windows else (0, 0)

    def band(self, i: int) -> tuple[float, float] | None:
        return self.bands[i] if self.bands else None

    def scale(self, i: int) -> float | None:
        return self.scales[i] if self.scales else None

    def drop(self, i: int) -> torch.Tensor | None:
        return self.drops[i] if self.drops else None

    def delta(self, i: int, start: int, end: int) -> torch.Tensor:
        """Delta ``i`` on ``[start, end)``, formed where it is a :class:`PairDelta`."""
        delta = self.deltas[i]
        return delta.formed(start, end) if isinstance(delta, PairDelta) else delta[start:end]

    def kept(self, i: int, start: int, end: int) -> torch.Tensor:
        """Delta ``i`` on ``[start, end)`` with dropped entries zeroed (eager)."""
        delta = self.delta(i, start, end)
        key, band, drop = self.key(i), self.band(i), self.drop(i)
        if key is not None:
            lo, hi = self.window(i)
            keys = key[start:end]
            delta = delta * ((keys >= lo) & (keys < hi)).to(delta.dtype)
        elif band is not None:
            magnitude = delta.abs()
            delta = delta * ((magnitude >= band[0]) & (magnitude <= band[1])).to(delta.dtype)
        if drop is not None:
            delta = torch.where(drop_mask(drop, start, end), torch.zeros((), dtype=delta.dtype), delta)
        return delta


# -- eager (any device) -----------------------------------------------------------------


def run_eager(job: FusedJob, chunk: int = 1 << 22) -> None:
    """Compute ``job.out`` with torch operations, ``chunk`` entries at a time."""
    n = job.out.numel()
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        job.out[start:end] = _eager_chunk(job, start, end)


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """What mergekit's linear and slerp compute in: float32, or float64 for float64 tensors."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _eager_chunk(job: FusedJob, start: int, end: int) -> torch.Tensor:
    dtype, device = job.out.dtype, job.out.device
    base = job.base[start:end].to(dtype) if job.base is not None else None  # a bf16 base: widened exactly
    if job.linear:
        # accumulate in opmath, the caller's store into ``out`` rounds once (mergekit's
        # ``result.to(first.dtype)``); half-precision inputs are widened exactly
        op = opmath_dtype(dtype)
        first = 0
        if job.base_weight is not None and base is not None:
            acc = torch.mul(base.to(op), torch.tensor(job.base_weight, dtype=op, device=device))
        elif base is None and not job.fma and job.deltas:
            # mergekit's slerp / passthrough start from the first product (keeps a -0.0)
            acc = torch.mul(job.deltas[0][start:end].to(op),
                            torch.tensor(job.weights[0], dtype=op, device=device))
            first = 1
        else:  # mergekit's linear: zeros, then addcmul_
            acc = torch.zeros(end - start, dtype=op, device=device)
        for i, delta in enumerate(job.deltas):
            if i < first:
                continue
            x = delta[start:end].to(op) if base is None else (base + delta[start:end]).to(op)
            weight = torch.tensor(job.weights[i], dtype=op, device=device)
            acc = acc.addcmul_(x, weight) if job.fma else acc + x * weight
        if job.normalize:
            acc = acc / torch.tensor(job.divisor, dtype=op, device=device)
        return acc
    weighted = []
    for i in range(len(job.deltas)):
        x = job.kept(i, start, end)
        scale = job.scale(i)
        if scale is not None:
            x = x * torch.tensor(scale, dtype=dtype, device=device)
        weighted.append(x * torch.tensor(job.weights[i], dtype=dtype, device=device))
    stacked = torch.stack(weighted)
    if job.consensus:
        w = torch.tensor(list(job.weights), dtype=dtype, device=device).unsqueeze(-1)
        mixed, divisor = consensus_mix(stacked, w)
    else:
        mixed = stacked.sum(dim=0)
        divisor = torch.tensor(job.divisor, dtype=dtype, device=device)
    if job.normalize:
        mixed = mixed / divisor
    if job.lam != 1:
        mixed = mixed * job.lam
    assert base is not None, "task-vector merges need a base"
    return base + mixed


def consensus_mix(stacked: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mergekit's TIES sign election over the weighted deltas ``stacked`` (weights ``w``, shaped to
    broadcast against it): per entry the majority sign is the sum's (0 counts as +), only deltas of
    that sign count (a zero never does). Returns their sum and their weights' sum (0 -> 1), what
    ``normalize`` divides by. The C kernel's ``consensus`` branch is the same rule."""
    majority = (stacked.sum(dim=0) >= 0).to(stacked.dtype) * 2 - 1
    mask = stacked.sign() == majority
    mixed = (stacked * mask).sum(dim=0)
    divisor = (w * mask).sum(dim=0)
    divisor[divisor == 0] = 1
    return mixed, divisor


def masked_l1_eager(job: FusedJob, i: int) -> float:
    """L1 norm of delta ``i`` after masking."""
    return float(job.kept(i, 0, job.out.numel()).abs().sum())


# -- native (CPU) ---------------------------------------------------------------------------

_C_SOURCE = STREAM_STORE_C + WIDEN_BF16_C + r"""
#include <math.h>
#define MAXK @MAXK@
#define BLOCK 512
#define LANES 16

typedef struct {
    int32_t k, linear, consensus, normalize, has_base_weight, fma;
    float lam, divisor, base_weight, _padf;
    const float *base;
    float *out;
    const float *delta[MAXK];
    const int32_t *key[MAXK];      /* key window [lo, hi) when set */
    int64_t lo[MAXK], hi[MAXK];
    int32_t has_band[MAXK];        /* else magnitude band: keep band_lo <= |delta| <= band_hi */
    float band_lo[MAXK], band_hi[MAXK];
    float scale[MAXK];
    int32_t has_scale[MAXK];
    float weight[MAXK];
    const uint16_t *base16;        /* the base as bfloat16 (widened exactly per block), if set */
    const void *src[MAXK];         /* a task vector formed here (PairDelta): its source ... */
    int32_t src16[MAXK];           /* ... as bfloat16 (with base16), else float32 (with base) */
    const uint64_t *drop[MAXK];    /* entries masked to +0.0 once kept (a tied cut's run), if set */
} job_t;

/* out = float(source) - float(base) of two bfloat16 tensors: the float32 task vector, as torch's
   cast then subtraction gives it (both widenings exact, one float32 subtraction) */
void bf16_delta(const uint16_t *source, const uint16_t *base, float *out, int64_t n) {
    float block[BLOCK];
    for (int64_t s = 0; s < n; s += BLOCK) {
        int64_t m = n - s < BLOCK ? n - s : BLOCK;
        for (int64_t j = 0; j < m; ++j) block[j] = widen_bf16(source[s + j]) - widen_bf16(base[s + j]);
        stream_copy(out + s, block, m);
    }
    stream_fence();
}

/* x = delta where kept, else 0 (for entries s .. s+n-1 of source i); a PairDelta's entries are
   formed as they are masked (torch.sub's values, or bf16_delta's). One loop per case, each entry's
   value given by VALUE (x aliases nothing, so each loop vectorises without overlap checks) */
#define MASKED(VALUE) \
    if (a->key[i]) { \
        const int32_t *key = a->key[i] + s; \
        int32_t lo = (int32_t)a->lo[i], hi = (int32_t)a->hi[i]; \
        for (int64_t j = 0; j < n; ++j) { float v = (VALUE); x[j] = ((key[j] >= lo) & (key[j] < hi)) ? v : 0.0f; } \
    } else if (a->has_band[i]) { \
        float lo = a->band_lo[i], hi = a->band_hi[i]; \
        for (int64_t j = 0; j < n; ++j) { float v = (VALUE), m = fabsf(v); x[j] = ((m >= lo) & (m <= hi)) ? v : 0.0f; } \
    } else { \
        for (int64_t j = 0; j < n; ++j) x[j] = (VALUE); \
    }
static void kept(const job_t *a, int i, int64_t s, int64_t n, float *restrict x) {
    if (!a->src[i]) {
        const float *d = a->delta[i] + s;
        MASKED(d[j])
    } else if (a->src16[i]) {
        const uint16_t *src = (const uint16_t *)a->src[i] + s, *b = a->base16 + s;
        MASKED(widen_bf16(src[j]) - widen_bf16(b[j]))
    } else {
        const float *src = (const float *)a->src[i] + s, *b = a->base + s;
        MASKED(src[j] - b[j])
    }
    const uint64_t *drop = a->drop[i];
    if (drop) {  /* a few set bits: words without one are passed over */
        for (int64_t w = s >> 6; w <= (s + n - 1) >> 6; ++w) {
            for (uint64_t m = drop[w]; m; m &= m - 1) {
                int64_t e = (w << 6) + __builtin_ctzll(m) - s;
                if (e >= 0 && e < n) x[e] = 0.0f;
            }
        }
    }
}

/* Merge entries [start, end); returns how many results are not finite. */
int64_t fused_merge(const job_t *a, int64_t start, int64_t end) {
    float wd[MAXK][BLOCK];
    float acc[BLOCK], div[BLOCK], mixed[BLOCK], wide[BLOCK];
    int64_t bad = 0;
    for (int64_t s = start; s < end; s += BLOCK) {
        int64_t n = end - s < BLOCK ? end - s : BLOCK;
        const float *b = a->base ? a->base + s : 0;
        if (a->base16) {
            for (int64_t j = 0; j < n; ++j) wide[j] = widen_bf16(a->base16[s + j]);
            b = wide;
        }
        float *o = a->out + s;
        if (a->linear) {
            int first = 0;
            if (a->has_base_weight && b) for (int64_t j = 0; j < n; ++j) acc[j] = b[j] * a->base_weight;
            else if (!b && !a->fma && a->k > 0) {  /* slerp / passthrough: the first product */
                for (int64_t j = 0; j < n; ++j) acc[j] = a->delta[0][s + j] * a->weight[0];
                first = 1;
            } else for (int64_t j = 0; j < n; ++j) acc[j] = 0.0f;
            for (int i = first; i < a->k; ++i) {
                const float *d = a->delta[i] + s;
                float w = a->weight[i];
                if (b) for (int64_t j = 0; j < n; ++j) acc[j] = acc[j] + (b[j] + d[j]) * w;
                else if (a->fma) for (int64_t j = 0; j < n; ++j) acc[j] = fmaf(d[j], w, acc[j]);
                else for (int64_t j = 0; j < n; ++j) acc[j] = acc[j] + d[j] * w;
            }
            if (a->normalize) for (int64_t j = 0; j < n; ++j) acc[j] = acc[j] / a->divisor;
            for (int64_t j = 0; j < n; ++j) bad += !isfinite(acc[j]);
            stream_copy(o, acc, n);
            continue;
        }
        for (int i = 0; i < a->k; ++i) {
            float *x = wd[i];
            float sc = a->scale[i], w = a->weight[i];
            kept(a, i, s, n, x);
            if (a->has_scale[i]) for (int64_t j = 0; j < n; ++j) x[j] = x[j] * sc;
            for (int64_t j = 0; j < n; ++j) x[j] = x[j] * w;
        }
        for (int64_t j = 0; j < n; ++j) acc[j] = wd[0][j];
        for (int i = 1; i < a->k; ++i) for (int64_t j = 0; j < n; ++j) acc[j] = acc[j] + wd[i][j];
        if (a->consensus) {
            /* acc holds the sign-election sum; the majority sign is + where it is >= 0 */
            for (int64_t j = 0; j < n; ++j) { div[j] = 0.0f; mixed[j] = 0.0f; }
            for (int i = 0; i < a->k; ++i) {
                float w = a->weight[i];
                const float *x = wd[i];
                for (int64_t j = 0; j < n; ++j) {
                    int agree = ((x[j] > 0.0f) & (acc[j] >= 0.0f)) | ((x[j] < 0.0f) & (acc[j] < 0.0f));
                    mixed[j] = mixed[j] + (agree ? x[j] : 0.0f);
                    div[j] = div[j] + (agree ? w : 0.0f);
                }
            }
            for (int64_t j = 0; j < n; ++j) { acc[j] = mixed[j]; div[j] = div[j] == 0.0f ? 1.0f : div[j]; }
        } else {
            for (int64_t j = 0; j < n; ++j) div[j] = a->divisor;
        }
        if (a->normalize) for (int64_t j = 0; j < n; ++j) acc[j] = acc[j] / div[j];
        if (a->lam != 1.0f) for (int64_t j = 0; j < n; ++j) acc[j] = acc[j] * a->lam;
        for (int64_t j = 0; j < n; ++j) { acc[j] = b[j] + acc[j]; bad += !isfinite(acc[j]); }
        stream_copy(o, acc, n);
    }
    stream_fence();
    return bad;
}

/* Sum of |delta| over the kept entries of source i in [start, end): float lanes per block,
   blocks summed in double. */
double masked_l1(const job_t *a, int32_t i, int64_t start, int64_t end) {
    float x[BLOCK];
    double total = 0.0;
    for (int64_t s = start; s < end; s += BLOCK) {
        int64_t n = end - s < BLOCK ? end - s : BLOCK;
        kept(a, i, s, n, x);
        for (int64_t j = n; j < BLOCK; ++j) x[j] = 0.0f;
        float lanes[LANES] = {0};
        for (int64_t j = 0; j < BLOCK; j += LANES)
            for (int l = 0; l < LANES; ++l) lanes[l] += fabsf(x[j + l]);
        double block = 0.0;
        for (int l = 0; l < LANES; ++l) block += lanes[l];
        total += block;
    }
    return total;
}
""".replace("@MAXK@", str(MAX_SOURCES))


class _Job(ctypes.Structure):
    _fields_ = [
        ("k", ctypes.c_int32), ("linear", ctypes.c_int32), ("consensus", ctypes.c_int32),
        ("normalize", ctypes.c_int32), ("has_base_weight", ctypes.c_int32), ("fma", ctypes.c_int32),
        ("lam", ctypes.c_float), ("divisor", ctypes.c_float), ("base_weight", ctypes.c_float),
        ("_padf", ctypes.c_float),
        ("base", ctypes.c_void_p), ("out", ctypes.c_void_p),
        ("delta", ctypes.c_void_p * MAX_SOURCES), ("key", ctypes.c_void_p * MAX_SOURCES),
        ("lo", ctypes.c_int64 * MAX_SOURCES), ("hi", ctypes.c_int64 * MAX_SOURCES),
        ("has_band", ctypes.c_int32 * MAX_SOURCES), ("band_lo", ctypes.c_float * MAX_SOURCES),
        ("band_hi", ctypes.c_float * MAX_SOURCES),
        ("scale", ctypes.c_float * MAX_SOURCES), ("has_scale", ctypes.c_int32 * MAX_SOURCES),
        ("weight", ctypes.c_float * MAX_SOURCES),
        ("base16", ctypes.c_void_p),
        ("src", ctypes.c_void_p * MAX_SOURCES), ("src16", ctypes.c_int32 * MAX_SOURCES),
        ("drop", ctypes.c_void_p * MAX_SOURCES),
    ]


# no trapping math: the sign election's selects become vector blends (no FP trap is ever
# enabled here, and IEEE results, hence the bits, stay the same)
FLAGS = [*EXACT_FLAGS, "-fno-trapping-math"]


@lru_cache(maxsize=1)
def native_library() -> ctypes.CDLL | None:
    """The compiled kernel, building it on first use; None when no C compiler works."""
    lib = build_library("fused", _C_SOURCE, FLAGS, ["-lm"])
    if lib is None:
        return None
    lib.fused_merge.argtypes = [ctypes.POINTER(_Job), ctypes.c_int64, ctypes.c_int64]
    lib.fused_merge.restype = ctypes.c_int64
    lib.masked_l1.argtypes = [ctypes.POINTER(_Job), ctypes.c_int32, ctypes.c_int64, ctypes.c_int64]
    lib.masked_l1.restype = ctypes.c_double
    lib.bf16_delta.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    lib.bf16_delta.restype = None
    return lib


def bf16_delta(lib: ctypes.CDLL, source: torch.Tensor, base: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = source.float() - base.float()`` of two flat contiguous bfloat16 CPU tensors into
    float32 ``out``, in one pass (no float32 copy of the base)."""
    assert source.dtype == base.dtype == torch.bfloat16 and out.dtype == torch.float32
    assert source.is_contiguous() and base.is_contiguous() and out.is_contiguous()
    assert source.numel() == base.numel() == out.numel()
    lib.bf16_delta(source.data_ptr(), base.data_ptr(), out.data_ptr(), out.numel())
    return out


@lru_cache(maxsize=1)
def addcmul_fuses() -> bool:
    """Whether torch's CPU ``addcmul_`` rounds once (a fused multiply-add) on this machine.

    It does where torch's vectorised kernels are built with FMA (AVX2, AVX-512, NEON);
    the native kernel must then fuse too to give mergekit's ``linear`` bit for bit.
    """
    generator = torch.Generator().manual_seed(0)
    acc, x = torch.randn(2, 4096, generator=generator)
    weight = torch.tensor(0.3)
    fused = (acc.double() + x.double() * weight.double()).float()  # exact product, one rounding
    return torch.equal(acc.clone().addcmul_(x, weight), fused)


def native_supports(job: FusedJob) -> bool:
    """Whether the C kernel runs ``job``: float32 tensors on the CPU (the base may be bfloat16)."""
    pairs = [d for d in job.deltas if isinstance(d, PairDelta)]
    tensors = [job.out, *(d for d in job.deltas if not isinstance(d, PairDelta))]
    base = job.base
    return (len(job.deltas) <= MAX_SOURCES
            and all(pair_supported(job, pair) for pair in pairs)
            and (job.linear or sums_in_order(len(job.deltas), job.out.numel()))  # linear adds in order
            and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
                    for t in tensors)
            and (base is None or (base.device.type == "cpu" and base.is_contiguous()
                                  and base.dtype in (torch.float32, torch.bfloat16)))
            and all(k is None or (k.dtype == torch.int32 and k.is_contiguous()) for k in job.keys))


def pair_supported(job: FusedJob, pair: PairDelta) -> bool:
    """Whether the C kernel forms ``pair`` in ``job``: task-vector mode, its base the job's own (as the
    kernel reads it), both contiguous on the CPU, float32 or bfloat16 alike."""
    base = job.base
    return (not job.linear and base is not None and pair.base is base
            and pair.source.dtype == base.dtype and base.dtype in (torch.float32, torch.bfloat16)
            and pair.source.device.type == "cpu" and pair.source.is_contiguous()
            and pair.source.numel() == job.out.numel())


def _to_struct(job: FusedJob) -> _Job:
    s = _Job()
    s.k = len(job.deltas)
    s.linear, s.consensus, s.normalize = int(job.linear), int(job.consensus), int(job.normalize)
    s.has_base_weight = int(job.base_weight is not None)
    s.fma = int(job.fma and addcmul_fuses())
    s.base_weight = float(job.base_weight or 0.0)
    s.lam, s.divisor = float(job.lam), float(job.divisor)
    wide = job.base is not None and job.base.dtype == torch.float32
    s.base = job.base.data_ptr() if wide else None  # type: ignore[union-attr]
    s.base16 = job.base.data_ptr() if job.base is not None and not wide else None
    s.out = job.out.data_ptr()
    for i, delta in enumerate(job.deltas):
        if isinstance(delta, PairDelta):
            s.src[i] = delta.source.data_ptr()
            s.src16[i] = int(delta.source.dtype == torch.bfloat16)
        else:
            s.delta[i] = delta.data_ptr()
        drop = job.drop(i)
        s.drop[i] = drop.data_ptr() if drop is not None else None
        key = job.key(i)
        s.key[i] = key.data_ptr() if key is not None else None
        s.lo[i], s.hi[i] = job.window(i)
        band = job.band(i)
        s.has_band[i] = int(band is not None)
        s.band_lo[i], s.band_hi[i] = band if band is not None else (0.0, 0.0)
        scale = job.scale(i)
        s.has_scale[i] = int(scale is not None)
        s.scale[i] = float(scale or 1.0)
        s.weight[i] = float(job.weights[i])
    return s


def run_native_many(lib: ctypes.CDLL, jobs: Sequence[FusedJob], pool: ThreadPoolExecutor | None
                    ) -> list[int]:
    """Run every job's chunks on ``pool``; returns the non-finite count per job."""
    structs = [_to_struct(job) for job in jobs]
    work = [(index, start, end) for index, job in enumerate(jobs)
            for start, end in chunk_spans(job.out.numel(), CHUNK)]

    def one(item: tuple[int, int, int]) -> tuple[int, int]:
        index, start, end = item
        return index, lib.fused_merge(ctypes.byref(structs[index]), start, end)

    bad = [0] * len(jobs)
    results = pool.map(one, work) if pool is not None else map(one, work)
    for index, count in results:
        bad[index] += count
    return bad


def masked_l1_many(lib: ctypes.CDLL | None, items: Sequence[tuple[FusedJob, int]],
                   pool: ThreadPoolExecutor | None) -> list[float]:
    """L1 norm of each masked delta ``(job, source index)``, natively when possible."""
    if lib is None or not all(native_supports(job) for job, _ in items):
        return [masked_l1_eager(job, i) for job, i in items]
    structs = {id(job): _to_struct(job) for job, _ in items}
    work = [(index, start, end) for index, (job, i) in enumerate(items)
            for start, end in chunk_spans(job.out.numel(), CHUNK)]

    def one(item: tuple[int, int, int]) -> tuple[int, float]:
        index, start, end = item
        job, i = items[index]
        return index, lib.masked_l1(ctypes.byref(structs[id(job)]), i, start, end)

    totals = [0.0] * len(items)
    for index, value in (pool.map(one, work) if pool is not None else map(one, work)):
        totals[index] += value
    return totals
