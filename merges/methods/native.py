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
