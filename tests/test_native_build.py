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


@pytest.mark.parametrize("march", ["x86-64", "x86-64-v3"])
def test_streamed_outputs_are_the_same_bits_on_older_x86(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          march: str) -> None:
    """``STREAM_STORE_C`` picks its stores by instruction set (AVX-512, AVX, none): built for a CPU
    without AVX-512 (or without AVX), the task vectors and the gathered bucket are torch's bits,
    at every length and alignment (the aligned middle, the head and tail around it)."""
    import platform

    import numpy as np
    import torch

    from merges.methods import fused, magnitude_sketch

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 instruction sets")
    monkeypatch.setenv("MERGESEARCH_CACHE", str(tmp_path))
    monkeypatch.delenv("MERGESEARCH_NO_NATIVE", raising=False)
    def for_march(flags: list[str]) -> list[str]:  # the kernels' own flags, another CPU's instruction set
        assert "-march=native" in flags
        return [f"-march={march}" if flag == "-march=native" else flag for flag in flags]

    delta_lib = native.build_library("fused", fused._C_SOURCE, for_march(fused.FLAGS), ["-lm"])
    gather_lib = native.build_library("magnitude_sketch", magnitude_sketch._C_SOURCE,
                                      for_march(native.EXACT_FLAGS), [])
    if delta_lib is None or gather_lib is None:
        pytest.skip("no C compiler")
    gather_lib.f32_delta_gather.restype = ctypes.c_int64
    bucket = 0x3F00 + 1  # magnitudes in [0.5, 0.50390625): some of a standard normal's deltas
    pointer = ctypes.c_void_p
    for n in (1, 15, 17, 100, 4099):
        for offset in (0, 1, 3):  # the output's start off the vector alignment by 0, 4 and 12 bytes
            generator = torch.Generator().manual_seed(n * 7 + offset)
            source, base = (torch.randn(n + offset, generator=generator)[offset:] for _ in range(2))
            out = torch.empty(n + offset)[offset:]
            wide_source, wide_base = source.bfloat16(), base.bfloat16()
            delta_lib.bf16_delta(pointer(wide_source.data_ptr()), pointer(wide_base.data_ptr()),
                                 pointer(out.data_ptr()), ctypes.c_int64(n))
            assert torch.equal(out.view(torch.int32), (wide_source.float() - wide_base.float()).view(torch.int32))
            gathered = np.empty(n, np.float32)
            count = gather_lib.f32_delta_gather(pointer(source.data_ptr()), pointer(base.data_ptr()),
                                                pointer(out.data_ptr()), ctypes.c_int64(n),
                                                ctypes.c_int64(bucket), pointer(gathered.ctypes.data))
            expected = source - base
            assert torch.equal(out.view(torch.int32), expected.view(torch.int32))
            magnitude = expected.abs()
            wanted = magnitude[((magnitude.view(torch.int32) >> 16) == bucket - 1) & (magnitude != 0)]
            assert np.array_equal(gathered[:count], wanted.numpy())
