"""The lean plan's magnitude sketch and one-run tie replay give exactly the sorted / torch answer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from merges.checkpoint import open_checkpoint
from merges.engine import MergeEngine
from merges.methods import magnitude_sketch, tie_order
from merges.methods.tie_order import DROPPED
from merges.recipe import Recipe


def _native() -> None:
    if magnitude_sketch._library() is None or not tie_order._agrees_with_torch():
        pytest.skip("no C compiler, or the replay does not reproduce this machine's torch sort")


def _values(n: int, distinct: int, zeros: float, seed: int) -> np.ndarray:
    """Signed, heavily tied float32 values (``distinct`` magnitudes across several octaves),
    a share of exact zeros and of negative zeros."""
    rng = np.random.default_rng(seed)
    levels = np.ldexp(rng.integers(1, 64, distinct), rng.integers(-30, 4, distinct)).astype(np.float32)
    values = levels[rng.integers(0, distinct, n)] * rng.choice(np.float32([-1, 1]), n)
    values[rng.random(n) < zeros] = 0.0
    values[rng.random(n) < zeros / 4] = -0.0
    return values.astype(np.float32)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 5000), distinct=st.integers(1, 30), zeros=st.sampled_from([0.0, 0.3, 1.0]),
       seed=st.integers(0, 2**31), density=st.floats(0, 1))
def test_sketched_order_is_the_sorted_tensor_and_the_tie_replay_torch_sort(
        n: int, distinct: int, zeros: float, seed: int, density: float) -> None:
    """Every ascending position read through the sketch is the sorted value there (ties, all-zero
    tensors included); where the TIES cut is tied, the one-run replay keeps torch's entries."""
    _native()
    values = _values(n, distinct, zeros, seed)
    counts = magnitude_sketch.histogram(values)
    assert counts is not None and int(counts.sum()) == n
    order = magnitude_sketch.SketchedOrder(
        counts, lambda bucket, count: magnitude_sketch.gather_bucket(values, bucket, count))
    ascending = np.sort(np.abs(values))
    picks = np.random.default_rng(seed).integers(0, n, 8)
    positions = sorted({0, n - 1, int(density * (n - 1)), *(int(i) for i in picks)})
    assert [order[i] for i in positions] == [float(ascending[i]) for i in positions]
    keep = max(1, int(density * n))
    if keep >= n or ascending[n - keep] == 0 or ascending[n - keep] != ascending[n - keep - 1]:
        return  # no tied nonzero cut: a magnitude band decides it
    tensor = torch.from_numpy(values)
    keys = tie_order.tied_cut_keys(tensor, keep, order[n - keep], descending=True)
    assert keys is not None
    kept = torch.argsort(tensor.abs(), descending=True)[:keep]  # mergekit's call
    assert torch.equal(keys != DROPPED, torch.isin(torch.arange(n), kept))
    assert bool(((keys == 0) | (keys == DROPPED)).all())


def test_gather_bucket_is_the_buckets_entries_in_index_order() -> None:
    """Every bucket's gathered magnitudes are its entries in index order, found by stretches of 64
    tested at once and the tail after them: exact zeros stay out of bucket 1 (whose bit range
    starts at 0, as subnormals do), members in the first, last and lone entries of a stretch."""
    _native()
    rng = np.random.default_rng(3)
    n = 64 * 5 + 37  # whole stretches and a tail
    bits = np.zeros(n, dtype=np.uint32)
    bits[[0, 63, 64, 200, n - 1]] = [1, 0xFFFF, 0x10000, 0x3F800000, 5]  # subnormals, bucket 2's first, 1.0
    bits[rng.integers(0, n, 40)] = rng.integers(0x10000, 0x30000, 40)  # buckets 2 and 3
    values = bits.view(np.float32) * rng.choice(np.float32([-1, 1]), n)
    values[[7, 100]] = -0.0
    counts = magnitude_sketch.histogram(values)
    assert counts is not None
    magnitudes = np.abs(values)
    for bucket in map(int, np.flatnonzero(counts)):
        gathered = magnitude_sketch.gather_bucket(values, bucket, int(counts[bucket]))
        member = magnitudes.view(np.uint32) == 0 if bucket == 0 else (
            (magnitudes.view(np.uint32) >> 16 == bucket - 1) & (magnitudes != 0))
        assert np.array_equal(gathered.view(np.uint32), magnitudes[member].view(np.uint32))
    assert counts[0] >= 2 and counts[1] >= 1  # zeros and bucket 1 side by side were tested


def test_delta_gather_forms_the_delta_and_gathers_its_bucket() -> None:
    """The lean engine's one pass over two bf16 tensors: the delta ``fused.bf16_delta`` forms (torch's
    cast and subtraction) and that delta's bucket, as ``gather_bucket`` finds it after (tail included);
    over two float32 tensors, torch's subtraction."""
    _native()
    from merges.methods.fused import bf16_delta, native_library

    generator = torch.Generator().manual_seed(9)
    base = torch.randn(64 * 40 + 13, generator=generator).mul_(0.02).bfloat16()
    source = (base.float() + torch.randn(base.numel(), generator=generator).mul_(0.002)).bfloat16()
    expected = source.float() - base.float()
    counts = magnitude_sketch.histogram(expected.numpy())
    assert counts is not None
    lib = native_library()
    if lib is not None:
        assert torch.equal(bf16_delta(lib, source, base, torch.empty_like(expected)).view(torch.int32),
                           expected.view(torch.int32))
    for bucket in map(int, np.argsort(counts)[-3:]):  # the fullest buckets
        delta = np.full(base.numel(), np.nan, dtype=np.float32)
        gathered = magnitude_sketch.delta_gather(source.view(torch.int16).numpy(), base.view(torch.int16).numpy(),
                                                 delta, bucket, int(counts[bucket]))
        assert np.array_equal(delta.view(np.uint32), expected.numpy().view(np.uint32))
        assert np.array_equal(gathered.view(np.uint32), magnitude_sketch.gather_bucket(
            expected.numpy(), bucket, int(counts[bucket])).view(np.uint32))
    source32, base32 = source.float().add_(1e-4), base.float()  # not bf16 values: a float32 rounding
    expected32 = torch.sub(source32, base32).numpy()
    counts32 = magnitude_sketch.histogram(expected32)
    assert counts32 is not None
    for bucket in map(int, np.argsort(counts32)[-3:]):
        wide = np.full(base.numel(), np.nan, dtype=np.float32)
        again = magnitude_sketch.delta_gather(source32.numpy(), base32.numpy(), wide, bucket, int(counts32[bucket]))
        assert np.array_equal(wide.view(np.uint32), expected32.view(np.uint32))
        assert np.array_equal(again.view(np.uint32), magnitude_sketch.gather_bucket(
            expected32, bucket, int(counts32[bucket])).view(np.uint32))


def test_nan_and_a_wrong_tied_value_are_refused() -> None:
    """No histogram with a NaN (no bucket order); a value that is not the cut's: None."""
    _native()
    assert magnitude_sketch.histogram(np.float32([1.0, np.nan, 2.0])) is None
    values = torch.tensor([3.0, 1.0, 1.0, 1.0, 0.5])
    assert tie_order.tied_cut_keys(values, 2, 1.0, descending=True) is not None
    assert tie_order.tied_cut_keys(values, 2, 0.5, descending=True) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_engine_with_sketches_matches_resident(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    dtype: torch.dtype) -> None:
    """A bf16-like tied family with every tensor sketched: lean TIES takes its cuts from the sketch
    and its tied cuts from the one-run replay, and merges the resident plan's tensors bit for bit.
    Stored in float32 or bf16, its task vectors are never formed (``PairDelta``: the cuts' buckets
    gathered from the sources and the base in one pass, a tied run's dropped entries as a bitmap), except where the
    recipe rescales: then a cut's bucket is gathered as its delta is formed (``delta_gather``) and
    the replay zeroes the dropped entries in place."""
    _native()
    from tests.checkpoints import quantised_family
    from tests.test_tie_order import record_replays

    monkeypatch.setattr(magnitude_sketch, "MIN_NUMEL", 1)
    quantised_family(tmp_path, seed=5, source_seed=200, dtype=dtype)
    fused_gathers = record_replays(monkeypatch, "delta_gather", magnitude_sketch)
    many_gathers = record_replays(monkeypatch, "pair_gather_many", magnitude_sketch)
    base = open_checkpoint(tmp_path / "base")
    sources = [open_checkpoint(tmp_path / f"source{i}") for i in range(2)]
    applied = record_replays(monkeypatch, "tied_cut_apply")
    keyed = record_replays(monkeypatch, "tied_cut_keys")
    dropped = record_replays(monkeypatch, "tied_cut_drops")
    lean = MergeEngine(base, sources, device="cpu", plan="lean", threads=2)
    resident = MergeEngine(base, sources, device="cpu", plan="resident", threads=2)
    assert lean._sketch and len(lean._sketch) == 2 * len(lean._names)
    paths = [str(tmp_path / f"source{i}") for i in range(2)]
    for densities in ([0.35, 0.6], [0.5, 0.9], [0.0, 1.0]):
        r = Recipe.uniform("ties", str(tmp_path / "base"), paths, 2,
                           {"weight": [0.7, 0.4], "density": densities})
        merged = lean.materialize(r)
        for name, tensor in resident.materialize(r).items():
            assert torch.equal(merged[name], tensor), (densities, name)
    # every source's cut found in one pass over the tensors per tensor (the planner's prefetch)
    assert dropped and all(dropped) and many_gathers and not applied and not keyed and not fused_gathers
    # rescaled: the L1 norm before the cut, then the cut in place (mergekit's rescale, bit for bit)
    r = Recipe.uniform("ties", str(tmp_path / "base"), paths, 2, {"weight": [0.7, 0.4], "density": [0.35, 0.6]},
                       {"rescale": True})
    merged = lean.materialize(r)
    for name, tensor in resident.materialize(r).items():
        assert torch.equal(merged[name], tensor), ("rescale", name)
    # each delta read by one item only: the replay zeroes its dropped entries in place
    assert applied and all(applied) and not keyed
    assert fused_gathers and all(fused_gathers)  # held float32 or bf16: a cut's bucket found as its delta is formed
    # the same source twice (one task vector, two densities): each item its own bitmap, no keys
    twice = [paths[0], paths[0]]
    calls = len(dropped)
    r = Recipe.uniform("ties", str(tmp_path / "base"), twice, 2, {"weight": [0.7, 0.4], "density": [0.35, 0.6]})
    merged = lean.materialize(r)
    for name, tensor in resident.materialize(r).items():
        assert torch.equal(merged[name], tensor), name
    assert len(dropped) > calls and all(dropped) and not keyed


@given(st.integers(1, 300), st.integers(-2, 305))
@settings(max_examples=60, deadline=None)
def test_magnitude_band_reads_only_the_positions_it_names(numel: int, keep: int) -> None:
    """``sparsify.magnitude_band_positions`` names every position ``magnitude_band`` reads (a lean
    engine gathers those before the band is asked for)."""
    from merges.methods import sparsify

    read: set[int] = set()

    class Recording:
        def numel(self) -> int:
            return numel

        def __getitem__(self, index: int) -> float:
            read.add(index)
            return float(index // 3)  # ties in runs of three: both branches of the tie test

    sparsify.magnitude_band(Recording(), keep)  # type: ignore[arg-type]
    assert read <= set(sparsify.magnitude_band_positions(numel, keep))  # (a zero at the cut reads one less)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_pass_gather_of_several_sources_is_each_sources_gather(dtype: torch.dtype) -> None:
    """``pair_gather_many`` gives each source what ``gather_bucket`` gives its formed delta bucket by bucket (a range
    of two buckets included), and ``SketchedOrder.supply`` files them so the order's values match."""
    _native()
    generator = torch.Generator().manual_seed(11)
    n = 10_007
    base = torch.randn(n, generator=generator).mul_(0.02).to(dtype)
    sources = [(base.float() + torch.randn(n, generator=generator).mul_(0.002)).to(dtype) for _ in range(3)]
    bits = {torch.bfloat16: torch.int16}.get(dtype, dtype)
    deltas = [(s.float() - base.float()).numpy() for s in sources]
    counts = [magnitude_sketch.histogram(d) for d in deltas]
    buckets = []
    for c in counts:
        assert c is not None
        nonzero = [b for b in np.nonzero(c)[0].tolist() if b > 0]
        buckets.append((nonzero[len(nonzero) // 2], nonzero[len(nonzero) // 2 + 1]))
    found = magnitude_sketch.pair_gather_many(
        [s.view(bits).numpy() for s in sources], base.view(bits).numpy(), buckets,
        [int(c[first:last + 1].sum()) for c, (first, last) in zip(counts, buckets, strict=True)])
    for source, c, (first, last), values in zip(sources, counts, buckets, found, strict=True):
        delta = (source.float() - base.float()).numpy()  # the formed task vector, gathered bucket by bucket
        one = np.concatenate([magnitude_sketch.gather_bucket(delta, b, int(c[b])) for b in range(first, last + 1)])
        assert np.array_equal(np.sort(one.view(np.uint32)), np.sort(values.view(np.uint32)))
    ascending = np.sort(np.abs(deltas[0]))
    order = magnitude_sketch.SketchedOrder(counts[0], lambda b, k: pytest.fail("gathered again"))
    first, last = buckets[0]
    order.supply(first, last, found[0])
    start = int(counts[0][:first].sum())
    for index in (start, start + int(counts[0][first]) - 1, start + int(counts[0][first])):
        assert order[index] == ascending[index]
