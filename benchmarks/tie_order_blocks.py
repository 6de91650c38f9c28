"""ns per entry of tie_order's replay of one tied cut, by partition: Hoare's scalar loop (the replay
before issue 16), blocks scanned entry by entry, and (the word replay) blocks scanned 8 entries at a
time with AVX2 where the CPU has it, or scanned and swapped 16 at a time with AVX-512; the same kept
entries asserted. One 1.1B MLP matrix's shape
(5632 × 2048 = 11.5M entries) of bf16 fine-tune-like deltas, float32 arithmetic, TIES density 0.5
(a cut inside a run of equal magnitudes), single-threaded C, best and median of ``--repeats``::

    python -m benchmarks.tie_order_blocks
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from merges.methods import tie_order

MODES = {0: "Hoare's loop", 1: "blocks", 2: "blocks, AVX2 scans", 3: "blocks, AVX-512"}  # tie_order's ``blocked`` argument in C


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    lib = tie_order._library()
    if lib is None or not tie_order._agrees_with_torch():
        print("the replay is off on this machine (no compiler, or it does not reproduce torch's sort)")
        return 1
    generator = torch.Generator().manual_seed(3)
    n = 5632 * 2048
    base = torch.randn(n, generator=generator).mul_(0.02).bfloat16()
    source = (base.float() + torch.randn(n, generator=generator).mul_(0.002)).bfloat16()
    delta = source.float() - base.float()
    keep = n // 2
    tied = float(np.sort(delta.abs().numpy())[n - 1 - keep])  # the magnitude at descending position keep
    bits = int(torch.tensor([tied]).view(torch.int32)[0])
    keys, words = torch.empty(n, dtype=torch.int32), torch.empty(n, dtype=torch.int32)
    pairs = torch.empty(2 * n, dtype=torch.int32)
    seconds: dict[str, list[float]] = {}
    kept: torch.Tensor | None = None
    for _ in range(args.repeats):  # interleaved, so that the machine's load falls on each alike
        for replay, modes in (("words", (0, 1, 2, 3)), ("pairs", (0, 1))):
            for mode in modes:
                started = time.perf_counter()
                if replay == "words":
                    status = lib.tied_cut_keys(delta.data_ptr(), n, keep, 1, bits, keys.data_ptr(),
                                               words.data_ptr(), mode)
                else:
                    status = lib.window_keys(delta.data_ptr(), n, 0, keep, 1, keys.data_ptr(), pairs.data_ptr(),
                                             mode)
                seconds.setdefault(f"{replay}, {MODES[mode]}", []).append(time.perf_counter() - started)
                assert status == 0
                kept = keys != tie_order.DROPPED if kept is None else kept
                assert torch.equal(keys != tie_order.DROPPED, kept), (replay, mode)
    print(f"{n} entries, keep {keep}, {int((delta.abs() == tied).sum())} tied at the cut; ns per entry "
          f"(best / median of {args.repeats}), the same kept entries:")
    for name, times in seconds.items():
        print(f"  {name:28s} {min(times) / n * 1e9:6.2f} / {sorted(times)[len(times) // 2] / n * 1e9:6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
