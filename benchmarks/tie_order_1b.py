"""One tied cut of the 1.1B family (``merge_speed --size 1b``): tie_order's replay vs a full sort.

``lm_head.weight`` of source0 minus the base (65.5M entries, bf16 on disk, float32 arithmetic),
TIES density 0.5: ``tie_order.window_keys`` against ``sparsify.descending_ranks`` (argsort and
sort positions: what the lean plan did per tied tensor before), kept entries compared. Peak RSS
about 2.2 GB::

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
from merges.methods.tie_order import DROPPED, window_keys

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
    del ascending
    started = time.perf_counter()
    keys = window_keys(delta, 0, keep, descending=True)
    replay_s = time.perf_counter() - started
    started = time.perf_counter()
    ranks = sparsify.descending_ranks(delta)
    sort_s = time.perf_counter() - started
    same = keys is not None and torch.equal(keys != DROPPED, ranks < keep)
    print(f"{NAME}: {n} entries, {int((delta == 0).sum())} zero, cut tied: {tied}; replay "
          f"{replay_s:.2f} s, argsort + positions {sort_s:.2f} s, same kept entries: {same}; "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
