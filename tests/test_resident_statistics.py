"""The new methods' per-tensor statistics (computed once per engine) and their C passes.

The golden tests (tests/test_mergekit_golden.py) compare one merge of a fresh engine with
mergekit. Here: the float32 C passes of ``sce`` and ``nearswap`` against mergekit's own
functions bit for bit on inputs with zeros, signed zeros and ties (what a tiny family seldom
has), and an engine that merges recipes one after another (cached statistics reused, genes
changed between them) gives what a fresh engine gives for each.
"""

from __future__ import annotations

import pytest
import torch
from mergekit.merge_methods import registry as mk_registry
from mergekit.merge_methods.base import TensorGroup

from merges.checkpoint import open_checkpoint
from merges.engine import MergeEngine
from merges.methods import nearswap, sce, sce_kernel
from merges.recipe import Recipe
from tests.checkpoints import TinyFamily

GROUPS = ((0, 2), (2, 4))


def _theirs(method: str, tensors: list[torch.Tensor], **params: object) -> torch.Tensor:
    group = TensorGroup.from_tensors(tensors, base_index=0)
    return mk_registry.get(method).merge_group(group, **params)


def _awkward(seed: int, count: int, n: int = 5000) -> list[torch.Tensor]:
    """A base with signed zeros and ``count`` sources whose deltas have exact zeros."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=generator) * 0.02
    base[:7] = -0.0
    sources = []
    for i in range(count):
        delta = torch.randn(n, generator=generator) * 0.002 * (i + 1)
        delta[torch.rand(n, generator=generator) < 0.2] = 0  # unchanged entries
        sources.append(base + delta)
    return [base, *sources]


@pytest.mark.parametrize("count", [1, 3, 5])
@pytest.mark.parametrize("select_topk", [0.0, 0.37, 1.0])
@pytest.mark.parametrize("n", [1024, 4992, 70_016])  # squares through torch below MIN_ENTRIES or with one source
def test_sce_passes_match_mergekit_bit_for_bit(count: int, select_topk: float, n: int,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    lib = sce_kernel.library()
    if lib is None:
        pytest.skip("no C compiler: the kernel path cannot run here")
    monkeypatch.setattr("merges.methods.karcher_kernel.CHUNK", 256)  # split over threads: same bits
    monkeypatch.setattr("merges.methods.karcher_kernel._threads", lambda: 3)
    base, *models = _awkward(count, count, n)
    deltas = [m - base for m in models]
    assert sce_kernel.supports(base, deltas, base)  # sizes whose dim-0 sums torch adds in order
    order = sce.variance_order(torch.stack(deltas))
    ours = sce.sce_native(lib, base, deltas, select_topk, order, torch.empty_like(base))
    theirs = _theirs("sce", [base, *models], select_topk=select_topk, int8_mask=False)
    assert torch.equal(ours, theirs)
    assert torch.equal(ours.signbit(), theirs.signbit())  # signed zeros too


@pytest.mark.parametrize("threads", [1, 3])
def test_sce_square_sums_are_torchs_sums(threads: int) -> None:
    """The kept squares summed in torch's order, with no ``[K, N]`` squares written: equal bits to
    torch's ``sum(dim=1)`` over rows long enough for its cascade's second level width (2^5 ilp
    rows: over 2^19 of them) and odd tails, whatever torch's thread count."""
    lib = sce_kernel.library()
    if lib is None or sce_kernel.lanes() is None:
        pytest.skip("no C compiler, or torch's sum layout not matched here: torch sums the squares")
    generator = torch.Generator().manual_seed(threads)
    n = (1 << 19) * 4 * sce_kernel.lanes() + 4 * sce_kernel.lanes() * 37 + 11
    deltas = [torch.randn(n, generator=generator) * (j + 1) ** 3 for j in range(3)]
    deltas[1][:999] = -0.0
    position = torch.randperm(n, generator=generator).to(torch.int32)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for where, keep in ((None, 1), (position, n // 3), (None, 0)):
            mask = (torch.ones(n) if keep else torch.zeros(n)) if where is None else (where < keep).float()
            theirs = (torch.stack(deltas) * mask).square().sum(dim=1)
            ours = sce_kernel.square_sums(lib, deltas, where, keep)
            assert ours is not None and torch.equal(ours, theirs)
    finally:
        torch.set_num_threads(previous)
    assert sce_kernel.square_sums(lib, deltas[:1], None, 1) is None  # one row: torch splits it over threads


def test_sce_keeps_mergekits_float32_count() -> None:
    """mergekit's ``int(count_nonzero(var) * density)`` multiplies in float32."""
    assert sce.keep_count(33554432, 0.3) == int(torch.tensor(33554432) * 0.3) == 10066330
    assert int(33554432 * 0.3) == 10066329  # a float64 product would keep one entry fewer


@pytest.mark.parametrize("t", [0.0, 0.001, 0.004, 1.0])
def test_nearswap_pass_matches_mergekit_bit_for_bit(t: float) -> None:
    lib = nearswap.library()
    if lib is None:
        pytest.skip("no C compiler: the kernel path cannot run here")
    base, other = _awkward(7, 1)
    ours = torch.empty_like(base)
    lib.nearswap(0, base.numel(), t, base.data_ptr(), other.data_ptr(), ours.data_ptr())
    theirs = _theirs("nearswap", [base, other], t=t)
    assert torch.equal(ours, theirs) and torch.equal(ours.signbit(), theirs.signbit())


def _recipes(method: str, family: TinyFamily, dtype: str) -> tuple[Recipe, Recipe]:
    """Two recipes of ``method`` whose genes (or fixed values) differ."""
    base, sources = str(family.base), tuple(str(s) for s in family.sources)
    param, first, second = {"sce": ("select_topk", 0.3, 0.8), "ramplus_tl": ("r", 0.5, 0.1),
                            "nearswap": ("t", 0.01, 0.002), "karcher": ("max_iter", 2.0, 10.0),
                            "ram": ("epsilon", 1e-5, 0.01), "arcee_fusion": ("", 0, 0)}[method]
    used = sources[:1] if method in ("nearswap", "arcee_fusion") else sources
    return tuple(  # type: ignore[return-value]
        Recipe(method, base, used, GROUPS, dtype=dtype,
               global_params={**({param: ((value,) * 5, (value * 0.5,) * 5)} if param else {}),
                              # deltas ~2e-2: entries only one source moved by more (ramplus_tl's r)
                              **({"epsilon": ((0.02,) * 5,) * 2} if method == "ramplus_tl" else {})})
        for value in (first, second))


@pytest.mark.parametrize(("method", "dtype"), [
    *((m, "float32") for m in ("sce", "ramplus_tl", "ram", "karcher", "arcee_fusion", "nearswap")),
    ("ramplus_tl", "bfloat16"),  # its float32 merge outside the unique entries
])
def test_an_engine_reusing_its_statistics_merges_as_a_fresh_one(method: str, dtype: str,
                                                                 llama_family: TinyFamily) -> None:
    """Recipe A, recipe B, A again on one engine: A as at first (its statistics reused), B as
    on a fresh engine (the first merge of a fresh engine is mergekit's: the golden tests)."""
    def engine() -> MergeEngine:
        return MergeEngine(open_checkpoint(llama_family.base),
                           [open_checkpoint(p) for p in llama_family.sources], dtype=getattr(torch, dtype),
                           plan="resident")

    first, second = _recipes(method, llama_family, dtype)
    reused = engine()
    before = reused.materialize(first)
    after = reused.materialize(second)
    again = reused.materialize(first)
    fresh = engine().materialize(second)
    for name in before:
        assert torch.equal(again[name], before[name]), name
        assert torch.equal(after[name], fresh[name]), name
    assert any(not torch.equal(after[n], before[n]) for n in before) or method == "arcee_fusion"


def test_the_memory_plan_counts_the_statistics_once_per_tensor() -> None:
    from search.memory import statistics_bytes

    def per_entry(method: str, width: int = 2) -> float:  # 1000 entries, 3 sources
        return statistics_bytes([method], numel=1000, n_sources=3, width=width) / 1000

    assert per_entry("sce") == 4  # variance order, int32
    assert per_entry("ram") == 2  # the merge, bf16
    assert per_entry("ramplus_tl") == 4 + 4  # float32 merge outside unique entries, their indices
    assert per_entry("karcher") == 3 * 2 + 2 and per_entry("arcee_fusion") == 3 * 2 + 2  # + sources
