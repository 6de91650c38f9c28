"""native.build_library: a kernel's first build from several threads at once."""

from __future__ import annotations

import ctypes
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from merges.methods import native


def test_threads_building_one_kernel_at_once_all_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each thread's build goes to its own temporary file before the rename, so none loses its file
    to another's rename (which returned None: no kernel, in one of a lean engine's pool threads)."""
    monkeypatch.setenv("MERGESEARCH_CACHE", str(tmp_path))
    monkeypatch.delenv("MERGESEARCH_NO_NATIVE", raising=False)
    source = "int answer(void) { return 42; }\n"
    if native.build_library("probe", source, ["-O1", "-shared", "-fPIC"], []) is None:
        pytest.skip("no C compiler")
    source = "int answer(void) { return 43; }\n"  # not built yet: every thread builds it

    def build(_: int) -> ctypes.CDLL | None:
        return native.build_library("probe", source, ["-O1", "-shared", "-fPIC"], [])

    with ThreadPoolExecutor(4) as pool:
        libraries = list(pool.map(build, range(4)))
    assert all(lib is not None and lib.answer() == 43 for lib in libraries)
    assert not list((tmp_path / "kernels").glob("*.tmp-*"))
