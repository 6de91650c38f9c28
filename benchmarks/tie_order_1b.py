"""One tied cut of the 1.1B family (``merge_speed --size 1b``): tie_order's replay vs a full sort.

``lm_head.weight`` of source0 minus the base (65.5M entries, bf16 on disk, float32 arithmetic),
TIES density 0.5: ``tie_order.window_keys`` ((value, index) pairs) and ``tied_cut_keys`` (one
word per entry: what the lean plan runs), each with the block partition and with Hoare's scalar
loop (``blocked=False``: the replay before the blocks), against ``sparsify.descending_ranks``
(argsort and sort positions: what the lean plan did per tied tensor before the replay), kept
entries compared (the replays are single-threaded C). Peak RSS about 2.2 GB (once the family is built)::

    python -m benchmarks.tie_order_1b
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.merge_speed import REPO, SIZES, build_family
from merges.checkpoint import open_checkpoint
from merges.methods import sparsify
from merges.methods.tie_order import DROPPED, tied_cut_keys, window_keys

NAME = "lm_head.weight"
DENSITY = 0.5


def main() -> int:
    cache = os.environ.get("MERGESEARCH_CACHE")
    base_dir, sources = build_family((Path(cache) if cache else REPO / ".cache") / "bench" / "1b", SIZES["1b"])
    base = open_checkpoint(base_dir).read(NAME, dtype=torch.float32).reshape(-1).clone()
    delta = open_checkpoint(sources[0]).read(NAME, dtype=torch.float32).reshape(-1).clone().sub_(base)
    del base
    n = delta.numel()
    keep = sparsify.magnitude_keep_count(DENSITY, n)
    ascending = torch.from_numpy(np.sort(delta.abs().numpy()))
    tied = sparsify.magnitude_band(ascending, keep) is None
    tied_value = float(ascending[n - 1 - keep])  # descending position keep: the cut's magnitude
    del ascending
    timings: dict[str, float] = {}
    kept: dict[str, torch.Tensor] = {}
    for blocked in (False, True):
        name = "blocks" if blocked else "scalar"
        started = time.perf_counter()
        keys = window_keys(delta, 0, keep, descending=True, blocked=blocked)
        timings[f"pairs, {name}"] = time.perf_counter() - started
        kept[f"pairs, {name}"] = keys != DROPPED if keys is not None else torch.zeros(0, dtype=torch.bool)
        if tied:
            started = time.perf_counter()
            keys = tied_cut_keys(delta, keep, tied_value, descending=True, blocked=blocked)
            timings[f"words, {name}"] = time.perf_counter() - started
            kept[f"words, {name}"] = keys != DROPPED if keys is not None else torch.zeros(0, dtype=torch.bool)
        del keys
    started = time.perf_counter()
    ranks = sparsify.descending_ranks(delta)
    sort_s = time.perf_counter() - started
    reference = ranks < keep
    same = all(torch.equal(k, reference) for k in kept.values())
    replays = "; ".join(f"{name} {seconds:.2f} s ({seconds / n * 1e9:.1f} ns/entry)"
                        for name, seconds in timings.items())
    print(f"{NAME}: {n} entries, {int((delta == 0).sum())} zero, cut tied: {tied}; replay {replays}; "
          f"argsort + positions {sort_s:.2f} s, same kept entries: {same}; "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
