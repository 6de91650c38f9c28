"""Seeded row subsets: which rows ``limit`` keeps (numpy only, no torch).

``limit`` keeps a seeded random subset of each split, not its first N rows, so a small
limit still samples the whole file. The subset depends only on the seed, the key (task
name and split) and the rows' labels: every trial of a study, a resumed run and another
machine score the same rows. Where rows carry a label (choice tasks: the right option's
index) the subset is stratified: each label keeps its share of the rows (largest
remainder, in integers). The kept rows stay in file order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


def stable_seed(*parts: object) -> int:
    """A 64-bit seed from ``parts`` (their ``str``), the same in every process and machine.

    Python's ``hash`` of a string is salted per process, so it cannot seed anything that
    must repeat across a resume.
    """
    text = "\x1f".join(str(part) for part in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def stratum_quotas(counts: Sequence[int], total: int) -> list[int]:
    """How many of ``total`` rows each stratum of ``counts`` rows keeps.

    Proportional, rounded by largest remainder with exact integer arithmetic (ties go to
    the earlier stratum): each quota is within 1 of ``count * total / sum(counts)``, never
    above its count, and the quotas add up to ``total``.
    """
    rows = sum(counts)
    if not 0 <= total <= rows:
        raise ValueError(f"cannot keep {total} of {rows} rows")
    if rows == 0:
        return [0 for _ in counts]
    quotas = [count * total // rows for count in counts]
    remainders = [count * total % rows for count in counts]
    left = total - sum(quotas)
    # largest remainder first; equal remainders in stratum order (no float ordering)
    for stratum in sorted(range(len(counts)), key=lambda s: (-remainders[s], s))[:left]:
        quotas[stratum] += 1
    return quotas


def subset_indices(n_rows: int, limit: int, *, seed: int, key: str,
                   labels: Sequence[int] | None = None) -> list[int]:
    """The indices (ascending, i.e. file order) of the ``limit`` rows kept out of ``n_rows``.

    ``seed`` and ``key`` (e.g. the task name and the split) pick the rows; ``labels``
    (one per row) stratify them. ``limit >= n_rows`` keeps every row.
    """
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if labels is not None and len(labels) != n_rows:
        raise ValueError(f"{len(labels)} labels for {n_rows} rows")
    if limit >= n_rows:
        return list(range(n_rows))
    rng = np.random.default_rng(stable_seed(seed, key))
    if labels is None:
        return sorted(rng.permutation(n_rows)[:limit].tolist())
    strata = sorted(set(labels))
    members = [[i for i, label in enumerate(labels) if label == stratum] for stratum in strata]
    kept: list[int] = []
    for rows, quota in zip(members, stratum_quotas([len(rows) for rows in members], limit), strict=True):
        kept.extend(rows[i] for i in rng.permutation(len(rows))[:quota].tolist())
    return sorted(kept)
