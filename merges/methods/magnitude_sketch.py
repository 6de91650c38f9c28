"""A per-tensor histogram of ``|delta|`` that narrows a magnitude cut to one small bucket.

The lean engine plan finds a TIES / breadcrumbs cut per trial without a sorted copy. Selecting
it from the whole tensor (``np.partition``) reads and reorders every entry per trial; this
sketch, built once per (tensor, source) when the engine loads, counts the entries per bucket
of the float32 bit pattern of ``|delta|``: bucket 0 holds exact zeros, bucket ``b > 0`` the
magnitudes whose top 16 bits are ``b - 1``. Non-negative floats sort like their bit patterns,
so the buckets are in value order: a cumulative sum names the bucket that holds an ascending
position, one pass over the tensor gathers that bucket's magnitudes (a small fraction), and
selection among them gives the same number the sorted tensor holds there.

Torch-free (numpy and a small C kernel), so ``search.memory`` prices it with ``sketch_bytes``.
None from ``histogram`` / ``gather_bucket``: no C compiler (the caller selects as before).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np

from merges.methods.native import EXACT_FLAGS, STREAM_STORE_C, WIDEN_BF16_C, build_library

BUCKETS = (0x7F800000 >> 16) + 2
"""Exact zero, then one bucket per top-16-bit pattern up to +inf's."""
MIN_NUMEL = 1 << 16
"""Tensors smaller than this are selected from directly (cheap); no sketch is kept for them."""
COUNT_BYTES = 4  # int32 counts (a tensor has fewer than 2**31 entries)

_C_SOURCE = STREAM_STORE_C + WIDEN_BF16_C + r"""

#define BUCKETS @BUCKETS@

static inline int64_t bucket_of(float v) {
    uint32_t bits;
    memcpy(&bits, &v, 4);
    bits &= 0x7fffffffu;
    return bits ? (int64_t)(bits >> 16) + 1 : 0;
}

/* counts[bucket] += 1 per entry (counts zeroed by the caller); returns the number of NaNs,
   which are not counted (no bucket orders them) */
int64_t magnitude_histogram(const float* values, int64_t n, int32_t* counts) {
    int64_t nan = 0;
    for (int64_t i = 0; i < n; ++i) {
        int64_t b = bucket_of(values[i]);
        if (b >= BUCKETS) { ++nan; continue; }
        counts[b] += 1;
    }
    return nan;
}

/* |values[i]| of every entry in ``bucket``, in index order; returns how many. A bucket holds a
   small share of the entries, so each stretch of GATHER_STRETCH is first tested for a member with
   a loop the compiler vectorises (no exit, no store), and only a stretch that holds one is walked
   entry by entry (the scalar loop alone, a branch and a store per entry, ran 5x slower). */
#define GATHER_STRETCH 64
typedef uint32_t __attribute__((may_alias)) float_bits_t;  /* a float's bits, read in place */

/* whether a magnitude's bits ``m`` lie in the bucket [lo, lo + span) (exact zeros apart: bucket 0
   is [0, 1), and ``nonzero`` keeps a zero out of bucket 1, whose bit range starts at 0) */
#define IN_BUCKET(m, lo, span, nonzero) ((((m) - (lo)) < (span)) & (((m) != 0) | !(nonzero)))

static inline int64_t gather_from(const float_bits_t* bits, int64_t i, int64_t end, uint32_t lo, uint32_t span,
                                  uint32_t nonzero, float* out, int64_t k) {
    for (; i < end; ++i) {
        uint32_t m = bits[i] & 0x7fffffffu;
        if (IN_BUCKET(m, lo, span, nonzero)) { memcpy(&out[k], &m, 4); ++k; }
    }
    return k;
}

/* one stretch [i, i + GATHER_STRETCH): tested at once, walked only where it holds a member */
static inline int64_t gather_stretch(const float_bits_t* bits, int64_t i, uint32_t lo, uint32_t span,
                                     uint32_t nonzero, float* out, int64_t k) {
    uint32_t any = 0;
    for (int j = 0; j < GATHER_STRETCH; ++j) any |= IN_BUCKET(bits[i + j] & 0x7fffffffu, lo, span, nonzero);
    return any ? gather_from(bits, i, i + GATHER_STRETCH, lo, span, nonzero, out, k) : k;
}

/* bucket b > 0: the nonzero magnitudes with bits in [(b - 1) << 16, b << 16); bucket 0: exact
   zeros, bits in [0, 1) (one unsigned compare each: m - lo < span) */
#define BUCKET_RANGE(bucket) \
    uint32_t nonzero = (bucket) != 0; \
    uint32_t lo = nonzero ? (uint32_t)((bucket) - 1) << 16 : 0u, span = nonzero ? 1u << 16 : 1u;

int64_t gather_bucket(const float* values, int64_t n, int64_t bucket, float* out) {
    const float_bits_t* bits = (const float_bits_t*)values;
    BUCKET_RANGE(bucket)
    int64_t k = 0, i = 0;
    for (; i + GATHER_STRETCH <= n; i += GATHER_STRETCH) k = gather_stretch(bits, i, lo, span, nonzero, out, k);
    return gather_from(bits, i, n, lo, span, nonzero, out, k);
}

static inline float same_f32(float v) { return v; }

/* delta = WIDEN(source) - WIDEN(base) (bf16_delta_gather: two bfloat16 tensors, fused.bf16_delta's
   values, both widenings exact; f32_delta_gather: torch.sub's of two float32 tensors; one float32
   subtraction either way) and, in the same pass, gather_bucket(delta, bucket): each stretch is
   formed in a local block, tested there and streamed to ``delta`` (stream_copy), so the delta is
   not read again */
#define DELTA_GATHER(NAME, T, WIDEN) \
int64_t NAME(const T* source, const T* base, float* delta, int64_t n, int64_t bucket, float* out) { \
    float block[GATHER_STRETCH]; \
    const float_bits_t* bits = (const float_bits_t*)block; \
    BUCKET_RANGE(bucket) \
    int64_t k = 0, i = 0; \
    for (; i + GATHER_STRETCH <= n; i += GATHER_STRETCH) { \
        for (int j = 0; j < GATHER_STRETCH; ++j) block[j] = WIDEN(source[i + j]) - WIDEN(base[i + j]); \
        k = gather_stretch(bits, 0, lo, span, nonzero, out, k); \
        stream_copy(delta + i, block, GATHER_STRETCH); \
    } \
    stream_fence(); \
    for (int64_t j = i; j < n; ++j) delta[j] = WIDEN(source[j]) - WIDEN(base[j]); \
    return gather_from((const float_bits_t*)delta, i, n, lo, span, nonzero, out, k); \
}
DELTA_GATHER(bf16_delta_gather, uint16_t, widen_bf16)
DELTA_GATHER(f32_delta_gather, float, same_f32)

/* DELTA_GATHER's gather with each delta formed only in the local block, not stored (a task vector
   the fused pass forms itself: fused.PairDelta), for k sources of one base in one pass (the base
   read once, not k times: these passes are bound by memory traffic): source i's magnitudes with bits in [lo[i], lo[i] + span[i]) (nonzero
   buckets only) into outs[i], their number into found[i] */
#define MAX_GATHER 32
#define PAIR_GATHER_MANY(NAME, T, WIDEN) \
void NAME(const T* const* sources, const T* base, int32_t k, int64_t n, const uint32_t* lo, \
          const uint32_t* span, float* const* outs, int64_t* found) { \
    float block[GATHER_STRETCH]; \
    const float_bits_t* bits = (const float_bits_t*)block; \
    int64_t kk[MAX_GATHER] = {0}; \
    int64_t i = 0; \
    for (; i + GATHER_STRETCH <= n; i += GATHER_STRETCH) { \
        for (int32_t s = 0; s < k; ++s) { \
            const T* source = sources[s]; \
            for (int j = 0; j < GATHER_STRETCH; ++j) block[j] = WIDEN(source[i + j]) - WIDEN(base[i + j]); \
            kk[s] = gather_stretch(bits, 0, lo[s], span[s], 1, outs[s], kk[s]); \
        } \
    } \
    int64_t m = n - i; \
    for (int32_t s = 0; s < k; ++s) { \
        const T* source = sources[s]; \
        for (int64_t j = 0; j < m; ++j) block[j] = WIDEN(source[i + j]) - WIDEN(base[i + j]); \
        found[s] = gather_from(bits, 0, m, lo[s], span[s], 1, outs[s], kk[s]); \
    } \
}
PAIR_GATHER_MANY(bf16_pair_gather_many, uint16_t, widen_bf16)
PAIR_GATHER_MANY(f32_pair_gather_many, float, same_f32)
""".replace("@BUCKETS@", str(BUCKETS))


def sketch_bytes(numel: int) -> int:
    """Bytes of one (tensor, source) sketch: 0 for a tensor below ``MIN_NUMEL``."""
    return BUCKETS * COUNT_BYTES if numel >= MIN_NUMEL else 0


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    lib = build_library("magnitude_sketch", _C_SOURCE, EXACT_FLAGS, [])
    if lib is None:
        return None
    lib.magnitude_histogram.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    lib.magnitude_histogram.restype = ctypes.c_int64
    lib.gather_bucket.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.gather_bucket.restype = ctypes.c_int64
    for name in ("bf16_delta_gather", "f32_delta_gather"):
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                       ctypes.c_int64, ctypes.c_void_p]
        getattr(lib, name).restype = ctypes.c_int64
    for name in ("bf16_pair_gather_many", "f32_pair_gather_many"):
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64,
                                       ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        getattr(lib, name).restype = None
    return lib


def histogram(values: np.ndarray) -> np.ndarray | None:
    """Counts per bucket of ``|values|`` (float32, contiguous); None without the kernel or
    when a value is NaN (then no bucket order holds)."""
    lib = _library()
    if lib is None:
        return None
    values = np.ascontiguousarray(values, dtype=np.float32)
    counts = np.zeros(BUCKETS, dtype=np.int32)
    nan = lib.magnitude_histogram(values.ctypes.data, values.size, counts.ctypes.data)
    return None if nan else counts


def gather_bucket(values: np.ndarray, bucket: int, count: int) -> np.ndarray:
    """The ``count`` magnitudes of ``values`` (float32, contiguous) in ``bucket``."""
    lib = _library()
    assert lib is not None, "gather_bucket follows a histogram, which needs the kernel"
    out = np.empty(count, dtype=np.float32)
    found = lib.gather_bucket(values.ctypes.data, values.size, bucket, out.ctypes.data)
    assert found == count, (found, count)
    return out


def delta_gather(source: np.ndarray, base: np.ndarray, delta: np.ndarray, bucket: int, count: int) -> np.ndarray:
    """``delta[:] = float32(source) - float32(base)`` into float32 ``delta`` (contiguous, same
    sizes), and in the same pass ``gather_bucket(delta, bucket, count)``, which it returns. The
    inputs: two float32 arrays (the values of torch's subtraction), or two bfloat16 tensors held
    as their 16-bit patterns (uint16 / int16 arrays; those of ``fused.bf16_delta``)."""
    lib = _library()
    assert lib is not None, "delta_gather follows a histogram, which needs the kernel"
    assert source.dtype == base.dtype and source.itemsize in (2, 4) and delta.dtype == np.float32
    assert source.dtype == np.float32 or source.itemsize == 2
    assert source.size == base.size == delta.size
    assert source.flags.c_contiguous and base.flags.c_contiguous and delta.flags.c_contiguous
    out = np.empty(count, dtype=np.float32)
    kernel = lib.f32_delta_gather if source.itemsize == 4 else lib.bf16_delta_gather
    found = kernel(source.ctypes.data, base.ctypes.data, delta.ctypes.data, delta.size, bucket, out.ctypes.data)
    assert found == count, (found, count)
    return out


def pair_gather(source: np.ndarray, base: np.ndarray, bucket: int, count: int) -> np.ndarray:
    """``delta_gather``'s result without storing the delta: the ``count`` magnitudes in nonzero
    ``bucket`` of ``float32(source) - float32(base)`` (the same inputs: float32 arrays, or bfloat16
    bit patterns); ``pair_gather_many`` for one source."""
    return pair_gather_many([source], base, [(bucket, bucket)], [count])[0]


MAX_GATHER = 32  # sources per pair_gather_many call (the C source's MAX_GATHER)


def bucket_bits(first: int, last: int) -> tuple[int, int]:
    """The magnitude bits ``[lo, lo + span)`` of the nonzero buckets ``first`` .. ``last``."""
    assert 1 <= first <= last < BUCKETS
    return (first - 1) << 16, (last - first + 1) << 16


def pair_gather_many(sources: list[np.ndarray], base: np.ndarray, buckets: list[tuple[int, int]],
                     counts: list[int]) -> list[np.ndarray]:
    """``pair_gather`` for several sources of one base in one pass (the base read once): source
    ``i``'s magnitudes in its nonzero buckets ``buckets[i]`` (first, last), ``counts[i]`` of them,
    in index order."""
    lib = _library()
    assert lib is not None, "pair_gather_many follows a histogram, which needs the kernel"
    k = len(sources)
    assert 0 < k <= MAX_GATHER and len(buckets) == len(counts) == k
    assert all(s.dtype == base.dtype and s.size == base.size and s.flags.c_contiguous for s in sources)
    assert base.flags.c_contiguous and (base.dtype == np.float32 or base.itemsize == 2)
    outs = [np.empty(count, dtype=np.float32) for count in counts]
    bounds = [bucket_bits(first, last) for first, last in buckets]
    pointers = (ctypes.c_void_p * k)(*[s.ctypes.data for s in sources])
    out_pointers = (ctypes.c_void_p * k)(*[o.ctypes.data for o in outs])
    lo = np.array([b[0] for b in bounds], dtype=np.uint32)
    span = np.array([b[1] for b in bounds], dtype=np.uint32)
    found = np.zeros(k, dtype=np.int64)
    kernel = lib.f32_pair_gather_many if base.dtype == np.float32 else lib.bf16_pair_gather_many
    kernel(pointers, base.ctypes.data, k, base.size, lo.ctypes.data, span.ctypes.data, out_pointers,
           found.ctypes.data)
    assert found.tolist() == list(counts), (found, counts)
    return outs


Gather = Callable[[int, int], np.ndarray]
"""(bucket, count) -> that bucket's ``count`` magnitudes in index order (``gather_bucket``'s result)."""


class SketchedOrder:
    """Ascending ``|values|`` as a magnitude band reads it (``numel()``, ``[i]``), from a sketch
    (``counts``, the values' ``histogram``): position ``i`` is found in its bucket's magnitudes,
    which ``gather`` gives (``gather_bucket`` of the values, or the lean engine's ``delta_gather``
    forming the delta in the same pass), by selection."""

    def __init__(self, counts: np.ndarray, gather: Gather) -> None:
        self._gather = gather
        self._counts = counts
        self._ends = np.cumsum(counts, dtype=np.int64)  # ascending positions before bucket b + 1
        self._size = int(self._ends[-1])  # every entry is counted (no NaN: histogram)
        self._gathered: dict[int, np.ndarray] = {}
        self._found: dict[int, float] = {}

    def numel(self) -> int:
        return self._size

    def missing(self, indices: Sequence[int]) -> tuple[int, int] | None:
        """The nonzero buckets (first, last) that hold ``indices`` and are not gathered yet (None:
        nothing to gather): for a caller that gathers several orders' buckets in one pass."""
        wanted = sorted({int(np.searchsorted(self._ends, i, side="right")) for i in indices
                         if 0 <= i < self._size and i not in self._found})
        wanted = [b for b in wanted if b != 0 and b not in self._gathered]
        return (wanted[0], wanted[-1]) if wanted else None

    def count(self, first: int, last: int) -> int:
        """Entries in buckets ``first`` .. ``last``."""
        return int(self._counts[first:last + 1].sum())

    def supply(self, first: int, last: int, values: np.ndarray) -> None:
        """The magnitudes of buckets ``first`` .. ``last`` (``count`` of them), gathered elsewhere."""
        if first == last:
            self._gathered[first] = values
            return
        of = (values.view(np.uint32) >> 16).astype(np.int64) + 1  # each value's bucket
        for bucket in range(first, last + 1):
            if self._counts[bucket]:
                self._gathered[bucket] = values[of == bucket]

    def __getitem__(self, index: int) -> float:
        found = self._found.get(index)
        if found is not None:
            return found
        if not 0 <= index < self._size:
            raise IndexError(index)
        bucket = int(np.searchsorted(self._ends, index, side="right"))
        if bucket == 0:
            value = 0.0
        else:
            gathered = self._gathered.get(bucket)
            if gathered is None:
                gathered = self._gather(bucket, int(self._counts[bucket]))
                self._gathered[bucket] = gathered
            offset = index - int(self._ends[bucket - 1])
            gathered.partition(offset)  # in place: the bucket's values stay the same
            value = float(gathered[offset])
        self._found[index] = value
        return value
