"""Merge methods on small random tensors: algebraic properties, and equality with mergekit's
own tensor functions run in-process. The fused kernels (native C and eager torch) are
checked against the reference functions here too."""

from __future__ import annotations

import os
import shutil
from itertools import pairwise

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mergekit import sparsify as mk_sparsify
from mergekit.merge_methods import registry as mk_registry
from mergekit.merge_methods.base import TensorGroup
from mergekit.merge_methods.slerp import slerp as mk_slerp

from merges.errors import RecipeError
from merges.methods import sparsify as sp
from merges.methods.fused import FusedJob, native_library, run_eager, run_native_many
from merges.methods.linear import linear
from merges.methods.model_stock import model_stock
from merges.methods.native import chunk_spans
from merges.methods.registry import FAMILY, METHODS, validate_recipe
from merges.methods.slerp import slerp
from merges.methods.task_arithmetic import combine, merge_task_vectors, sparsify_delta
from merges.recipe import Recipe

FEW = settings(max_examples=15, deadline=None)
shapes = st.tuples(st.integers(1, 9), st.integers(1, 13))
seeds = st.integers(0, 2**31 - 1)
weights_st = st.lists(st.floats(0.05, 2.0), min_size=3, max_size=3)
densities_st = st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3)
DETERMINISTIC_TV = ("task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties")


def family_tensors(shape: tuple[int, int], seed: int, k: int = 3) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and ``k`` sources: small deltas, some entries left unchanged like a fine-tune."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    sources = []
    for _ in range(k):
        delta = torch.randn(shape, generator=gen) * 0.1
        delta[torch.rand(shape, generator=gen) < 0.2] = 0
        sources.append(base + delta)
    return base, sources


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)


def mergekit_merge(method: str, base: torch.Tensor | None, sources: list[torch.Tensor],
                   **parameters: object) -> torch.Tensor:
    tensors = ([base] if base is not None else []) + sources
    group = TensorGroup.from_tensors(tensors, base_index=0 if base is not None else None)
    (result,) = mk_registry.get(method)([group], parameters=parameters)
    return result


# -- equality with mergekit --------------------------------------------------------------


@FEW
@given(shape=shapes, seed=seeds, density=st.floats(-0.1, 1.1))
def test_magnitude_equals_mergekit_and_keeps_exactly_k(shape: tuple[int, int], seed: int,
                                                        density: float) -> None:
    _, (delta, *_) = family_tensors(shape, seed, 1)
    ours = sp.magnitude(delta, density)
    close(ours, mk_sparsify.magnitude(delta, density))
    if 0 < density < 1:
        assert int((sp.descending_ranks(delta) < sp.magnitude_keep_count(density, delta.numel())).sum()) \
            == max(1, int(density * delta.numel()))
        # the kept entries are the largest ones
        kept = ours != 0
        if kept.any() and (~kept).any():
            assert delta[kept].abs().min() >= delta[~kept].abs().max()


@FEW
@given(shape=shapes, seed=seeds, density=st.floats(0.0, 1.0), gamma=st.floats(0.0, 0.3),
       rescale=st.booleans())
def test_magnitude_outliers_equals_mergekit(shape: tuple[int, int], seed: int, density: float,
                                            gamma: float, rescale: bool) -> None:
    base, (source, *_) = family_tensors(shape, seed, 1)
    delta = source - base
    norm = mk_sparsify.RescaleNorm.l1 if rescale else None
    close(sp.magnitude_outliers(delta, density, gamma, rescale=rescale),
          mk_sparsify.magnitude_outliers(delta, density, norm, gamma=gamma))


@FEW
@given(shape=shapes, seed=seeds, weights=weights_st, densities=densities_st,
       method=st.sampled_from(DETERMINISTIC_TV), lam=st.floats(0.3, 1.5),
       normalize=st.booleans() | st.none(), rescale=st.booleans())
def test_deterministic_task_vector_methods_equal_mergekit(
        shape: tuple[int, int], seed: int, weights: list[float], densities: list[float],
        method: str, lam: float, normalize: bool | None, rescale: bool) -> None:
    base, sources = family_tensors(shape, seed)
    params: dict[str, object] = {"weight": weights, "density": densities, "lambda": lam,
                                 "rescale": rescale}
    if normalize is not None:
        params["normalize"] = normalize
    expected = mergekit_merge(method, base, sources, **params)
    ours = merge_task_vectors(method, base, sources, weights=weights, densities=densities,
                              normalize=normalize, rescale=rescale, lam=lam)
    close(ours, expected)


@FEW
@given(shape=shapes, seed=seeds, weights=weights_st, normalize=st.booleans())
def test_linear_equals_mergekit(shape: tuple[int, int], seed: int, weights: list[float],
                                normalize: bool) -> None:
    _, sources = family_tensors(shape, seed)
    close(linear(sources, weights, normalize=normalize),
          mergekit_merge("linear", None, sources, weight=weights, normalize=normalize))


@FEW
@given(shape=shapes, seed=seeds, t=st.floats(0.0, 1.0), collinear=st.booleans())
def test_slerp_equals_mergekit(shape: tuple[int, int], seed: int, t: float, collinear: bool) -> None:
    base, (other, *_) = family_tensors(shape, seed, 1)
    if collinear:
        other = base * 1.5  # takes mergekit's lerp fallback
    expected = mk_slerp(torch.tensor([t]), base.unsqueeze(0), other.unsqueeze(0)).squeeze(0)
    close(slerp(t, base, other), expected)


@FEW
@given(shape=shapes, seed=seeds, filter_wise=st.booleans(), k=st.integers(2, 4))
def test_model_stock_equals_mergekit(shape: tuple[int, int], seed: int, filter_wise: bool,
                                     k: int) -> None:
    base, sources = family_tensors(shape, seed, k)
    close(model_stock(base, sources, filter_wise=filter_wise),
          mergekit_merge("model_stock", base, sources, filter_wise=filter_wise))


def test_dare_and_della_match_mergekit_in_distribution() -> None:
    """Random masks differ from mergekit's global RNG, their statistics must not."""
    gen = torch.Generator().manual_seed(3)
    delta = torch.randn(200, 200, generator=gen)
    torch.manual_seed(0)
    theirs = mk_sparsify.bernoulli(delta, 0.3, mk_sparsify.RescaleNorm.l1)
    ours = sp.bernoulli(delta, 0.3, generator=gen, rescale=True)
    assert abs(float((ours != 0).float().mean()) - float((theirs != 0).float().mean())) < 0.02
    close(ours.abs().sum(), theirs.abs().sum())
    theirs = mk_sparsify.della_magprune(delta, 0.4, 0.2, mk_sparsify.RescaleNorm.l1)
    ours = sp.della_magprune(delta, 0.4, 0.2, generator=gen, rescale=True)
    assert abs(float((ours != 0).float().mean()) - float((theirs != 0).float().mean())) < 0.02
    # DELLA keeps large entries more often than small ones, in both
    big = delta.abs() > delta.abs().median()
    assert float((ours != 0)[big].float().mean()) > float((ours != 0)[~big].float().mean()) + 0.1


# -- properties ------------------------------------------------------------------------


@FEW
@given(shape=shapes, seed=seeds, chosen=st.integers(0, 2), weight=st.floats(0.1, 3.0))
def test_weight_on_one_source_gives_that_source(shape: tuple[int, int], seed: int, chosen: int,
                                                weight: float) -> None:
    base, sources = family_tensors(shape, seed)
    weights = [0.0, 0.0, 0.0]
    weights[chosen] = weight
    # linear normalises by the weight sum; ties normalises by the weights that agree
    close(linear(sources, weights), sources[chosen])
    close(merge_task_vectors("ties", base, sources, weights=weights), sources[chosen])
    # task arithmetic does not normalise: the weight scales the task vector
    one = [1.0 if i == chosen else 0.0 for i in range(3)]
    close(merge_task_vectors("task_arithmetic", base, sources, weights=one), sources[chosen])
    close(merge_task_vectors("task_arithmetic", base, sources, weights=weights),
          base + weight * (sources[chosen] - base))


@FEW
@given(shape=shapes, seed=seeds, weights=weights_st, t=st.floats(0.0, 1.0))
def test_equal_sources_give_that_tensor(shape: tuple[int, int], seed: int, weights: list[float],
                                        t: float) -> None:
    base, (source, *_) = family_tensors(shape, seed, 1)
    same = [source.clone() for _ in range(3)]
    gen = torch.Generator().manual_seed(seed)
    close(linear(same, weights), source)
    for method in FAMILY:
        normalize = True  # the family averages task vectors only when normalising
        got = merge_task_vectors(method, base, same, weights=weights, normalize=normalize,
                                 generators=[gen] * 3)
        close(got, source)
    close(slerp(t, source, source.clone()), source)
    close(model_stock(base, same), source)


@FEW
@given(shape=shapes, seed=seeds, weight=st.floats(-2.0, 2.0), lam=st.floats(0.2, 2.0))
def test_ties_density_one_single_source_is_task_arithmetic(shape: tuple[int, int], seed: int,
                                                           weight: float, lam: float) -> None:
    base, (source, *_) = family_tensors(shape, seed, 1)
    ties = merge_task_vectors("ties", base, [source], weights=[weight], densities=[1.0],
                              normalize=False, lam=lam)
    ta = merge_task_vectors("task_arithmetic", base, [source], weights=[weight], lam=lam)
    close(ties, ta)


@FEW
@given(shape=shapes, seed=seeds)
def test_slerp_endpoints(shape: tuple[int, int], seed: int) -> None:
    base, (other, *_) = family_tensors(shape, seed, 1)
    close(slerp(0.0, base, other), base)
    close(slerp(1.0, base, other), other)


@FEW
@given(seed=seeds, density=st.floats(0.05, 0.95))
def test_dare_keep_fraction_and_seed(seed: int, density: float) -> None:
    delta = torch.randn(4000, generator=torch.Generator().manual_seed(seed)) + 5.0  # no zeros
    first = sp.bernoulli(delta, density, generator=torch.Generator().manual_seed(seed))
    again = sp.bernoulli(delta, density, generator=torch.Generator().manual_seed(seed))
    other = sp.bernoulli(delta, density, generator=torch.Generator().manual_seed(seed + 1))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    n = delta.numel()
    kept = int((first != 0).sum())
    sd = (n * density * (1 - density)) ** 0.5
    assert abs(kept - n * density) <= 5 * sd  # binomial tolerance


@FEW
@given(shape=shapes, seed=seeds, density=st.floats(0.05, 0.95),
       kind=st.sampled_from(["magnitude", "random", "magnitude_outliers", "della_magprune"]))
def test_rescale_preserves_l1_norm(shape: tuple[int, int], seed: int, density: float,
                                   kind: str) -> None:
    base, (source, *_) = family_tensors(shape, seed, 1)
    delta = source - base
    epsilon = min(density, 1 - density) / 2
    out = sparsify_delta(delta, kind, density=density, rescale=True, epsilon=epsilon,
                         generator=torch.Generator().manual_seed(seed))
    if float(out.abs().sum()) >= sp.RESCALE_EPS:  # mergekit leaves an all-dropped delta at zero
        close(out.abs().sum(), delta.abs().sum())


# -- the fused kernels equal the reference -------------------------------------------------


def _fused_job(method: str, base: torch.Tensor, sources: list[torch.Tensor], weights: list[float],
               densities: list[float], lam: float, seed: int) -> tuple[FusedJob, torch.Tensor]:
    """A FusedJob for ``method`` plus the reference result (same masks)."""
    family = FAMILY[method]
    flat = base.reshape(-1)
    deltas = [(s - base).reshape(-1) for s in sources]
    keys, windows, sparse = [], [], []
    for i, delta in enumerate(deltas):
        density = densities[i]
        if family.sparsification == "magnitude" and density < 1:
            keys.append(sp.descending_ranks(delta))
            windows.append((0, sp.magnitude_keep_count(density, delta.numel())))
            sparse.append(sp.magnitude(delta, density, rescale=family.default_rescale))
        elif family.sparsification == "random" and density < 1:
            gen = torch.Generator().manual_seed(seed + i)
            key = sp.random_keys(delta.shape, gen)
            keys.append(key)
            windows.append((0, sp.key_threshold(density)))
            sparse.append(sp.bernoulli(delta, density, generator=gen, keys=key, rescale=False))
        else:
            keys.append(None)
            windows.append((0, 0))
            sparse.append(delta)
    expected = combine(flat, sparse, weights, consensus=family.consensus,
                       normalize=family.default_normalize, lam=lam)
    divisor = float(torch.tensor(weights).sum())
    job = FusedJob(torch.empty_like(flat), flat, deltas, weights, keys=keys, windows=windows,
                   consensus=family.consensus, normalize=family.default_normalize,
                   divisor=divisor if abs(divisor) >= 1e-8 else 1.0, lam=lam)
    return job, expected


@FEW
@given(shape=shapes, seed=seeds, weights=weights_st, densities=densities_st,
       method=st.sampled_from(["task_arithmetic", "ties", "dare_ties", "dare_linear"]),
       lam=st.floats(0.3, 1.5))
def test_fused_kernels_equal_reference(shape: tuple[int, int], seed: int, weights: list[float],
                                       densities: list[float], method: str, lam: float) -> None:
    base, sources = family_tensors(shape, seed)
    job, expected = _fused_job(method, base, sources, weights, densities, lam, seed)
    run_eager(job, chunk=7)  # odd chunk: the chunk seams must not show
    close(job.out, expected)
    lib = native_library()
    if lib is not None:  # no C compiler: the eager path is what the engine uses
        job.out.zero_()
        assert run_native_many(lib, [job], None) == [0]
        close(job.out, expected)


@given(n=st.integers(0, 5000), chunk=st.integers(1, 700))
def test_chunk_spans_cover_each_entry_once(n: int, chunk: int) -> None:
    # fused and karcher_kernel call their kernels once per span: every entry in exactly one
    spans = chunk_spans(n, chunk)
    assert spans[0][0] == 0 and spans[-1][1] == n
    assert all(end == start for (_, end), (start, _) in pairwise(spans))
    assert all(0 < end - start <= chunk for start, end in spans) or spans == [(0, 0)]


def test_fused_linear_mode_equals_linear() -> None:
    base, sources = family_tensors((6, 10), 5)
    weights = [0.2, 0.5, 1.3]
    flat = base.reshape(-1)
    job = FusedJob(torch.empty_like(flat), flat, [(s - base).reshape(-1) for s in sources],
                   weights, linear=True, normalize=True, divisor=sum(weights))
    expected = linear(sources, weights).reshape(-1)
    run_eager(job)
    close(job.out, expected)
    lib = native_library()
    if lib is not None:
        job.out.zero_()
        run_native_many(lib, [job], None)
        close(job.out, expected)


def test_native_kernel_counts_non_finite() -> None:
    lib = native_library()
    assert lib is not None or shutil.which(os.environ.get("CC", "cc")) is None
    if lib is None:  # without a compiler the engine checks finiteness with torch instead
        return
    flat = torch.zeros(10)
    delta = torch.ones(10)
    job = FusedJob(torch.empty(10), flat, [delta], [0.0], linear=True, normalize=True, divisor=0.0)
    assert run_native_many(lib, [job], None) == [10]


# -- registry ------------------------------------------------------------------------------


def test_registry_defaults_match_mergekit() -> None:
    for name, spec in METHODS.items():
        theirs = {p.name: p for p in mk_registry.get(name).spec.parameters}
        ours = {**spec.tensor_params, **spec.global_params}
        assert set(ours) == set(theirs), name
        for param, default in ours.items():
            mk_default = theirs[param].default
            if param == "scale":  # mergekit's None means "unscaled", our 1.0 multiplies exactly
                assert mk_default is None and default == 1.0
            elif theirs[param].required:
                assert default is None, (name, param)
            else:
                assert default == mk_default, (name, param)


def test_validate_recipe_names_what_is_wrong() -> None:
    ok = Recipe.uniform("ties", "/b", ["/s0", "/s1"], 4, {"weight": [1, 1]})
    validate_recipe(ok)
    with pytest.raises(RecipeError, match="unknown merge method 'tie'.*ties"):
        validate_recipe(Recipe.uniform("tie", "/b", ["/s0"], 4, {"weight": [1]}))
    with pytest.raises(RecipeError, match="'ties' has no per-source parameter 'gamma'"):
        validate_recipe(Recipe.uniform("ties", "/b", ["/s0"], 4, {"weight": [1], "gamma": [0.1]}))
    with pytest.raises(RecipeError, match="'linear' has no global parameter 'lambda'"):
        validate_recipe(Recipe.uniform("linear", None, ["/s0"], 4, {"weight": [1]}, {"lambda": 2.0}))
    with pytest.raises(RecipeError, match="'ties' needs per-source parameter 'weight'"):
        validate_recipe(Recipe.uniform("ties", "/b", ["/s0"], 4, {"density": [0.5]}))
    with pytest.raises(RecipeError, match="'slerp' needs global parameter 't'"):
        validate_recipe(Recipe.uniform("slerp", "/b", ["/s0"], 4))
    with pytest.raises(RecipeError, match="'dare_ties' needs a base"):
        validate_recipe(Recipe.uniform("dare_ties", None, ["/s0"], 4, {"weight": [1]}))


@FEW
@given(shape=shapes, seed=seeds, density=st.floats(0.01, 0.99), gamma=st.floats(0.0, 0.3),
       quantized=st.booleans())
def test_magnitude_bands_equal_mergekit_sorting(shape: tuple[int, int], seed: int, density: float,
                                                gamma: float, quantized: bool) -> None:
    """A value band keeps what mergekit's sort keeps; a nonzero tie across the cut says so."""
    gen = torch.Generator().manual_seed(seed)
    if quantized:  # many equal magnitudes, and zeros
        delta = torch.randint(-3, 4, shape, generator=gen).float() * 0.25
    else:
        delta = torch.randn(shape, generator=gen)
    flat = delta.reshape(-1)
    ordered = sp.sorted_magnitudes(flat)
    assert torch.equal(ordered, torch.sort(flat.abs()).values)
    magnitude = flat.abs()
    keep = sp.magnitude_keep_count(density, flat.numel())
    for band, expected, cuts in [
        (sp.magnitude_band(ordered, keep), sp.magnitude(flat, density),
         [(flat.numel() - keep, flat.numel() - keep - 1)]),
        (sp.outlier_band(ordered, *sp.outlier_window(density, gamma, flat.numel())),
         sp.magnitude_outliers(flat, density, gamma), None),
    ]:
        if band is None:
            assert quantized  # distinct magnitudes never tie
            if cuts:
                inside, outside = cuts[0]
                assert float(ordered[inside]) == float(ordered[outside]) != 0.0
            continue
        got = flat * ((magnitude >= band[0]) & (magnitude <= band[1])).float()
        assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("consensus", [True, False])
def test_pair_deltas_and_drop_bitmaps_equal_formed_deltas(dtype: torch.dtype, consensus: bool) -> None:
    """A task vector the fused pass forms itself (``PairDelta``, float32 or bfloat16 source and base)
    gives the bits of the formed one, eagerly and natively, under a magnitude band, a key window or
    neither; a drop bitmap gives the bits of its entries zeroed in the formed delta (+0.0)."""
    from merges.methods.fused import PairDelta, drop_mask

    generator = torch.Generator().manual_seed(7)
    n = 4099  # not a multiple of a block or a bitmap word
    base = torch.randn(n, generator=generator).mul_(0.02).to(dtype)
    sources = [(base.float() + torch.randn(n, generator=generator).mul_(0.002)).to(dtype) for _ in range(3)]
    formed = [s.float() - base.float() for s in sources]
    drop = torch.zeros(-(-n // 64), dtype=torch.int64)
    for index in torch.randint(0, n, (300,), generator=generator).tolist():
        drop[index // 64] |= 1 << (index % 64) if index % 64 < 63 else -(1 << 63)
    keys = [None, sp.random_keys((n,), torch.Generator().manual_seed(3)), None]
    windows = [(0, 0), (0, sp.key_threshold(0.6)), (0, 0)]
    bands = [(0.001, float("inf")), None, None]
    zeroed = [d.clone() for d in formed]
    zeroed[0][drop_mask(drop, 0, n)] = 0.0
    zeroed[2][drop_mask(drop, 0, n)] = 0.0

    def job(deltas: list, drops: list) -> FusedJob:
        return FusedJob(torch.empty(n), base, deltas, [0.5, 0.3, 0.4], keys=keys, windows=windows, bands=bands,
                        consensus=consensus, normalize=True, divisor=1.2, lam=0.9, drops=drops)

    reference = job(zeroed, [])
    run_eager(reference, chunk=1000)
    pairs = [PairDelta(s, base) for s in sources]
    eager = job(pairs, [drop, None, drop])
    run_eager(eager, chunk=1000)
    assert torch.equal(eager.out.view(torch.int32), reference.out.view(torch.int32))
    lib = native_library()
    if lib is not None:
        for deltas in (pairs, formed):
            native = job(deltas, [drop, None, drop])
            assert run_native_many(lib, [native], None) == [0]
            assert torch.equal(native.out.view(torch.int32), reference.out.view(torch.int32))
