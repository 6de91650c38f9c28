"""Small C kernels compiled on first use and cached per source, flags and CPU (no build step).

A kernel is built with the system's C compiler into ``$MERGESEARCH_CACHE/kernels`` (default
``~/.cache/mergesearch/kernels``), named by a hash of its source, flags and the CPU's flags,
so a shared home folder never hands one machine's ``-march=native`` build to another. The
build goes to a temporary name and is renamed into place (two processes may build at once).
``MERGESEARCH_NO_NATIVE=1``, or no working compiler: ``None``, and callers use torch.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import threading
from pathlib import Path

BUILD_TIMEOUT_S = 120
EXACT_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC"]
"""Flags of kernels that must round as torch does: vectorised for this CPU, but no FMA contraction
and no fast-math reassociation (each C operation one IEEE rounding)."""


STREAM_STORE_C = r"""
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#include <stdint.h>
#include <string.h>
/* dst[0, n) = src[0, n) with streaming stores where dst is vector-aligned: a line the kernel only
   writes (a task vector, a merged tensor: read again only after the whole pass) is not first read
   from memory nor kept in cache, a third less memory traffic for a delta pass. The values are
   copied, not computed: no bit changes. Callers end with stream_fence() before returning (the
   stores are weakly ordered; another thread reads them next). */
static inline void stream_copy(float *dst, const float *src, int64_t n) {
    int64_t j = 0;
#if defined(__AVX512F__)
    for (; j < n && ((uintptr_t)(dst + j) & 63); ++j) dst[j] = src[j];
    for (; j + 16 <= n; j += 16) _mm512_stream_ps(dst + j, _mm512_loadu_ps(src + j));
#elif defined(__AVX__)
    for (; j < n && ((uintptr_t)(dst + j) & 31); ++j) dst[j] = src[j];
    for (; j + 8 <= n; j += 8) _mm256_stream_ps(dst + j, _mm256_loadu_ps(src + j));
#endif
    memcpy(dst + j, src + j, (size_t)(n - j) * sizeof(float));
}
static inline void stream_fence(void) {
#if defined(__AVX__)
    _mm_sfence();
#endif
}
"""
"""C included by kernels that write a large output once (``fused``, ``magnitude_sketch``): x86
streaming stores with a plain copy elsewhere (``#if``: other CPUs compile the memcpy)."""

WIDEN_BF16_C = r"""
#include <stdint.h>
#include <string.h>
/* a bfloat16 bit pattern as the float32 it is (exact: the 16 low bits of the float are zero) */
static inline float widen_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
"""
"""C included by the kernels that read bfloat16 tensors (``fused``, ``magnitude_sketch``, ``tie_order``)."""


def chunk_spans(n: int, chunk: int) -> list[tuple[int, int]]:
    """[0, n) as consecutive ``(start, end)`` spans of at most ``chunk`` entries, one native call
    each (a kernel's entries are independent: the split changes no bit); an empty tensor still
    gets one empty span, so a caller makes its call either way."""
    return [(start, min(n, start + chunk)) for start in range(0, n, chunk)] or [(0, 0)]


def cache_dir() -> Path:
    root = os.environ.get("MERGESEARCH_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "mergesearch") / "kernels"


def cpu_signature() -> str:
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return f"{platform.machine()}|{flags}"


def build_library(name: str, source: str, flags: list[str], libraries: list[str]) -> ctypes.CDLL | None:
    """The compiled ``source`` (``cc FLAGS source.c -o lib.so LIBRARIES``), built once and cached."""
    if os.environ.get("MERGESEARCH_NO_NATIVE"):
        return None
    digest = hashlib.sha256("\0".join([source, *flags, *libraries, cpu_signature()]).encode()).hexdigest()
    target = cache_dir() / f"{name}_{digest[:16]}.so"
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory() as tmp:
                src = Path(tmp) / f"{name}.c"
                src.write_text(source)
                # per process and thread: two threads' first calls build at once (a lean engine's pool)
                built = target.parent / f"{target.name}.tmp-{os.getpid()}-{threading.get_ident()}"
                subprocess.run([os.environ.get("CC", "cc"), *flags, str(src), "-o", str(built), *libraries],
                               check=True, capture_output=True, timeout=BUILD_TIMEOUT_S)
                os.replace(built, target)
        except (OSError, subprocess.SubprocessError):
            return None
    return ctypes.CDLL(str(target))
