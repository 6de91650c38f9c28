"""nearswap's float32 C pass, ns per entry, single-threaded: as built, and built with extra flags.

16M entries (deltas ~1e-2 of weights ~2e-2, t = 0.004: some entries swapped, most blended),
rounds interleaved so that load hits every build alike. CPU time (``time.thread_time``) is the
figure to compare on a shared machine; wall time is printed beside it. Every build's output is
checked equal, bit for bit, to the shipped one's::

    python -m benchmarks.nearswap_pass [--rounds 40] [--flags -fno-trapping-math]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import time

import torch

from merges.methods import nearswap
from merges.methods.native import EXACT_FLAGS, build_library

ENTRIES = 1 << 24
T = 0.004


def _build(flags: list[str]) -> ctypes.CDLL:
    lib = build_library("nearswap_bench", nearswap._C_SOURCE, [*EXACT_FLAGS, *flags], [])
    if lib is None:
        raise SystemExit("no C compiler: nothing to measure")
    lib.nearswap.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p,
                             ctypes.c_void_p, ctypes.c_void_p]
    return lib


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--flags", nargs="*", default=["-fno-trapping-math"],
                        help="extra compiler flags of the build compared with the shipped one")
    args = parser.parse_args()
    builds = {"shipped (EXACT_FLAGS)": _build([]), f"+ {' '.join(args.flags)}": _build(args.flags)}
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(ENTRIES, generator=generator) * 0.02
    other = base + torch.randn(ENTRIES, generator=generator) * 0.002
    out, reference = torch.empty_like(base), None
    cpu: dict[str, list[float]] = {name: [] for name in builds}
    wall: dict[str, list[float]] = {name: [] for name in builds}
    for _ in range(args.rounds):
        for name, lib in builds.items():
            started_wall, started_cpu = time.perf_counter(), time.thread_time()
            lib.nearswap(0, ENTRIES, T, base.data_ptr(), other.data_ptr(), out.data_ptr())
            cpu[name].append(time.thread_time() - started_cpu)
            wall[name].append(time.perf_counter() - started_wall)
            if reference is None:
                reference = out.clone()
            elif not torch.equal(out.view(torch.int32), reference.view(torch.int32)):
                raise SystemExit(f"{name}: output differs from the shipped build's")
    print(f"{ENTRIES} entries, {args.rounds} rounds, load average {os.getloadavg()[0]:.1f}")
    for name in builds:
        print(f"{name:32s} CPU median {statistics.median(cpu[name]) / ENTRIES * 1e9:.2f} "
              f"min {min(cpu[name]) / ENTRIES * 1e9:.2f} ns/entry; wall median "
              f"{statistics.median(wall[name]) / ENTRIES * 1e9:.2f} ns/entry")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
