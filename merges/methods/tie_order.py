"""Which of equal magnitudes at a density cut mergekit keeps, without sorting the whole tensor.

mergekit 0.1.5 masks TIES / breadcrumbs deltas by ``torch.argsort(|delta|)`` in float32
(``descending=True``; breadcrumbs: ``torch.sort`` ascending). torch's CPU sort of a float
tensor without ``stable=True`` is libstdc++'s ``std::sort`` (introsort) over (value, index)
pairs, so where equal nonzero magnitudes straddle the cut, which of them are kept is what
that algorithm's partitions leave on each side. Only the partitions that contain a cut
decide it: a range that lies wholly before or after every cut is kept or dropped whatever
its inner order. ``window_keys`` therefore replays ``std::sort`` step for step (the same
median-of-three pivots, the same unguarded Hoare partition, the same final insertion sort)
but descends only into ranges that hold a cut: expected O(n) instead of O(n log n), and
8 bytes of scratch per entry (and the keys) instead of an argsort's 16.

It is used only when it provably agrees with torch on this machine: on first use the
replay is compared with ``torch.argsort`` / ``torch.sort`` on tied test tensors, and it is
off (``None``: the caller sorts) when that check fails, no C compiler works, the introsort
depth limit would switch to heapsort inside a cut's range, or the tensor is not on the CPU.
"""

from __future__ import annotations

import ctypes
import string
from functools import lru_cache

import torch

from merges.methods.native import EXACT_FLAGS, WIDEN_BF16_C, build_library

DROPPED = 2**31 - 1  # the key of an entry outside the window: no window reaches it
BLOCKED = 3  # the C replay's fastest block loop (``blocked`` in the C source), each falling back to the CPU's best
PARTITION_BLOCK = 128  # entries per block of the partition's scans: a multiple of 8 (the vector step), <= 256 (uint8_t offsets)

_C_HEADER = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

typedef struct { float v; int32_t i; } pair_t;

/* What one entry compares as: a (value, index) pair by its value (torch's KeyValueCompDesc /
   KeyValueCompAsc on finite values); a word (below) by its bits, or ``tied`` for a flagged one,
   branch-free (no select per compare in the block scans). */
#define TIED_FLAG 0x80000000u
#define PAIR_KEY(e, tied) ((e).v)
#define WORD_KEY(e, tied) ((e) ^ (((e) ^ (tied)) & (uint32_t)-(int32_t)((e) >> 31)))
/* comp(a, b) on keys: a goes before b */
#define BEFORE(desc, a, b) ((desc) ? (a) > (b) : (a) < (b))
#define BLOCK ${BLOCK}

static int straddles(int64_t first, int64_t last, int64_t cut) { return first < cut && cut < last; }

typedef uint32_t __attribute__((may_alias)) float_bits_t;  /* a float's bits, read in place */

/* Where a replay's magnitudes come from: ``values`` itself (a formed delta; kind MAGS_VALUES), or a
   task vector not formed, source - base entry by entry (MAGS_F32: two float32 tensors, torch.sub's
   values; MAGS_BF16: two bfloat16 tensors widened exactly, fused.bf16_delta's values): the same
   float32 numbers, so the same words and the same replay, without a pass that writes the delta. */
#define MAGS_VALUES 0
#define MAGS_F32 1
#define MAGS_BF16 2
typedef struct { const void* values; const void* base; int kind; } mags_t;

/* MARK: what a dropped entry of the tied run becomes: +0.0f in ``values`` (tied_cut_apply), or its bit
   set in the bitmap ``drop`` (tied_cut_drops: a task vector not formed) */
#define MARK(values, drop, i) do { uint32_t i_ = (i); \
    if (values) values[i_] = 0.0f; else drop[i_ >> 6] |= 1ull << (i_ & 63); } while (0)

static inline uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* The words of the magnitudes [a, b) into scratch[a, b) (see tied_cut_keys: a magnitude's bits, or
   TIED_FLAG | index for one equal to ``tied``), adding the counts before and equal to ``tied`` and
   of NaNs; loops without an exit, so that they vectorise (the replay's other passes are scans) */
#define WORDS_LOOP(BITS) { \
    for (int64_t i = a; i < b; ++i) { \
        uint32_t bits = (BITS) & 0x7fffffffu; \
        nan += bits > 0x7f800000u; \
        uint32_t is_tied = bits == tied; \
        bf += desc ? bits > tied : bits < tied; \
        e += is_tied; \
        scratch[i] = is_tied ? (TIED_FLAG | (uint32_t)i) : bits; \
    } }
__attribute__((optimize("tree-vectorize")))
static void only_words(const mags_t* m, int64_t a, int64_t b, int desc, uint32_t tied, uint32_t* scratch,
                       int64_t* before, int64_t* equal, int64_t* nans) {
    int64_t bf = 0, e = 0, nan = 0;
    if (m->kind == MAGS_F32) {
        const float* s = (const float*)m->values; const float* z = (const float*)m->base;
        WORDS_LOOP(f32_bits(s[i] - z[i]))
    } else if (m->kind == MAGS_BF16) {
        const uint16_t* s = (const uint16_t*)m->values; const uint16_t* z = (const uint16_t*)m->base;
        WORDS_LOOP(f32_bits(widen_bf16(s[i]) - widen_bf16(z[i])))
    } else {
        const float_bits_t* v = (const float_bits_t*)m->values;
        WORDS_LOOP(v[i])
    }
    *before += bf; *equal += e; *nans += nan;
}

/* The first partition of a word replay forms the words as its scans reach them (``lazy``), instead
   of after a pass of its own that writes them all: one write and one read of every word less. The
   words formed are always [first, ls) and [rs, last) (the scanned stretches) and the median of
   three's entries; a stretch formed later keeps those (they may have been swapped already). */
typedef struct {
    mags_t mags;                 /* the magnitudes the words are formed from */
    int64_t early[3];            /* formed before the median of three: first + 1, mid, last - 1 */
    int64_t before, equal, nans; /* only_words' counts, of every entry once */
    int desc;
    uint32_t tied;
} lazy_t;

static void lazy_form(lazy_t* lz, uint32_t* x, int64_t a, int64_t b) {
    if (!lz || a >= b) return;
    uint32_t kept[3];
    for (int j = 0; j < 3; ++j) if (lz->early[j] >= a && lz->early[j] < b) kept[j] = x[lz->early[j]];
    if (lz->desc) only_words(&lz->mags, a, b, 1, lz->tied, x, &lz->before, &lz->equal, &lz->nans);
    else only_words(&lz->mags, a, b, 0, lz->tied, x, &lz->before, &lz->equal, &lz->nans);
    for (int j = 0; j < 3; ++j) if (lz->early[j] >= a && lz->early[j] < b) x[lz->early[j]] = kept[j];
}

/* the words the median of three reads, before it: ``first`` counted now (no stretch holds it),
   the three others when their stretch is formed */
static void lazy_early(lazy_t* lz, uint32_t* x, int64_t first, int64_t mid, int64_t last) {
    if (!lz) return;
    lz->early[0] = first + 1; lz->early[1] = mid; lz->early[2] = last - 1;
    int64_t uncounted = 0;
    for (int j = 0; j < 3; ++j) only_words(&lz->mags, lz->early[j], lz->early[j] + 1, lz->desc, lz->tied, x,
                                           &uncounted, &uncounted, &uncounted);
    only_words(&lz->mags, first, first + 1, lz->desc, lz->tied, x, &lz->before, &lz->equal, &lz->nans);
}

/* ``blocked``: 0 Hoare's scalar loop alone (the reference), 1 blocks scanned one entry at a time,
   2 the words' blocks scanned 8 entries at a time with AVX2 where the CPU has it (else as 1),
   3 the words' blocks scanned and swapped 16 at a time with AVX-512 (below; else as 2) */
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define VECTOR_SCANS 1
/* the offsets of a byte mask's set bits, packed from the low byte up */
static const uint64_t MASK_OFFSETS[256] = { ${MASK_OFFSETS} };

/* a block's left stoppers (not before the pivot) among x[0, BLOCK), as the scalar scan finds them:
   a word's key is its bits or, flagged (the sign bit), ``tied``, so a blend on the sign bit forms
   it; keys are below 2^31, so the signed compares order them as the unsigned ones do.
   Each step stores 8 offsets at off + n and keeps popcount of them; n <= j, so within the block. */
__attribute__((target("avx2,popcnt")))
static int word_scan_left_avx2(const uint32_t* x, uint32_t pivot, uint32_t t, int desc, uint8_t* off) {
    const __m256 p = _mm256_castsi256_ps(_mm256_set1_epi32((int32_t)pivot));
    const __m256 tv = _mm256_castsi256_ps(_mm256_set1_epi32((int32_t)t));
    int n = 0;
    for (int j = 0; j < BLOCK; j += 8) {
        __m256 v = _mm256_loadu_ps((const float*)(x + j));
        __m256i k = _mm256_castps_si256(_mm256_blendv_ps(v, tv, v));
        __m256i before = desc ? _mm256_cmpgt_epi32(k, _mm256_castps_si256(p)) : _mm256_cmpgt_epi32(_mm256_castps_si256(p), k);
        unsigned m = ~(unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(before)) & 0xffu;
        uint64_t o = MASK_OFFSETS[m] + 0x0101010101010101ull * (uint64_t)j;
        memcpy(off + n, &o, 8);
        n += __builtin_popcount(m);
    }
    return n;
}

/* the right stoppers (not after the pivot) among x[0], x[-1], ..., x[1 - BLOCK], offset j for x[-j] */
__attribute__((target("avx2,popcnt")))
static int word_scan_right_avx2(const uint32_t* x, uint32_t pivot, uint32_t t, int desc, uint8_t* off) {
    const __m256 p = _mm256_castsi256_ps(_mm256_set1_epi32((int32_t)pivot));
    const __m256 tv = _mm256_castsi256_ps(_mm256_set1_epi32((int32_t)t));
    const __m256i reverse = _mm256_setr_epi32(7, 6, 5, 4, 3, 2, 1, 0);
    int n = 0;
    for (int j = 0; j < BLOCK; j += 8) {
        __m256 v = _mm256_permutevar8x32_ps(_mm256_loadu_ps((const float*)(x - j - 7)), reverse);
        __m256i k = _mm256_castps_si256(_mm256_blendv_ps(v, tv, v));
        __m256i after = desc ? _mm256_cmpgt_epi32(_mm256_castps_si256(p), k) : _mm256_cmpgt_epi32(k, _mm256_castps_si256(p));
        unsigned m = ~(unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(after)) & 0xffu;
        uint64_t o = MASK_OFFSETS[m] + 0x0101010101010101ull * (uint64_t)j;
        memcpy(off + n, &o, 8);
        n += __builtin_popcount(m);
    }
    return n;
}
/* 16 magnitudes' float32 bits (sign included) from entry i on, as only_words forms them */
__attribute__((target("avx512f,avx512dq,bmi2,popcnt")))
static inline __attribute__((always_inline)) __m512i mags16(const mags_t* m, int64_t i) {
    if (m->kind == MAGS_F32)
        return _mm512_castps_si512(_mm512_sub_ps(_mm512_loadu_ps((const float*)m->values + i),
                                                 _mm512_loadu_ps((const float*)m->base + i)));
    if (m->kind == MAGS_BF16) {
        __m512i s = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)((const uint16_t*)m->values + i))), 16);
        __m512i z = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)((const uint16_t*)m->base + i))), 16);
        return _mm512_castps_si512(_mm512_sub_ps(_mm512_castsi512_ps(s), _mm512_castsi512_ps(z)));
    }
    return _mm512_loadu_si512((const uint32_t*)m->values + i);
}
/* ``blocked`` 3: the words' block loop with AVX-512 (where the CPU has it, else as 2). A scan keeps
   each block's stoppers as a bit mask and their words compressed in scan order, so the k-th left
   and k-th right stopper are paired by rank: the m pairs of a step are written by expanding the
   other side's compressed words into the stoppers' lanes, 16 entries at a time, instead of m
   scalar swaps (the same swaps, hence the same partition). */
__attribute__((target("avx512f,avx512dq,bmi2,popcnt")))
static inline __attribute__((always_inline)) int word_scan512(
        uint32_t* x, int right, __m512i pivot, __m512i tv, const int desc, uint16_t* mask, int* count,
        uint32_t* words, const int form, lazy_t* lz, int64_t index) {
    const __m512i reverse = _mm512_setr_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    int n = 0;
    int64_t before = 0, equal = 0, nans = 0;
    for (int s = 0; s < BLOCK / 16; ++s) {
        /* the chunk's entries in memory order: x[16s, 16s + 16) left, x[-16s - 15, -16s] right */
        int64_t at = right ? -16 * s - 15 : 16 * s;
        __m512i v, k;
        if (form) {  /* the words formed here from the magnitudes (only_words, 16 at a time) */
            __m512i bits = _mm512_and_si512(mags16(&lz->mags, index + at), _mm512_set1_epi32(0x7fffffff));
            __mmask16 tied = _mm512_cmpeq_epi32_mask(bits, tv);
            nans += __builtin_popcount(_mm512_cmpgt_epu32_mask(bits, _mm512_set1_epi32(0x7f800000)));
            before += __builtin_popcount(desc ? _mm512_cmpgt_epu32_mask(bits, tv) : _mm512_cmplt_epu32_mask(bits, tv));
            equal += __builtin_popcount(tied);
            __m512i flagged = _mm512_or_si512(_mm512_add_epi32(iota, _mm512_set1_epi32((int32_t)(index + at))),
                                              _mm512_set1_epi32((int32_t)TIED_FLAG));
            v = _mm512_mask_blend_epi32(tied, bits, flagged);
            _mm512_storeu_si512(x + at, v);
            k = bits;  /* a tied word's key is ``tied``, its bits */
        } else {
            v = _mm512_loadu_si512(x + at);
            k = _mm512_mask_blend_epi32(_mm512_movepi32_mask(v), v, tv);
        }
        if (right) {  /* scan order: lane j at x[-16s - j] */
            v = _mm512_permutexvar_epi32(reverse, v);
            k = _mm512_permutexvar_epi32(reverse, k);
        }
        /* a stopper: not before the pivot (left), not after it (right) */
        __mmask16 stop = (desc != right) ? _mm512_cmp_epi32_mask(k, pivot, _MM_CMPINT_LE)
                                         : _mm512_cmp_epi32_mask(k, pivot, _MM_CMPINT_NLT);
        _mm512_storeu_si512(words + n, _mm512_maskz_compress_epi32(stop, v));
        mask[s] = stop;
        count[s] = n;
        n += __builtin_popcount(stop);
    }
    if (form) { lz->before += before; lz->equal += equal; lz->nans += nans; }
    count[BLOCK / 16] = n;
    return n;
}

/* whether a lazy replay still has to form [a, b) around the median of three's early words */
static int lazy_plain(const lazy_t* lz, int64_t a, int64_t b) {
    for (int j = 0; j < 3; ++j) if (lz->early[j] >= a && lz->early[j] < b) return 0;
    return 1;
}

/* the lanes of stoppers of ranks [from, to) written with words[0, to - from) in rank order */
__attribute__((target("avx512f,avx512dq,bmi2,popcnt")))
static inline __attribute__((always_inline)) void word_fill512(
        uint32_t* x, int right, const uint16_t* mask, const int* count, int from, int to, const uint32_t* words) {
    const __m512i reverse = _mm512_setr_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (int s = 0; s < BLOCK / 16; ++s) {
        int c = count[s], e = count[s + 1];
        if (e <= from) continue;
        if (c >= to) break;
        int a = from > c ? from - c : 0, b = (to < e ? to : e) - c;  /* ranks [a, b) within the chunk */
        __mmask16 sel = (__mmask16)_pdep_u32(((1u << b) - 1) & ~((1u << a) - 1), mask[s]);
        __m512i w = _mm512_loadu_si512(words + (c + a - from));
        uint32_t* at = right ? x - 16 * s - 15 : x + 16 * s;
        __m512i v = _mm512_loadu_si512(at);
        if (right) v = _mm512_permutexvar_epi32(reverse, v);
        v = _mm512_mask_expand_epi32(v, sel, w);
        if (right) v = _mm512_permutexvar_epi32(reverse, v);
        _mm512_storeu_si512(at, v);
    }
}

/* the offset (in scan order) of the stopper of rank r */
__attribute__((target("avx512f,avx512dq,bmi2,popcnt")))
static inline __attribute__((always_inline)) int64_t word_offset512(const uint16_t* mask, const int* count, int r) {
    int s = 0;
    while (count[s + 1] <= r) ++s;
    return 16 * s + __builtin_ctz(_pdep_u32(1u << (r - count[s]), mask[s]));
}

/* word_partition_impl's block loop (its ``blocked`` branch) with the scans and swaps above; the
   same state after it: ls, rs scanned, lo, hi Hoare's after the last swap */
__attribute__((target("avx512f,avx512dq,bmi2,popcnt")))
static inline __attribute__((always_inline)) void word_blocks512_impl(
        uint32_t* x, uint32_t pivot_key, uint32_t t, const int desc, lazy_t* lz,
        int64_t* ls_, int64_t* rs_, int64_t* lo_, int64_t* hi_) {
    const __m512i pivot = _mm512_set1_epi32((int32_t)pivot_key), tv = _mm512_set1_epi32((int32_t)t);
    int64_t ls = *ls_, rs = *rs_, lo = *lo_, hi = *hi_;
    int64_t bl = 0, br = 0;
    int nl = 0, nr = 0, sl = 0, sr = 0;
    uint16_t maskl[BLOCK / 16], maskr[BLOCK / 16];
    int countl[BLOCK / 16 + 1], countr[BLOCK / 16 + 1];
    uint32_t wordsl[BLOCK + 16], wordsr[BLOCK + 16];  /* 16 of slack: a chunk is stored and read whole */
    for (;;) {
        if (sl == nl) {
            if (rs - ls < BLOCK) break;
            bl = ls; sl = 0;
            if (lz && lazy_plain(lz, bl, bl + BLOCK)) {
                nl = word_scan512(x + bl, 0, pivot, tv, desc, maskl, countl, wordsl, 1, lz, bl);
            } else {
                lazy_form(lz, x, bl, bl + BLOCK);
                nl = word_scan512(x + bl, 0, pivot, tv, desc, maskl, countl, wordsl, 0, 0, 0);
            }
            ls += BLOCK;
        }
        if (sr == nr) {
            if (rs - ls < BLOCK) break;
            br = rs - 1; sr = 0;
            if (lz && lazy_plain(lz, br - BLOCK + 1, br + 1)) {
                nr = word_scan512(x + br, 1, pivot, tv, desc, maskr, countr, wordsr, 1, lz, br);
            } else {
                lazy_form(lz, x, br - BLOCK + 1, br + 1);
                nr = word_scan512(x + br, 1, pivot, tv, desc, maskr, countr, wordsr, 0, 0, 0);
            }
            rs -= BLOCK;
        }
        int m = nl - sl < nr - sr ? nl - sl : nr - sr;
        if (m) {
            word_fill512(x + bl, 0, maskl, countl, sl, sl + m, wordsr + sr);
            word_fill512(x + br, 1, maskr, countr, sr, sr + m, wordsl + sl);
            lo = bl + word_offset512(maskl, countl, sl + m - 1) + 1;
            hi = br - word_offset512(maskr, countr, sr + m - 1);
        }
        sl += m; sr += m;
    }
    *ls_ = ls; *rs_ = rs; *lo_ = lo; *hi_ = hi;
}

__attribute__((target("avx512f,avx512dq,bmi2,popcnt")))
static void word_blocks512(uint32_t* x, uint32_t pivot, uint32_t t, int desc, lazy_t* lz,
                           int64_t* ls, int64_t* rs, int64_t* lo, int64_t* hi) {
    if (desc) word_blocks512_impl(x, pivot, t, 1, lz, ls, rs, lo, hi);
    else word_blocks512_impl(x, pivot, t, 0, lz, ls, rs, lo, hi);
}

/* tied_cut_apply's last step with AVX-512: each flagged word of scratch[p, n) marks its entry,
   found 16 words at a time by their sign bits (about one stretch of 64 in three holds none here, so
   walking each stretch that holds one entry by entry cost the most); returns where it stopped (the
   rest, under 16 words, as before) */
__attribute__((target("avx512f,avx512dq")))
static int64_t mark_flagged512(float* values, uint64_t* drop, const uint32_t* scratch, int64_t p, int64_t n) {
    for (; p + 16 <= n; p += 16) {
        uint32_t m = _mm512_movepi32_mask(_mm512_loadu_si512(scratch + p));
        for (; m; m &= m - 1) MARK(values, drop, scratch[p + __builtin_ctz(m)] & ~TIED_FLAG);
    }
    return p;
}

static int has_avx512(void) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("bmi2");
}
#endif
"""

# The replay over one element type: ${P} prefixes its names, ${T} is the element, ${K} what it
# compares as, ${KEY} the macro that reads it (one body for pairs and words, instantiated twice).
_C_REPLAY = r"""
static inline void ${P}swap(${T}* x, int64_t a, int64_t b) { ${T} s = x[a]; x[a] = x[b]; x[b] = s; }

static void ${P}median_to_first(${T}* x, int64_t r, int64_t a, int64_t b, int64_t c, int desc, uint32_t t) {
    ${K} ka = ${KEY}(x[a], t), kb = ${KEY}(x[b], t), kc = ${KEY}(x[c], t);
    if (BEFORE(desc, ka, kb)) {
        if (BEFORE(desc, kb, kc)) ${P}swap(x, r, b);
        else if (BEFORE(desc, ka, kc)) ${P}swap(x, r, c);
        else ${P}swap(x, r, a);
    } else if (BEFORE(desc, ka, kc)) ${P}swap(x, r, a);
    else if (BEFORE(desc, kb, kc)) ${P}swap(x, r, c);
    else ${P}swap(x, r, b);
}

/* the offsets j of the entries x[j], j in [0, BLOCK), that stop Hoare's left scan (not before
   the pivot), ascending, without a branch per entry; their count */
static inline __attribute__((always_inline)) int ${P}scan_left(const ${T}* x, ${K} pivot, uint32_t t, const int desc,
                                                               int blocked, uint8_t* off) {
    ${VECTOR_LEFT}
    int n = 0;
    for (int j = 0; j < BLOCK; ++j) { off[n] = (uint8_t)j; n += !BEFORE(desc, ${KEY}(x[j], t), pivot); }
    return n;
}

/* likewise the entries x[-j] that stop the right scan (not after the pivot) */
static inline __attribute__((always_inline)) int ${P}scan_right(const ${T}* x, ${K} pivot, uint32_t t, const int desc,
                                                                int blocked, uint8_t* off) {
    ${VECTOR_RIGHT}
    int n = 0;
    for (int j = 0; j < BLOCK; ++j) { off[n] = (uint8_t)j; n += !BEFORE(desc, pivot, ${KEY}(x[-j], t)); }
    return n;
}

/* std::__unguarded_partition_pivot on [first, last) (more than 16 entries), the same swaps in
   the same places. Hoare pairs the k-th entry that stops its left scan (not before the pivot)
   with the k-th that stops its right scan (not after it) for as long as the first lies left of
   the second; while the two scanned stretches do not meet, every left stopper lies left of every
   right stopper, so the stoppers are found a block at a time without a branch per entry
   (BlockQuicksort, Edelkamp & Weiss) and swapped in pairs. Where less than a block is left
   between the stretches, Hoare's own loop resumes from its state after the last swap (which it
   scans again where buffered stoppers were not paired); that swap's pair are its sentinels, or
   the median-of-three's two others when none happened. ``blocked`` 0: Hoare's loop alone (the
   reference the tests hold the blocks to). */
static inline __attribute__((always_inline)) int64_t ${P}partition_impl(
        ${T}* x, int64_t first, int64_t last, const int desc, uint32_t t, int blocked, lazy_t* lz) {
    int64_t mid = first + (last - first) / 2;
    ${LAZY_EARLY}
    ${P}median_to_first(x, first, first + 1, mid, last - 1, desc, t);
    const ${K} pivot = ${KEY}(x[first], t);
    int64_t lo = first + 1, hi = last;  /* Hoare's state after the last swap */
    int64_t ls = lo, rs = hi;  /* scanned: [first + 1, ls) from the left, [rs, last) from the right */
    ${VECTOR_BLOCKS}
    if (blocked) {
        int64_t bl = 0, br = 0;    /* the buffered stoppers: bl + offl[sl..nl), br - offr[sr..nr) */
        int nl = 0, nr = 0, sl = 0, sr = 0;
        uint8_t offl[BLOCK], offr[BLOCK];
        for (;;) {
            if (sl == nl) {
                if (rs - ls < BLOCK) break;
                bl = ls; sl = 0;
                ${LAZY_FORM_LEFT}
                nl = ${P}scan_left(x + bl, pivot, t, desc, blocked, offl);
                ls += BLOCK;
            }
            if (sr == nr) {
                if (rs - ls < BLOCK) break;
                br = rs - 1; sr = 0;
                ${LAZY_FORM_RIGHT}
                nr = ${P}scan_right(x + br, pivot, t, desc, blocked, offr);
                rs -= BLOCK;
            }
            int m = nl - sl < nr - sr ? nl - sl : nr - sr;
            for (int k = 0; k < m; ++k) ${P}swap(x, bl + offl[sl + k], br - offr[sr + k]);
            if (m) { lo = bl + offl[sl + m - 1] + 1; hi = br - offr[sr + m - 1]; }
            sl += m; sr += m;
        }
    }
    ${LAZY_FORM_REST}
    for (;;) {
        while (BEFORE(desc, ${KEY}(x[lo], t), pivot)) ++lo;
        --hi;
        while (BEFORE(desc, pivot, ${KEY}(x[hi], t))) --hi;
        if (!(lo < hi)) return lo;
        ${P}swap(x, lo, hi);
        ++lo;
    }
}

/* the direction a constant in each copy (the scans' compares then need no select) */
static int64_t ${P}partition_pivot(${T}* x, int64_t first, int64_t last, int desc, uint32_t t, int blocked) {
    return desc ? ${P}partition_impl(x, first, last, 1, t, blocked, 0) : ${P}partition_impl(x, first, last, 0, t, blocked, 0);
}

/* the final insertion sort's effect on one range of at most 16 (stable) */
static void ${P}insertion_sort(${T}* x, int64_t first, int64_t last, int desc, uint32_t t) {
    for (int64_t i = first + 1; i < last; ++i) {
        ${T} v = x[i];
        ${K} kv = ${KEY}(v, t);
        int64_t j = i;
        while (j > first && BEFORE(desc, kv, ${KEY}(x[j - 1], t))) { x[j] = x[j - 1]; --j; }
        x[j] = v;
    }
}

/* std::__introsort_loop on [first, last), descending only into ranges that hold a cut;
   -1 where std::sort would switch to heapsort there (not replayed) */
static int ${P}select_range(${T}* x, int64_t first, int64_t last, int depth, int desc, int64_t lo, int64_t hi,
                            uint32_t t, int blocked) {
    while (last - first > 16) {
        if (!straddles(first, last, lo) && !straddles(first, last, hi)) return 0;
        if (depth == 0) return -1;
        --depth;
        int64_t cut = ${P}partition_pivot(x, first, last, desc, t, blocked);
        if (${P}select_range(x, cut, last, depth, desc, lo, hi, t, blocked)) return -1;
        last = cut;
    }
    if (straddles(first, last, lo) || straddles(first, last, hi)) ${P}insertion_sort(x, first, last, desc, t);
    return 0;
}

/* 2 * floor(log2(n)): std::sort's depth limit (std::__lg) */
static int ${P}depth_limit(int64_t n) {
    int depth = 0;
    for (int64_t m = n; m > 1; m >>= 1) depth += 2;
    return depth;
}

/* one partition of x[0, n) (n > 16), for the tests: the returned cut and x as it leaves */
int64_t ${P}partition_once(${T}* x, int64_t n, int32_t desc, uint32_t t, int32_t blocked) {
    return ${P}partition_pivot(x, 0, n, desc, t, blocked);
}
"""

_C_ENTRY_POINTS = r"""
/* keys[i] = lo where |values[i]| ends in sorted positions [lo, hi), else 2^31 - 1; 0 on success */
int64_t window_keys(const float* values, int64_t n, int64_t lo, int64_t hi, int32_t desc,
                    int32_t* keys, pair_t* scratch, int32_t blocked) {
    for (int64_t i = 0; i < n; ++i) { scratch[i].v = fabsf(values[i]); scratch[i].i = (int32_t)i; }
    if (n > 1 && pair_select_range(scratch, 0, n, pair_depth_limit(n), desc, lo, hi, 0, blocked)) return -1;
    for (int64_t p = 0; p < n; ++p) keys[scratch[p].i] = (p >= lo && p < hi) ? (int32_t)lo : 2147483647;
    return 0;
}

/* The same replay for a window [0, keep) whose cut lies inside one run of equal magnitudes
   (bit pattern ``tied``): only those entries need their index, so each entry is one 32-bit
   word, the magnitude's bits, or TIED_FLAG | index for a tied one (which compares as ``tied``).
   Half the memory traffic of (value, index) pairs, and the same comparisons, hence the same
   partitions.
   keys[i] = 0 where |values[i]| ends in sorted positions [0, keep), else 2^31 - 1; 0 on success,
   -1 where the replay stops (heapsort), -2 when the cut does not lie inside that run or a value
   is NaN */
/* the words and the untied entries' keys, with the counts before and equal to ``tied`` and of
   NaNs; a loop without an exit, so that it vectorises (the replay's other passes are scans) */
__attribute__((optimize("tree-vectorize")))
static void words_of(const float_bits_t* values, int64_t n, int desc, uint32_t tied, int32_t* keys,
                     uint32_t* scratch, int64_t* before, int64_t* equal, int64_t* nans) {
    int64_t b = 0, e = 0, nan = 0;
    for (int64_t i = 0; i < n; ++i) {
        uint32_t bits = values[i] & 0x7fffffffu;
        nan += bits > 0x7f800000u;
        uint32_t is_tied = bits == tied;
        uint32_t is_before = desc ? bits > tied : bits < tied;
        scratch[i] = is_tied ? (TIED_FLAG | (uint32_t)i) : bits;
        keys[i] = is_before ? 0 : 2147483647;
        b += is_before;
        e += is_tied;
    }
    *before = b; *equal = e; *nans = nan;
}

int64_t tied_cut_keys(const float* values, int64_t n, int64_t keep, int32_t desc, uint32_t tied,
                      int32_t* keys, uint32_t* scratch, int32_t blocked) {
    int64_t before, equal, nans;
    if (desc) words_of((const float_bits_t*)values, n, 1, tied, keys, scratch, &before, &equal, &nans);
    else words_of((const float_bits_t*)values, n, 0, tied, keys, scratch, &before, &equal, &nans);
    if (nans) return -2;  /* NaN: not ordered like a bit pattern */
    if (!(before < keep && keep < before + equal)) return -2;
    if (n > 1 && word_select_range(scratch, 0, n, word_depth_limit(n), desc, 0, keep, tied, blocked)) return -1;
    for (int64_t p = 0; p < keep; ++p)
        if (scratch[p] & TIED_FLAG) keys[scratch[p] & ~TIED_FLAG] = 0;
    return 0;
}

/* the first partition of the word replay on [0, n) (n > 16), forming the words from ``lz->values``
   as it goes (lazy_t) */
static int64_t word_partition_first(uint32_t* x, int64_t n, int desc, uint32_t t, int blocked, lazy_t* lz) {
    return desc ? word_partition_impl(x, 0, n, 1, t, blocked, lz) : word_partition_impl(x, 0, n, 0, t, blocked, lz);
}

/* The same replay, its selection left in ``scratch``: each word of [keep, n) that is flagged is an
   entry of the tied run that ``tied_cut_keys`` would drop. The first partition forms the words (no
   pass of its own); introsort's loop then goes on from it as word_select_range would (the right part
   first, one depth level spent). 0 on success, -1 / -2 as for tied_cut_keys. */
static int64_t tied_cut_select(const mags_t* mags, int64_t n, int64_t keep, int32_t desc, uint32_t tied,
                               uint32_t* scratch, int32_t blocked) {
    int64_t before = 0, equal = 0, nans = 0;
    if (n > 16 && blocked) {
        lazy_t lz = {*mags, {0, 0, 0}, 0, 0, 0, desc, tied};
        int64_t cut = word_partition_first(scratch, n, desc, tied, blocked, &lz);
        if (lz.nans) return -2;  /* NaN: not ordered like a bit pattern */
        if (!(lz.before < keep && keep < lz.before + lz.equal)) return -2;
        int depth = word_depth_limit(n) - 1;  /* > 0: n > 16 */
        if (word_select_range(scratch, cut, n, depth, desc, 0, keep, tied, blocked)) return -1;
        if (word_select_range(scratch, 0, cut, depth, desc, 0, keep, tied, blocked)) return -1;
    } else {
        if (desc) only_words(mags, 0, n, 1, tied, scratch, &before, &equal, &nans);
        else only_words(mags, 0, n, 0, tied, scratch, &before, &equal, &nans);
        if (nans) return -2;
        if (!(before < keep && keep < before + equal)) return -2;
        if (n > 1 && word_select_range(scratch, 0, n, word_depth_limit(n), desc, 0, keep, tied, blocked)) return -1;
    }
    return 0;
}

/* each entry of the tied run past the cut marked (MARK); they are a small share of [keep, n), so
   stretches without one are passed over by a test that vectorises */
static void mark_dropped(float* values, uint64_t* drop, const uint32_t* scratch, int64_t keep, int64_t n,
                         int32_t blocked) {
    int64_t p = keep;
#ifdef VECTOR_SCANS
    if (blocked == 3 && has_avx512()) p = mark_flagged512(values, drop, scratch, p, n);
#endif
    for (; p + 64 <= n; p += 64) {
        uint32_t any = 0;
        for (int j = 0; j < 64; ++j) any |= scratch[p + j] & TIED_FLAG;
        if (any) for (int j = 0; j < 64; ++j)
            if (scratch[p + j] & TIED_FLAG) MARK(values, drop, scratch[p + j] & ~TIED_FLAG);
    }
    for (; p < n; ++p)
        if (scratch[p] & TIED_FLAG) MARK(values, drop, scratch[p] & ~TIED_FLAG);
}

/* The replay's result applied to ``values`` in place instead of written as keys: each entry of the
   tied run that ``tied_cut_keys`` would drop becomes +0.0f (what the fused kernel's mask gives a
   dropped entry); the entries past the run (below it descending, above it ascending) are left as
   they are, for the caller's magnitude band (tie_order.applied_band) to drop, so no int32 key per
   entry is stored and no pass writes them. ``values`` is changed only on success (0). */
int64_t tied_cut_apply(float* values, int64_t n, int64_t keep, int32_t desc, uint32_t tied,
                       uint32_t* scratch, int32_t blocked) {
    mags_t mags = {values, 0, MAGS_VALUES};
    int64_t status = tied_cut_select(&mags, n, keep, desc, tied, scratch, blocked);
    if (status == 0) mark_dropped(values, 0, scratch, keep, n, blocked);
    return status;
}

/* The same for a task vector not formed (``source - base``, kind MAGS_F32 or MAGS_BF16): the
   entries it would zero get their bit set in ``drop`` (n bits, zeroed by the caller), which the
   fused kernel reads as a mask. ``drop`` is changed only on success (0). */
int64_t tied_cut_drops(const void* source, const void* base, int32_t kind, int64_t n, int64_t keep, int32_t desc,
                       uint32_t tied, uint32_t* scratch, int32_t blocked, uint64_t* drop) {
    mags_t mags = {source, base, kind};
    int64_t status = tied_cut_select(&mags, n, keep, desc, tied, scratch, blocked);
    if (status == 0) mark_dropped(0, drop, scratch, keep, n, blocked);
    return status;
}
"""

_MASK_OFFSETS = ", ".join(
    hex(sum(j << (8 * rank) for rank, j in enumerate(b for b in range(8) if mask >> b & 1))) + "ull"
    for mask in range(256))
_VECTOR_SCAN = ("\n#ifdef VECTOR_SCANS\n    if (blocked >= 2 && __builtin_cpu_supports(\"avx2\")) "
                "return word_scan_{side}_avx2(x, pivot, t, desc, off);\n#endif")
# the word replay's first partition may form its words as it scans (lazy_t; lz 0 elsewhere)
_LAZY = {"LAZY_EARLY": "lazy_early(lz, x, first, mid, last);",
         "LAZY_FORM_LEFT": "lazy_form(lz, x, bl, bl + BLOCK);",
         "LAZY_FORM_RIGHT": "lazy_form(lz, x, br - BLOCK + 1, br + 1);",
         "LAZY_FORM_REST": "lazy_form(lz, x, ls, rs);"}
_NO_LAZY = dict.fromkeys(_LAZY, "")
# the words' block loop with AVX-512 (``blocked`` 3), Hoare's loop resuming after it as after the blocks
_VECTOR_BLOCKS = ("\n#ifdef VECTOR_SCANS\n    if (blocked == 3 && has_avx512()) {\n"
                  "        word_blocks512(x, pivot, t, desc, lz, &ls, &rs, &lo, &hi);\n        blocked = 0;\n    }\n#endif")
_C_SOURCE = (WIDEN_BF16_C + string.Template(_C_HEADER).substitute(BLOCK=PARTITION_BLOCK, MASK_OFFSETS=_MASK_OFFSETS)
             + string.Template(_C_REPLAY).substitute(P="pair_", T="pair_t", K="float", KEY="PAIR_KEY",
                                                     VECTOR_LEFT="", VECTOR_RIGHT="", VECTOR_BLOCKS="", **_NO_LAZY)
             + string.Template(_C_REPLAY).substitute(P="word_", T="uint32_t", K="uint32_t", KEY="WORD_KEY",
                                                     VECTOR_LEFT=_VECTOR_SCAN.format(side="left"),
                                                     VECTOR_RIGHT=_VECTOR_SCAN.format(side="right"),
                                                     VECTOR_BLOCKS=_VECTOR_BLOCKS, **_LAZY)
             + _C_ENTRY_POINTS)


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    # comparisons and moves only (fabsf apart, exact), so vectorised for this CPU changes no result: at
    # -O3 -march=native the words are formed with its widest vectors and the block scans unrolled
    lib = build_library("tie_order", _C_SOURCE, EXACT_FLAGS, ["-lm"])
    if lib is None:
        return None
    lib.window_keys.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32]
    lib.window_keys.restype = ctypes.c_int64
    lib.tied_cut_keys.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int32,
                                  ctypes.c_uint32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32]
    lib.tied_cut_keys.restype = ctypes.c_int64
    lib.tied_cut_apply.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int32,
                                   ctypes.c_uint32, ctypes.c_void_p, ctypes.c_int32]
    lib.tied_cut_apply.restype = ctypes.c_int64
    lib.tied_cut_drops.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_int64,
                                   ctypes.c_int32, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p]
    lib.tied_cut_drops.restype = ctypes.c_int64
    for name in ("pair_partition_once", "word_partition_once"):
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_uint32,
                                       ctypes.c_int32]
        getattr(lib, name).restype = ctypes.c_int64
    return lib


def _replay(lib: ctypes.CDLL, magnitudes: torch.Tensor, lo: int, hi: int,
            descending: bool, blocked: bool = True) -> torch.Tensor | None:
    n = magnitudes.numel()
    keys = torch.empty(n, dtype=torch.int32)
    scratch = torch.empty(2 * n, dtype=torch.int32)  # (float, int32) pairs
    status = lib.window_keys(magnitudes.data_ptr(), n, lo, hi, int(descending), keys.data_ptr(),
                             scratch.data_ptr(), BLOCKED if blocked else 0)
    return keys if status == 0 else None


def _word_scratch(n: int, scratch: torch.Tensor | None) -> torch.Tensor:
    """The word replay's scratch: one int32 word per entry, ``scratch``'s first ``n`` where given."""
    scratch = torch.empty(n, dtype=torch.int32) if scratch is None else scratch[:n]
    assert scratch.dtype == torch.int32 and scratch.is_contiguous()
    return scratch


def _magnitude_bits(tied: float) -> int:
    """The float32 bit pattern of ``|tied|``, as the C replay compares magnitudes."""
    return int(torch.tensor([abs(tied)], dtype=torch.float32).view(torch.int32)[0]) & 0x7FFFFFFF


def _replay_tied(lib: ctypes.CDLL, magnitudes: torch.Tensor, keep: int, tied: float,
                 descending: bool, keys: torch.Tensor | None = None,
                 scratch: torch.Tensor | None = None, blocked: bool = True) -> torch.Tensor | None:
    n = magnitudes.numel()
    keys = torch.empty(n, dtype=torch.int32) if keys is None else keys[:n]
    scratch = _word_scratch(n, scratch)
    assert keys.dtype == torch.int32 and keys.is_contiguous()
    bits = _magnitude_bits(tied)
    status = lib.tied_cut_keys(magnitudes.data_ptr(), n, keep, int(descending), bits, keys.data_ptr(),
                               scratch.data_ptr(), BLOCKED if blocked else 0)
    return keys if status == 0 else None


def _sorted_positions(magnitudes: torch.Tensor, descending: bool) -> torch.Tensor:
    """Where each entry lands in torch's sort, as mergekit sorts (the reference)."""
    if descending:
        order = torch.argsort(magnitudes, descending=True)
    else:
        order = torch.sort(magnitudes, descending=False).indices
    positions = torch.empty_like(order)
    positions[order] = torch.arange(order.numel())
    return positions


@lru_cache(maxsize=1)
def _agrees_with_torch() -> bool:
    """True when the replay reproduces this torch's sort on tied tensors of several sizes."""
    lib = _library()
    if lib is None:
        return False
    generator = torch.Generator().manual_seed(20261130)
    for n, distinct in ((17, 3), (100, 4), (1000, 7), (5000, 2), (40_000, 50), (40_000, 1000)):
        values = torch.randint(0, distinct, (n,), generator=generator).float().mul_(0.25)
        for descending in (True, False):
            positions = _sorted_positions(values, descending)
            for lo, hi in ((0, n // 3), (n // 5, n - n // 7), (0, 1), (n - 1, n)):
                keys = _replay(lib, values, lo, hi, descending)
                if keys is None:
                    return False
                inside = (positions >= lo) & (positions < hi)
                if not torch.equal(keys != DROPPED, inside):
                    return False
            for keep in (n // 3, n // 2, n - n // 7):  # the one-run replay, where the cut is tied
                ordered = torch.sort(values, descending=descending).values
                if float(ordered[keep - 1]) != float(ordered[keep]):
                    continue
                keys = _replay_tied(lib, values, keep, float(ordered[keep]), descending)
                if keys is None or not torch.equal(keys != DROPPED, positions < keep):
                    return False
    return True


def window_keys(delta: torch.Tensor, lo: int, hi: int, *, descending: bool, blocked: bool = True
                ) -> torch.Tensor | None:
    """int32 keys of ``delta``'s entries (flat): ``lo`` for each entry whose position in
    mergekit's sort of ``|delta|`` (float32; ``descending`` for TIES, ascending for
    breadcrumbs) lies in ``[lo, hi)``, ``DROPPED`` for the others, so ``lo <= key < hi``
    keeps exactly mergekit's entries. None when the replay cannot be used (module docstring).
    ``blocked`` False: the partitions by Hoare's scalar loop alone (the same keys, slower: the
    reference for tests and benchmarks)."""
    if delta.device.type != "cpu" or delta.numel() >= DROPPED or not _agrees_with_torch():
        return None
    lib = _library()
    assert lib is not None
    # float32 as mergekit sorts; the replay takes |.| itself (no copy of a float32 delta)
    return _replay(lib, delta.reshape(-1).float().contiguous(), lo, hi, descending, blocked)


def tied_cut_keys(delta: torch.Tensor, keep: int, tied: float, *, descending: bool,
                  keys: torch.Tensor | None = None, scratch: torch.Tensor | None = None,
                  blocked: bool = True) -> torch.Tensor | None:
    """``window_keys(delta, 0, keep, descending=...)`` where the cut lies inside the run of
    magnitudes equal to ``tied`` (the value at sorted positions ``keep - 1`` and ``keep``):
    the same keys (0 kept, ``DROPPED`` not) from a replay that carries only the tied entries'
    indices (4 bytes of scratch per entry, not 8). None when the replay cannot be used, or
    ``tied`` is not the value at that cut. ``keys`` (the result) and ``scratch``: int32 buffers
    of at least ``delta.numel()`` entries to reuse instead of allocating; ``blocked`` as for
    ``window_keys``."""
    if delta.device.type != "cpu" or delta.numel() >= DROPPED or not _agrees_with_torch():
        return None
    lib = _library()
    assert lib is not None
    return _replay_tied(lib, delta.reshape(-1).float().contiguous(), keep, tied, descending, keys, scratch,
                        blocked)


def applied_band(tied: float, *, descending: bool) -> tuple[float, float]:
    """The magnitude band (``FusedJob.bands``, inclusive) that completes ``tied_cut_apply``'s
    selection: the tied run's entries and those before it (``|delta| >= tied`` descending,
    ``<= tied`` ascending); the run's dropped entries are +0.0 by then, which is what a masked
    entry contributes (band or not)."""
    tied = abs(tied)
    return (tied, float("inf")) if descending else (0.0, tied)


def tied_cut_apply(delta: torch.Tensor, keep: int, tied: float, *, descending: bool,
                   scratch: torch.Tensor | None = None, blocked: bool = True) -> bool:
    """``tied_cut_keys``'s selection applied to ``delta`` (flat, contiguous float32, CPU) in
    place for the tied run: each of its entries that selection drops set to +0.0, as the fused
    kernel masks a dropped entry; the entries past the run stay as they are, for the band
    ``applied_band(tied, ...)`` to drop (no key per entry, and no pass that writes them). False,
    and ``delta`` unchanged, where that replay cannot be used."""
    if (delta.device.type != "cpu" or delta.dtype != torch.float32 or not delta.is_contiguous()
            or delta.numel() >= DROPPED or not _agrees_with_torch()):
        return False
    lib = _library()
    assert lib is not None
    n = delta.numel()
    scratch = _word_scratch(n, scratch)
    bits = _magnitude_bits(tied)
    return lib.tied_cut_apply(delta.data_ptr(), n, keep, int(descending), bits, scratch.data_ptr(),
                              BLOCKED if blocked else 0) == 0


MAGS_KINDS = {torch.float32: 1, torch.bfloat16: 2}  # the C source's MAGS_F32, MAGS_BF16


def drop_words(numel: int) -> int:
    """64-bit words of a ``tied_cut_drops`` bitmap of ``numel`` entries."""
    return -(-numel // 64)


def tied_cut_drops(source: torch.Tensor, base: torch.Tensor, keep: int, tied: float, *, descending: bool,
                   scratch: torch.Tensor | None = None, blocked: bool = True) -> torch.Tensor | None:
    """``tied_cut_apply``'s selection for a task vector not formed, ``source - base`` (flat contiguous
    CPU tensors, both float32 or both bfloat16: the float32 values torch's subtraction or
    ``fused.bf16_delta`` gives): instead of zeroing entries, a bitmap (int64 words, bit ``i % 64`` of
    word ``i // 64``) with a bit set for each entry of the tied run that selection drops, for the fused
    kernel (``FusedJob.drops``) to mask. None where the replay cannot be used."""
    kind = MAGS_KINDS.get(source.dtype)
    if (kind is None or base.dtype != source.dtype or source.device.type != "cpu" or base.device.type != "cpu"
            or not (source.is_contiguous() and base.is_contiguous()) or source.numel() != base.numel()
            or source.numel() >= DROPPED or not _agrees_with_torch()):
        return None
    lib = _library()
    assert lib is not None
    n = source.numel()
    scratch = _word_scratch(n, scratch)
    drop = torch.zeros(drop_words(n), dtype=torch.int64)
    bits = _magnitude_bits(tied)
    status = lib.tied_cut_drops(source.data_ptr(), base.data_ptr(), kind, n, keep, int(descending), bits,
                                scratch.data_ptr(), BLOCKED if blocked else 0, drop.data_ptr())
    return drop if status == 0 else None
