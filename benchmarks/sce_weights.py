"""sce's weights per trial, ns per entry, single-threaded: torch's way (mergekit's ``mean`` over the
kept task vectors' squares, written ``[K, N]``) and ``sce_kernel.square_sums`` (the same float
additions in C as it reads the task vectors, nothing written).

16M entries, 3 sources, ``select_topk`` 0.5 (the kept entries from a cached variance order), rounds
interleaved so that load hits both alike. CPU time (``time.process_time`` with one torch thread)
is the figure to compare on a shared machine; wall time is printed beside it. Both give the
same bits (checked every round); ends with one JSON line::

    python -m benchmarks.sce_weights [--rounds 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from merges.methods import sce, sce_kernel

ENTRIES = 1 << 24
SOURCES = 3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    lib = sce_kernel.library()
    if lib is None or sce_kernel.lanes() is None:
        raise SystemExit("no C compiler, or torch's sum layout not matched here: nothing to measure")
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    deltas = [torch.randn(ENTRIES, generator=generator) * 0.002 * (j + 1) for j in range(SOURCES)]
    order = sce.variance_order(torch.stack(deltas))
    keep = sce.keep_count(order.nonzero, 0.5)
    mask = (order.position < keep).float()

    def torch_way() -> torch.Tensor:
        return (torch.stack(deltas) * mask).square().mean(dim=1)

    def kernel_way() -> torch.Tensor:
        sums = sce_kernel.square_sums(lib, deltas, order.position, keep)
        assert sums is not None
        return sums.div_(ENTRIES)

    ways = {"torch (mergekit's mean)": torch_way, "square_sums (C)": kernel_way}
    cpu: dict[str, list[float]] = {name: [] for name in ways}
    wall: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.rounds):
        results = []
        for name, way in ways.items():
            started_wall, started_cpu = time.perf_counter(), time.process_time()
            results.append(way())
            cpu[name].append(time.process_time() - started_cpu)
            wall[name].append(time.perf_counter() - started_wall)
        if not torch.equal(results[0], results[1]):
            raise SystemExit("square_sums differs from torch's mean")
    print(f"{ENTRIES} entries x {SOURCES} sources, {args.rounds} rounds, load average {os.getloadavg()[0]:.1f}")
    figures = {}
    for name in ways:
        cpu_ns = statistics.median(cpu[name]) / ENTRIES * 1e9
        wall_ns = statistics.median(wall[name]) / ENTRIES * 1e9
        figures[name] = cpu_ns
        print(f"{name:26s} CPU median {cpu_ns:5.2f} ns/entry (min {min(cpu[name]) / ENTRIES * 1e9:5.2f}), "
              f"wall median {wall_ns:5.2f} ns/entry")
    torch_ns, kernel_ns = figures.values()
    print(json.dumps({"entries": ENTRIES, "sources": SOURCES, "torch_cpu_ns": round(torch_ns, 3),
                      "kernel_cpu_ns": round(kernel_ns, 3), "ratio": round(torch_ns / kernel_ns, 2)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
