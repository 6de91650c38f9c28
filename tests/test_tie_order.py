"""tie_order: the kept entries of a tied cut are exactly those of torch's own sort (mergekit's)."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from merges.checkpoint import open_checkpoint
from merges.engine import MergeEngine
from merges.methods import tie_order
from merges.methods.tie_order import DROPPED, window_keys
from merges.recipe import Recipe


def _replay_in_use() -> None:
    if not tie_order._agrees_with_torch():  # another torch sort (or no compiler): callers sort, as before
        pytest.skip("the replay does not reproduce this machine's torch sort; the engine sorts instead")


def _inside(values: torch.Tensor, lo: int, hi: int, descending: bool) -> torch.Tensor:
    """mergekit's kept entries: positions [lo, hi) of torch's sort of float32 |values|."""
    magnitudes = values.abs().float()
    order = (torch.argsort(magnitudes, descending=True) if descending
             else torch.sort(magnitudes, descending=False).indices)
    return torch.isin(torch.arange(values.numel()), order[lo:hi])


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 20_000), distinct=st.integers(1, 40), seed=st.integers(0, 2**31),
       cuts=st.tuples(st.floats(0, 1), st.floats(0, 1)), descending=st.booleans(),
       signed=st.booleans())
def test_kept_entries_are_those_of_torch_sort(n: int, distinct: int, seed: int,
                                              cuts: tuple[float, float], descending: bool,
                                              signed: bool) -> None:
    """Heavily tied magnitudes (few distinct values, both signs), any window, both directions."""
    _replay_in_use()
    generator = torch.Generator().manual_seed(seed)
    values = torch.randint(0, distinct, (n,), generator=generator).float().mul_(0.125)
    if signed:
        values.mul_(torch.randint(0, 2, (n,), generator=generator).float().mul_(2).sub_(1))
    lo, hi = sorted(int(c * n) for c in cuts)
    keys = window_keys(values, lo, hi, descending=descending)
    assert keys is not None and keys.dtype == torch.int32
    assert torch.equal(keys != DROPPED, _inside(values, lo, hi, descending))
    assert bool(((keys == lo) | (keys == DROPPED)).all())  # lo <= key < hi keeps exactly them


def test_bfloat16_deltas_of_a_large_tensor() -> None:
    """Quantised fine-tune deltas (bf16 weights, float32 arithmetic) of a tensor large enough for
    deep partitions: the TIES and breadcrumbs windows keep what torch's sort keeps."""
    _replay_in_use()
    generator = torch.Generator().manual_seed(7)
    base = torch.randn(300_000, generator=generator).mul_(0.02).bfloat16()
    source = (base.float() + torch.randn(300_000, generator=generator).mul_(0.002)).bfloat16()
    delta = source.float() - base.float()
    for lo, hi, descending in ((0, 150_000, True), (0, 90_001, True), (120_000, 297_000, False)):
        keys = window_keys(delta, lo, hi, descending=descending)
        assert keys is not None
        assert torch.equal(keys != DROPPED, _inside(delta, lo, hi, descending)), (lo, hi, descending)


def test_not_used_off_the_cpu_or_without_the_native_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """None tells the engine to sort instead: a tensor off the CPU, or no compiled replay."""
    values = torch.tensor([1.0, 1.0, 2.0])
    if torch.cuda.is_available():
        assert window_keys(values.cuda(), 0, 1, descending=True) is None
    monkeypatch.setenv("MERGESEARCH_NO_NATIVE", "1")
    tie_order._library.cache_clear()
    tie_order._agrees_with_torch.cache_clear()
    try:
        assert window_keys(values, 0, 1, descending=True) is None
    finally:
        monkeypatch.delenv("MERGESEARCH_NO_NATIVE")
        tie_order._library.cache_clear()
        tie_order._agrees_with_torch.cache_clear()


def record_replays(monkeypatch: pytest.MonkeyPatch, replay_name: str, module: object = tie_order) -> list[bool]:
    """Wrap ``module.<replay_name>`` (``tie_order``'s by default); the list records, per call,
    whether it decided the cut (keys, not None; ``tied_cut_apply``: True, no full sort)."""
    replay = getattr(module, replay_name)
    calls: list[bool] = []

    def counted(*args: object, **kwargs: object) -> torch.Tensor | bool | None:
        keys = replay(*args, **kwargs)
        calls.append(keys is not None and keys is not False)
        return keys

    monkeypatch.setattr(module, replay_name, counted)
    return calls


def test_lean_engine_replays_tied_cuts_and_matches_resident(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16-quantised family (ties at most cuts): the lean plan takes its tied cuts from the
    replay (no full sort) and merges the resident plan's tensors bit for bit."""
    _replay_in_use()
    from tests.checkpoints import quantised_family

    quantised_family(tmp_path, seed=5, source_seed=200)
    base = open_checkpoint(tmp_path / "base")
    sources = [open_checkpoint(tmp_path / f"source{i}") for i in range(2)]
    calls = record_replays(monkeypatch, "window_keys")
    lean = MergeEngine(base, sources, device="cpu", plan="lean")
    resident = MergeEngine(base, sources, device="cpu", plan="resident")
    paths = [str(tmp_path / f"source{i}") for i in range(2)]
    for method, extra in (("ties", {}), ("breadcrumbs_ties", {"gamma": [0.05, 0.1]})):
        for densities in ([0.35, 0.6], [0.5, 0.9]):
            r = Recipe.uniform(method, str(tmp_path / "base"), paths, 2,
                               {"weight": [0.7, 0.4], "density": densities, **extra})
            merged = lean.materialize(r)
            for name, tensor in resident.materialize(r).items():
                assert torch.equal(merged[name], tensor), (method, densities, name)
    assert calls and all(calls)  # the cuts were tied, and the replay (not a full sort) decided them


def _native() -> ctypes.CDLL:
    """The compiled replay, whether or not it agrees with torch: the block tests compare it with
    itself (blocks against Hoare's loop), so a wrong block partition fails them instead of
    turning the replay off and skipping them."""
    lib = tie_order._library()
    if lib is None:
        pytest.skip("no C compiler (or MERGESEARCH_NO_NATIVE): nothing to compare")
    return lib


def _adversarial(kind: str, n: int, generator: torch.Generator) -> torch.Tensor:
    """int32 magnitudes (as small nonnegative integers) of one hard case for a partition."""
    if kind == "equal":
        return torch.full((n,), 5, dtype=torch.int32)
    if kind == "two":
        return torch.randint(0, 2, (n,), generator=generator, dtype=torch.int32).mul_(6).add_(3)
    if kind in ("sorted", "reversed"):
        values = torch.sort(torch.randint(0, 50, (n,), generator=generator, dtype=torch.int32)).values
        return values if kind == "sorted" else values.flip(0)
    if kind == "organ":  # ascending then descending: the median-of-three's worst neighbours
        half = torch.arange(n // 2 + 1, dtype=torch.int32)
        return torch.cat([half, half.flip(0)])[:n].contiguous()
    if kind == "few":
        return torch.randint(0, 4, (n,), generator=generator, dtype=torch.int32)
    return torch.randint(0, 1 << 20, (n,), generator=generator, dtype=torch.int32)


def _partitions_agree(values: torch.Tensor, tied_share: float, generator: torch.Generator) -> None:
    """One partition of ``values``, by blocks (both scans) and by Hoare's scalar loop: the same returned cut and
    every entry in the same place, for (value, index) pairs and for words (a share of the entries
    equal to the tied magnitude flagged with their index), both directions."""
    lib = _native()
    n = values.numel()
    tied = int(values[int(torch.randint(0, n, (1,), generator=generator))])
    flagged = (values == tied) & (torch.rand(n, generator=generator) < tied_share)
    words = torch.where(flagged, torch.arange(n, dtype=torch.int64) | (1 << 31), values.long())
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)  # uint32 bits
    pairs = torch.stack([values.float().mul_(0.25).view(torch.int32), torch.arange(n, dtype=torch.int32)], 1)
    for desc in (0, 1):
        for name, data, context in (("word", words, tied), ("pair", pairs, 0)):
            partition = getattr(lib, f"{name}_partition_once")
            scalar = data.clone()
            reference = partition(scalar.data_ptr(), n, desc, context, 0)
            assert 0 < reference < n  # a real partition: the check below can fail
            for mode in (1, 2, 3):  # blocks scanned entry by entry; 8 at a time (words, AVX2); 16 (AVX-512)
                blocked = data.clone()
                cut = partition(blocked.data_ptr(), n, desc, context, mode)
                assert cut == reference and torch.equal(blocked, scalar), (name, n, desc, mode)


BLOCK_SIZES = sorted({17, 33, *(k * tie_order.PARTITION_BLOCK + d for k in (1, 2, 3, 4) for d in (-1, 0, 1)),
                      1000, 4099})


@pytest.mark.parametrize("kind", ["equal", "two", "sorted", "reversed", "organ", "few", "random"])
def test_block_partition_is_hoares_partition(kind: str) -> None:
    """Adversarial inputs at sizes around the block boundaries: the block scans swap exactly what
    the unguarded Hoare partition swaps (the partition std::sort runs)."""
    generator = torch.Generator().manual_seed(11)
    for n in BLOCK_SIZES:
        _partitions_agree(_adversarial(kind, n, generator), 0.7, generator)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(17, 3_000), distinct=st.integers(1, 60), tied_share=st.floats(0, 1),
       seed=st.integers(0, 2**31))
def test_block_partition_is_hoares_partition_random(n: int, distinct: int, tied_share: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    _partitions_agree(torch.randint(0, distinct, (n,), generator=generator, dtype=torch.int32), tied_share,
                      generator)


def test_blocked_replay_keeps_the_scalar_replays_entries() -> None:
    """Whole replays (many nested partitions) of a tied cut, blocked and scalar: the same keys, which
    are torch's."""
    lib = _native()
    generator = torch.Generator().manual_seed(5)
    delta = torch.randint(0, 9, (200_003,), generator=generator).float().mul_(0.5)
    for descending in (True, False):
        ordered = torch.sort(delta, descending=descending).values
        keep = 100_000
        assert float(ordered[keep - 1]) == float(ordered[keep])
        blocked = tie_order._replay_tied(lib, delta, keep, float(ordered[keep]), descending)
        scalar = tie_order._replay_tied(lib, delta, keep, float(ordered[keep]), descending, blocked=False)
        assert blocked is not None and scalar is not None and torch.equal(blocked, scalar)
        if tie_order._agrees_with_torch():  # (false, and so skipped, where the blocks go wrong)
            assert torch.equal(blocked != DROPPED, _inside(delta, 0, keep, descending))
        pairs = tie_order._replay(lib, delta, 0, keep, descending)
        assert pairs is not None and torch.equal(pairs, blocked)
    with_nan = delta.clone()
    with_nan[123_456] = float("nan")  # not ordered like a bit pattern: the word replay declines
    assert tie_order._replay_tied(lib, with_nan, 100_000, float(ordered[100_000]), False) is None
    if tie_order._agrees_with_torch():  # the applied replay, whose first partition counts the NaNs as it forms
        for at in (3, 100_001, 123_456, 200_002):  # in the first left block, the middle, a right block, the last
            with_nan = delta.clone()
            with_nan[at] = float("nan")
            assert not tie_order.tied_cut_apply(with_nan, 100_000, float(ordered[100_000]), descending=False)
            assert torch.equal(with_nan[:at], delta[:at]) and torch.equal(with_nan[at + 1:], delta[at + 1:])


def test_applied_replay_zeroes_what_the_keys_drop() -> None:
    """``tied_cut_apply`` then its band (``applied_band``, as the fused kernel masks: +0.0 outside
    it): the entries ``tied_cut_keys`` drops become +0.0 (the kernel's masked value, whatever their
    sign), the kept ones keep their bits; the apply alone leaves the entries past the tied run as
    they were; where the replay declines (the value at the cut is not tied there) it returns False
    and changes nothing."""
    _replay_in_use()
    generator = torch.Generator().manual_seed(7)
    delta = torch.randint(-4, 5, (100_003,), generator=generator).float().mul_(0.25)
    cases = 0
    for descending in (True, False):
        ordered = torch.sort(delta.abs(), descending=descending).values
        for keep in (30_001, 50_000, 90_000):
            tied = float(ordered[keep])
            if float(ordered[keep - 1]) != tied:
                continue
            keys = tie_order.tied_cut_keys(delta, keep, tied, descending=descending)
            applied = delta.clone()
            assert keys is not None and tie_order.tied_cut_apply(applied, keep, tied, descending=descending)
            lo, hi = tie_order.applied_band(tied, descending=descending)
            outside = (applied.abs() < lo) | (applied.abs() > hi)
            assert torch.equal(applied[delta.abs() != tied], delta[delta.abs() != tied])  # the run's only
            masked = torch.where(outside, torch.zeros_like(applied), applied)
            expected = torch.where(keys == 0, delta, torch.zeros_like(delta))
            assert torch.equal(masked.view(torch.int32), expected.view(torch.int32))
            cases += bool((delta[keys != 0] != 0).any())  # some dropped entries were nonzero
    assert cases >= 4
    untied = torch.arange(1000, dtype=torch.float32)
    copy = untied.clone()
    assert not tie_order.tied_cut_apply(copy, 500, 500.0, descending=True)
    assert torch.equal(copy, untied)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(17, 3_000), distinct=st.integers(1, 12), keep_share=st.floats(0, 1),
       descending=st.booleans(), seed=st.integers(0, 2**31))
def test_applied_replay_forms_its_words_in_the_first_partition(n: int, distinct: int, keep_share: float,
                                                               descending: bool, seed: int) -> None:
    """``tied_cut_apply`` forms the words inside its first partition (the median of three's entries
    first, then each scanned block, then the rest): at sizes around the block boundaries it keeps
    what ``tied_cut_keys`` (the words formed by a pass of their own) keeps."""
    _replay_in_use()
    generator = torch.Generator().manual_seed(seed)
    delta = torch.randint(-distinct, distinct + 1, (n,), generator=generator).float().mul_(0.5)
    keep = min(n - 1, max(1, int(keep_share * n)))
    ordered = torch.sort(delta.abs(), descending=descending).values
    tied = float(ordered[keep])
    if float(ordered[keep - 1]) != tied or tied == 0:
        return
    keys = tie_order.tied_cut_keys(delta, keep, tied, descending=descending)
    applied = delta.clone()
    assert keys is not None and tie_order.tied_cut_apply(applied, keep, tied, descending=descending)
    lo, hi = tie_order.applied_band(tied, descending=descending)
    kept = (applied.abs() >= lo) & (applied.abs() <= hi) & (applied != 0)
    assert torch.equal(kept, (keys == 0) & (delta != 0))
