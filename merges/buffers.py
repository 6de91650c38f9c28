"""Buffers the lean plan reuses from chunk to chunk and trial to trial (``merges.engine``).

Why: a fresh model-sized CPU allocation per trial is mapped and zeroed by the kernel page by
page on every trial; memory kept and handed out again is not. ``Arena`` holds one lean chunk's
model-sized tensors (bump allocation, reset per chunk); ``BufferPool`` a few scratch buffers
for the tie replays running side by side. Neither changes a result: they only decide where a
tensor's entries live.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import queue
import threading
from functools import lru_cache

import torch


class Arena:
    """Memory for one lean chunk's model-sized tensors (bump allocation, ``reset`` per chunk).
    Its capacity is one chunk's worth (what search.memory prices as the lean plan's scratch); a
    request past it (or with no capacity: off the CPU, resident plan) gets its own memory."""

    ALIGN = 16  # entries: each tensor starts on a 64-byte line

    def __init__(self, capacity: int, dtype: torch.dtype, device: torch.device) -> None:
        self._capacity = capacity
        self._dtype = dtype
        self._device = device
        self._buffer: torch.Tensor | None = None  # allocated on first use
        self._used = 0
        self._lock = threading.Lock()

    def take(self, numel: int) -> torch.Tensor:
        with self._lock:
            start = self._used
            if start + numel > self._capacity:
                return torch.empty(numel, dtype=self._dtype, device=self._device)
            if self._buffer is None:
                self._buffer = torch.empty(self._capacity, dtype=self._dtype, device=self._device)
            self._used = min(self._capacity, start + -(-numel // self.ALIGN) * self.ALIGN)
        return self._buffer[start:start + numel]

    def reset(self) -> None:
        self._used = 0


class BufferPool:
    """``count`` reusable buffers of ``numel`` entries, handed to one caller at a time (the tie
    replays running side by side on the engine's pool); with ``numel`` 0, None (callers allocate)."""

    def __init__(self, numel: int, dtype: torch.dtype, count: int) -> None:
        self._numel, self._dtype = numel, dtype
        self._free: queue.Queue[torch.Tensor] | None = None
        self._count = count
        self._lock = threading.Lock()

    def take(self) -> torch.Tensor | None:
        if not self._numel:
            return None
        with self._lock:
            if self._free is None:
                self._free = queue.Queue()
                for _ in range(self._count):
                    self._free.put(torch.empty(self._numel, dtype=self._dtype))
        return self._free.get()

    def give(self, buffer: torch.Tensor | None) -> None:
        if buffer is not None and self._free is not None:
            self._free.put(buffer)


@lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return lib if lib is not None and hasattr(lib, "malloc_trim") else None


def release_freed_heap() -> None:
    """Hand the heap memory freed so far back to the OS (glibc's ``malloc_trim``; elsewhere
    nothing). Why: building the live model frees ~100 MB of transformers' temporaries at 245M,
    which glibc keeps mapped, so they would count in the worker's RSS under every merge after."""
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)
