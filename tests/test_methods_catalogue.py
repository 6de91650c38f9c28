"""The method catalogue, and the methods added with it against mergekit 0.1.5's own kernels.

The golden tests (tests/test_mergekit_golden.py) merge whole checkpoints; here the
kernels meet mergekit's ``merge_group`` on random tensors in cases the tiny families
cannot show (three inputs to multislerp: mergekit refuses the zero task vectors of a
tensor no source changed), and the catalogue's own promises are checked.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mergekit.merge_methods import registry as mk_registry
from mergekit.merge_methods.base import PerInputValues, TensorGroup

from genome.errors import GenomeError
from genome.space import decode, encode, gene_space
from genome.spec import METHOD_GENES, Bounds, GenomeSpec
from merges.errors import RecipeError
from merges.methods.multislerp import _dots, coefficients, multislerp
from merges.methods.nearswap import nearswap
from merges.methods.nuslerp import nuslerp
from merges.methods.registry import METHODS, OPTIONAL_BASE, REQUIRED_BASE, validate_recipe
from merges.methods.sce import sce
from merges.recipe import Recipe
from tests.checkpoints import TinyFamily
from tests.studies import run, write_study

RTOL, ATOL = 1e-5, 1e-6


def _tensors(seed: int, count: int, shape: tuple[int, ...] = (6, 10)) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(count)]


def _theirs(method: str, tensors: list[torch.Tensor], base_index: int | None, **params: object
            ) -> torch.Tensor:
    group = TensorGroup.from_tensors(tensors, base_index=base_index)
    if "weight" in params:
        ids = [e.id for e in group.non_base]
        params["weight"] = PerInputValues(list(zip(ids, params["weight"], strict=True)))  # type: ignore[arg-type]
    return mk_registry.get(method).merge_group(group, **params)


def test_catalogue_imports_no_torch() -> None:
    code = ("import sys, merges.methods.registry, genome.spec, search.baselines, merges.mergekit_yaml\n"
            "print(','.join(m for m in ('torch', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


def test_every_method_has_a_planner_and_mergekit_contract() -> None:
    for name, spec in METHODS.items():
        assert callable(importlib.import_module(f"merges.methods.{spec.planner}").plan), name
        contract = mk_registry.get(name).spec.contract
        assert spec.base == contract.base.value or (spec.base == "ignored" and name == "passthrough"), name
        assert name in METHOD_GENES


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("with_base", [True, False])
def test_multislerp_three_inputs_matches_mergekit(seed: int, with_base: bool) -> None:
    *models, base = _tensors(seed, 4)
    weights = [0.2 + 0.1 * seed, 0.5, 0.3]
    theirs = _theirs("multislerp", [*models, base] if with_base else models,
                     3 if with_base else None, weight=weights, normalize_weights=True, eps=1e-8)
    vectors = [m - base for m in models] if with_base else models
    ours = multislerp(vectors, weights, base if with_base else None)
    torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=ATOL)
    # the engine's fused form: coefficients from the inputs' dot products
    c = coefficients(_dots(vectors), weights, normalize_weights=True, eps=1e-8)
    fused = sum(ci * v for ci, v in zip(c, vectors, strict=True)) + (base if with_base else 0)
    torch.testing.assert_close(fused, theirs, rtol=RTOL, atol=ATOL)


def test_multislerp_refuses_cancelling_inputs_by_name() -> None:
    (a,) = _tensors(0, 1)
    with pytest.raises(RecipeError, match="multislerp .tensor 'x'.: the weighted sum"):
        multislerp([a, -a, torch.zeros_like(a)], [1.0, 1.0, 0.0], where=" (tensor 'x')")


@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True)])
def test_nuslerp_matches_mergekit(flatten: bool, row_wise: bool) -> None:
    a, b, base = _tensors(3, 3)
    theirs = _theirs("nuslerp", [a, b, base], 2, weight=[0.3, 0.9], nuslerp_flatten=flatten,
                     nuslerp_row_wise=row_wise)
    ours = base + nuslerp(0.9 / 1.2, a - base, b - base, dim=0 if row_wise else -1, flatten=flatten)
    torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("select_topk", [0.0, 0.3, 1.0])
def test_sce_matches_mergekit(select_topk: float) -> None:
    *models, base = _tensors(4, 4)
    theirs = _theirs("sce", [*models, base], 3, select_topk=select_topk, int8_mask=False)
    ours = sce(base, [m - base for m in models], select_topk=select_topk)
    torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=ATOL)


def test_nearswap_matches_mergekit_and_swaps_near_entries() -> None:
    base, other = _tensors(5, 2)
    other = base + 0.01 * (other - base)
    theirs = _theirs("nearswap", [base, other], 0, t=0.02)
    ours = nearswap(0.02, base, other)
    torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=ATOL)
    near = (base - other).abs() <= 0.02
    assert near.any() and (~near).any()
    assert torch.equal(ours[near], other[near])


def test_source_counts_come_from_the_catalogue() -> None:
    with pytest.raises(RecipeError, match="'nuslerp' needs exactly 2 source"):
        validate_recipe(Recipe.uniform("nuslerp", "/b", ["/s0"], 2, {"weight": [1.0]}))
    with pytest.raises(RecipeError, match="'nearswap' needs exactly 1 source"):
        validate_recipe(Recipe.uniform("nearswap", "/b", ["/s0", "/s1"], 2, global_params={"t": 0.1}))
    with pytest.raises(RecipeError, match="'sce' needs a base model"):
        validate_recipe(Recipe.uniform("sce", None, ["/s0", "/s1"], 2))
    validate_recipe(Recipe.uniform("multislerp", None, ["/s0", "/s1"], 2, {"weight": [1.0, 1.0]}))
    assert METHODS["multislerp"].base == OPTIONAL_BASE and METHODS["sce"].base == REQUIRED_BASE


# -- genes from the catalogue -----------------------------------------------------------------


@pytest.mark.parametrize("method,params,names", [
    ("sce", {"select_topk": Bounds(0.1, 1.0, 0.05)}, ["g0.select_topk", "g1.select_topk"]),
    ("ramplus_tl", {"r": Bounds(0.0, 1.0), "alpha": Bounds(0.0, 0.5)},
     ["g0.r", "g0.alpha", "g1.r", "g1.alpha"]),
])
def test_other_searchable_parameters_are_genes(method: str, params: dict[str, Bounds],
                                               names: list[str]) -> None:
    spec = GenomeSpec(method, layer_granularity=2, params=params)
    space = gene_space(spec, sources=["a", "b"], n_layers=4)
    assert list(space) == names
    point = {name: dist.low for name, dist in space.items()}  # type: ignore[attr-defined]
    recipe = decode(spec, point, base="/b", sources={"a": "/a", "b": "/s"}, n_layers=4, seed=0)
    validate_recipe(recipe)
    assert set(recipe.global_params) == set(params)
    assert encode(spec, recipe, sources={"a": "/a", "b": "/s"}) == point


def test_catalogue_limits_and_owners_name_the_field() -> None:
    with pytest.raises(GenomeError, match=r"genome\.select_topk\.max: must be <= 1"):
        GenomeSpec("sce", params={"select_topk": Bounds(0.1, 1.5)})
    with pytest.raises(GenomeError, match=r"genome\.select_topk: method 'ties' has no select_topk "
                                          r"\(methods with select_topk: sce\)"):
        GenomeSpec("ties", params={"select_topk": Bounds(0.1, 1.0)})
    with pytest.raises(GenomeError, match=r"genome\.fixed\.r: must be >= 0, got -1"):
        GenomeSpec("ramplus_tl", fixed={"r": -1.0})
    assert METHOD_GENES["nuslerp"].needs_weight and METHOD_GENES["nearswap"].needs_t


def test_a_study_searches_select_topk(tmp_path: Path, llama_family: TinyFamily) -> None:
    """study.toml's ``genome.select_topk`` bounds become genes; the untuned baseline takes the
    catalogue's value; every trial's recipe merges."""
    path = write_study(tmp_path, llama_family, trials=2, method="sce",
                       genome_extra="select_topk = { min = 0.2, max = 1.0, step = 0.1 }")
    config, study = run(path)
    assert config.genome.bounds() == {"select_topk": Bounds(0.2, 1.0, 0.1)}
    trials = study.get_trials(deepcopy=False)
    default = next(t for t in trials if t.user_attrs.get("baseline") == "default_sce")
    assert Recipe.from_dict(default.user_attrs["recipe"]).global_params["select_topk"][0][0] == 0.5
    searched = [t for t in trials if "baseline" not in t.user_attrs]
    assert searched and all(set(t.params) == {"g0.select_topk", "g1.select_topk"} for t in searched)
    assert all(t.state.name == "COMPLETE" for t in trials)
