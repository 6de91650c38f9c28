"""Genome: gene spaces, decode/encode as exact inverses on the grid, frankenmerges, errors."""

from __future__ import annotations

import math

import optuna
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from genome import (
    Bounds,
    FrankenSpec,
    GenomeError,
    GenomeSpec,
    check_sources,
    decode,
    encode,
    gene_space,
    is_numeric,
    layer_groups,
)
from genome.spec import METHOD_GENES, known_methods
from merges.methods.registry import METHODS, REQUIRED, validate_recipe
from merges.recipe import ROLES, LayerSlice, Recipe

SOURCES = {"shipping": "/fam/shipping", "refunds": "/fam/refunds", "catalog": "/fam/catalog"}
BASE = "/fam/base"


def ties_spec(**kwargs: object) -> GenomeSpec:
    args: dict[str, object] = dict(
        method="ties", layer_granularity=2, weight=Bounds(0.0, 1.5, 0.05), density=Bounds(0.1, 1.0, 0.05),
        lambda_=Bounds(0.5, 1.5), fixed={"normalize": True},
    )
    args.update(kwargs)
    return GenomeSpec(**args)  # type: ignore[arg-type]


# -- gene spaces ----------------------------------------------------------------------


def test_ties_space_has_weight_and_density_per_group_and_source_plus_lambda() -> None:
    space = gene_space(ties_spec(), sources=SOURCES, n_layers=4)
    expected = [
        f"g{g}.{param}.{label}" for g in (0, 1) for param in ("weight", "density") for label in SOURCES
    ] + ["lambda"]
    assert list(space) == expected
    assert space["g1.density.refunds"] == FloatDistribution(0.1, 1.0, step=0.05)
    assert space["lambda"] == FloatDistribution(0.5, 1.5)


def test_granularity_zero_is_one_group_and_uneven_granularity_leaves_a_short_last_group() -> None:
    assert layer_groups(GenomeSpec("linear", layer_granularity=0), 5) == ((0, 5),)
    assert layer_groups(GenomeSpec("linear", layer_granularity=2), 5) == ((0, 2), (2, 4), (4, 5))
    space = gene_space(GenomeSpec("linear", layer_granularity=0), sources=SOURCES, n_layers=5)
    assert list(space) == ["g0.weight.shipping", "g0.weight.refunds", "g0.weight.catalog"]


def test_per_role_and_embed_head_genes() -> None:
    spec = GenomeSpec("dare_ties", layer_granularity=0, per_role=True, embed_head=True, density=Bounds(0.2, 0.8))
    space = gene_space(spec, sources=["a", "b"], n_layers=3)
    owners = ["embed", "g0.attention", "g0.mlp", "g0.norm", "head"]
    assert list(space) == [f"{o}.{p}.{s}" for o in owners for p in ("weight", "density") for s in "ab"]
    assert "g1.attention.density.b" not in space


def test_slerp_has_t_per_group_and_no_weight() -> None:
    spec = GenomeSpec("slerp", layer_granularity=1, t=Bounds(0.0, 1.0, 0.1))
    assert spec.weight is None  # the default weight bounds do not apply to slerp
    space = gene_space(spec, sources={"shipping": "/fam/shipping"}, n_layers=3)
    assert list(space) == ["g0.t", "g1.t", "g2.t"]


def test_frankenmerge_space_is_categorical_with_optional_index_genes() -> None:
    same = GenomeSpec("passthrough", frankenmerge=FrankenSpec())
    space = gene_space(same, sources=SOURCES, n_layers=4)
    assert list(space) == [f"layer{i}.source" for i in range(4)]
    assert space["layer2.source"] == CategoricalDistribution(tuple(SOURCES))
    anyi = GenomeSpec(
        "passthrough",
        frankenmerge=FrankenSpec(layers=6, pick="any_index", include_base=True, layer_range=(1, 4)),
    )
    space = gene_space(anyi, sources=SOURCES, n_layers=4)
    assert len(space) == 12
    assert space["layer5.source"] == CategoricalDistribution(("base", *SOURCES))
    assert space["layer5.index"] == IntDistribution(1, 3)


def test_genome_method_table_agrees_with_the_engine_registry() -> None:
    """Genes may only produce parameters the engine knows, with its required ones and source counts."""
    assert set(known_methods()) == set(METHOD_GENES) & set(METHODS)
    for name in known_methods():
        genes, engine = METHOD_GENES[name], METHODS[name]
        assert set(genes.source_params) <= set(engine.tensor_params), name
        assert set(genes.global_params) <= set(engine.global_params), name
        assert genes.needs_weight == (engine.tensor_params.get("weight", 0.0) is REQUIRED), name
        assert genes.needs_t == (engine.global_params.get("t", 0.0) is REQUIRED), name
        if name != "passthrough":  # frankenmerges choose among all sources
            assert (genes.min_sources, genes.max_sources) == (engine.min_sources, engine.max_sources), name


def test_categorical_detection() -> None:
    assert is_numeric(ties_spec())
    assert is_numeric(GenomeSpec("slerp", t=Bounds(0, 1)))
    assert not is_numeric(GenomeSpec("passthrough", frankenmerge=FrankenSpec()))


# -- decode ---------------------------------------------------------------------------


def on_grid(space: dict[str, BaseDistribution], k: int) -> dict[str, float | int | str]:
    """A deterministic point of the space: the k-th grid value of each gene (wrapping)."""
    params: dict[str, float | int | str] = {}
    for i, (name, d) in enumerate(space.items()):
        if isinstance(d, FloatDistribution):
            b = Bounds(d.low, d.high, d.step)
            params[name] = b.snap(d.low + ((k + i) % 7) / 6 * (d.high - d.low))
        elif isinstance(d, IntDistribution):
            params[name] = d.low + (k + i) % (d.high - d.low + 1)
        else:
            assert isinstance(d, CategoricalDistribution)
            params[name] = d.choices[(k + i) % len(d.choices)]
    return params


def test_decode_fills_recipe_tables_by_group_and_role() -> None:
    spec = ties_spec()
    space = gene_space(spec, sources=SOURCES, n_layers=4)
    params = on_grid(space, 3)
    recipe = decode(spec, params, base=BASE, sources=SOURCES, n_layers=4, seed=7)
    assert recipe.method == "ties" and recipe.base == BASE and recipe.seed == 7
    assert recipe.sources == tuple(SOURCES.values())
    assert recipe.groups == ((0, 2), (2, 4))
    for g in (0, 1):
        for role in ROLES:
            assert recipe.tensor_values("weight", g, role) == tuple(params[f"g{g}.weight.{s}"] for s in SOURCES)
            assert recipe.tensor_values("density", g, role) == tuple(params[f"g{g}.density.{s}"] for s in SOURCES)
            assert recipe.global_value("lambda", g, role) == params["lambda"]
            assert recipe.global_value("normalize", g, role) is True


def test_per_role_norm_gene_is_the_catch_all_for_embed_and_head() -> None:
    spec = GenomeSpec("linear", layer_granularity=2, per_role=True)
    space = gene_space(spec, sources=["a", "b"], n_layers=4)
    params = {name: round(0.01 * i, 2) for i, name in enumerate(space)}
    recipe = decode(spec, params, base=BASE, sources=["a", "b"], n_layers=4, seed=0)
    assert recipe.tensor_values("weight", 0, "embed") == (params["g0.norm.weight.a"], params["g0.norm.weight.b"])
    assert recipe.tensor_values("weight", 1, "head") == (params["g1.norm.weight.a"], params["g1.norm.weight.b"])
    assert recipe.tensor_values("weight", 1, "mlp") == (params["g1.mlp.weight.a"], params["g1.mlp.weight.b"])


def test_embed_head_genes_fill_the_embed_and_head_rows() -> None:
    spec = GenomeSpec("linear", layer_granularity=1, embed_head=True)
    space = gene_space(spec, sources=["a", "b"], n_layers=2)
    params = {name: round(0.05 * i, 2) for i, name in enumerate(space)}
    recipe = decode(spec, params, base=BASE, sources=["a", "b"], n_layers=2, seed=0)
    assert recipe.tensor_values("weight", 0, "embed") == (params["embed.weight.a"], params["embed.weight.b"])
    assert recipe.tensor_values("weight", 1, "head") == (params["head.weight.a"], params["head.weight.b"])
    assert recipe.tensor_values("weight", 1, "attention") == (params["g1.weight.a"], params["g1.weight.b"])


def test_decode_snaps_to_the_grid_and_refuses_values_outside_bounds() -> None:
    spec = GenomeSpec("linear", layer_granularity=0, weight=Bounds(0.0, 1.0, 0.05))
    params = {"g0.weight.a": 0.337, "g0.weight.b": 0.1 + 0.2}  # 0.30000000000000004 -> 0.3
    recipe = decode(spec, params, base=BASE, sources=["a", "b"], n_layers=2, seed=0)
    assert recipe.tensor_values("weight", 0, "mlp") == (0.35, 0.3)
    with pytest.raises(GenomeError, match=r"params\.g0\.weight\.b: 1\.2 is outside \[0, 1\] step 0\.05"):
        decode(spec, {"g0.weight.a": 0.5, "g0.weight.b": 1.2}, base=BASE, sources=["a", "b"], n_layers=2, seed=0)
    with pytest.raises(GenomeError, match="missing gene 'g0.weight.b'"):
        decode(spec, {"g0.weight.a": 0.5}, base=BASE, sources=["a", "b"], n_layers=2, seed=0)
    with pytest.raises(GenomeError, match="unknown gene 'g9.weight.a'"):
        decode(spec, {"g0.weight.a": 0.5, "g0.weight.b": 0.5, "g9.weight.a": 0.1}, base=BASE,
               sources=["a", "b"], n_layers=2, seed=0)


def test_frankenmerge_decodes_to_collapsed_layer_slices() -> None:
    spec = GenomeSpec("passthrough", frankenmerge=FrankenSpec(layers=6, pick="any_index", include_base=True))
    picks = [("shipping", 0), ("shipping", 1), ("shipping", 2), ("base", 3), ("base", 0), ("base", 1)]
    params: dict[str, float | int | str] = {}
    for i, (source, index) in enumerate(picks):
        params[f"layer{i}.source"] = source
        params[f"layer{i}.index"] = index
    recipe = decode(spec, params, base=BASE, sources=SOURCES, n_layers=4, seed=0)
    assert recipe.layer_slices == (
        LayerSlice("/fam/shipping", 0, 3), LayerSlice(BASE, 3, 4), LayerSlice(BASE, 0, 2),
    )
    assert recipe.groups == ((0, 3), (3, 4), (4, 6))
    assert encode(spec, recipe, sources=SOURCES, n_layers=4) == params


def test_same_index_frankenmerge_collapses_runs_of_one_source() -> None:
    spec = GenomeSpec("passthrough", frankenmerge=FrankenSpec())
    params = {"layer0.source": "refunds", "layer1.source": "refunds", "layer2.source": "catalog",
              "layer3.source": "refunds"}
    recipe = decode(spec, params, base=BASE, sources=SOURCES, n_layers=4, seed=0)
    assert recipe.layer_slices == (
        LayerSlice("/fam/refunds", 0, 2), LayerSlice("/fam/catalog", 2, 3), LayerSlice("/fam/refunds", 3, 4),
    )
    with pytest.raises(GenomeError, match=r"params\.layer1\.source: 'nope' is not one of"):
        decode(spec, {**params, "layer1.source": "nope"}, base=BASE, sources=SOURCES, n_layers=4, seed=0)


# -- encode / decode are inverses -----------------------------------------------------


@st.composite
def spec_and_point(draw: st.DrawFn) -> tuple[GenomeSpec, dict[str, str], int, dict[str, float | int | str]]:
    """A random genome (numeric or frankenmerge), sources, layer count, and an on-grid point."""
    n_sources = draw(st.integers(1, 3))
    sources = {f"s{i}": f"/ckpt/s{i}" for i in range(n_sources)}
    n_layers = draw(st.integers(1, 6))
    kind = draw(st.sampled_from(["linear", "ties", "dare_linear", "task_arithmetic", "slerp", "passthrough"]))
    step = draw(st.sampled_from([None, 0.05, 0.1, 0.25]))
    if kind == "passthrough":
        pick = draw(st.sampled_from(["same_index", "any_index"]))
        franken = FrankenSpec(
            layers=draw(st.integers(1, n_layers if pick == "same_index" else 8)), pick=pick, include_base=True,
        )
        spec = GenomeSpec("passthrough", frankenmerge=franken)
    elif kind == "slerp":
        sources = {"s0": "/ckpt/s0"}
        spec = GenomeSpec("slerp", layer_granularity=draw(st.integers(0, 3)), per_role=draw(st.booleans()),
                          embed_head=draw(st.booleans()), t=Bounds(0.0, 1.0, step))
    else:
        spec = GenomeSpec(
            kind, layer_granularity=draw(st.integers(0, 3)), per_role=draw(st.booleans()),
            embed_head=draw(st.booleans()), weight=Bounds(-0.5, 1.5, step),
            density=Bounds(0.0, 1.0, step) if kind in ("ties", "dare_linear") else None,
            lambda_=Bounds(0.5, 1.5, step) if kind != "linear" and draw(st.booleans()) else None,
        )
    space = gene_space(spec, sources=sources, n_layers=n_layers)
    point: dict[str, float | int | str] = {}
    for name, d in space.items():
        if isinstance(d, CategoricalDistribution):
            point[name] = draw(st.sampled_from(d.choices))
        elif isinstance(d, IntDistribution):
            point[name] = draw(st.integers(d.low, d.high))
        else:
            assert isinstance(d, FloatDistribution)
            b = Bounds(d.low, d.high, d.step)
            if d.step is None:
                point[name] = draw(st.floats(d.low, d.high, allow_nan=False))
            else:
                point[name] = b.snap(d.low + draw(st.integers(0, round((d.high - d.low) / d.step))) * d.step)
    return spec, sources, n_layers, point


@settings(max_examples=150, deadline=None)
@given(spec_and_point())
def test_encode_inverts_decode(case: tuple[GenomeSpec, dict[str, str], int, dict[str, float | int | str]]) -> None:
    spec, sources, n_layers, params = case
    recipe = decode(spec, params, base=BASE, sources=sources, n_layers=n_layers, seed=3)
    validate_recipe(recipe)  # the merge engine accepts every decoded recipe
    assert encode(spec, recipe, sources=sources, n_layers=n_layers) == params
    again = decode(spec, encode(spec, recipe, sources=sources, n_layers=n_layers), base=BASE,
                   sources=sources, n_layers=n_layers, seed=3)
    assert again == recipe
    assert Recipe.from_dict(recipe.to_dict()) == recipe


@settings(max_examples=60, deadline=None)
@given(
    weights=st.lists(st.integers(0, 20), min_size=3, max_size=3),
    density=st.integers(2, 20),
    n_layers=st.integers(1, 5),
)
def test_decode_inverts_encode_for_a_users_uniform_recipe(weights: list[int], density: int, n_layers: int) -> None:
    """A recipe written by hand (mergekit ``models:`` form) on the grid round-trips exactly."""
    spec = GenomeSpec("ties", layer_granularity=0, weight=Bounds(0.0, 1.0, 0.05), density=Bounds(0.1, 1.0, 0.05),
                      fixed={"normalize": True})
    recipe = Recipe.uniform(
        "ties", BASE, tuple(SOURCES.values()), n_layers,
        tensor_params={"weight": [round(w * 0.05, 2) for w in weights], "density": [round(density * 0.05, 2)] * 3},
        global_params={"normalize": True},
    )
    params = encode(spec, recipe, sources=SOURCES)
    assert params["g0.weight.refunds"] == round(weights[1] * 0.05, 2)
    assert decode(spec, params, base=BASE, sources=SOURCES, n_layers=n_layers, seed=0) == recipe


def test_encoded_params_enqueue_into_optuna_unchanged() -> None:
    """Baselines are enqueued as encoded params: Optuna must hand the same values back."""
    spec = ties_spec()
    space = gene_space(spec, sources=SOURCES, n_layers=4)
    params = encode(spec, decode(spec, on_grid(space, 5), base=BASE, sources=SOURCES, n_layers=4, seed=0),
                    sources=SOURCES)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial(params)
    trial = study.ask(space)
    assert trial.params == params
    fresh = study.ask(space)  # a sampled trial decodes too, and encodes back to its params
    recipe = decode(spec, fresh.params, base=BASE, sources=SOURCES, n_layers=4, seed=0)
    assert encode(spec, recipe, sources=SOURCES) == pytest.approx(fresh.params, abs=1e-9)


def test_encode_refuses_recipes_the_genome_cannot_express() -> None:
    spec = GenomeSpec("linear", layer_granularity=0, weight=Bounds(0.0, 1.0, 0.05))
    paths = tuple(SOURCES.values())
    per_layer = Recipe(
        "linear", BASE, paths, ((0, 1), (1, 2)),
        tensor_params={"weight": tuple(tuple((w, 0.5, 0.5) for _ in ROLES) for w in (0.2, 0.4))},
    )
    with pytest.raises(GenomeError, match=r"weight of the attention tensors of layer 1 is \(0\.4, 0\.5, 0\.5\); "
                       r"the genome can only give \(0\.2, 0\.5, 0\.5\) there \(layer groups \[\[0, 2\]\]\)"):
        encode(spec, per_layer, sources=SOURCES)
    off_grid = Recipe.uniform("linear", BASE, paths, 2, tensor_params={"weight": [0.33, 0.5, 0.5]})
    with pytest.raises(GenomeError, match=r"weight 0\.33 for gene g0\.weight\.shipping is not in genome\.weight"):
        encode(spec, off_grid, sources=SOURCES)
    mixed_roles = Recipe(
        "linear", BASE, paths, ((0, 2),),
        tensor_params={"weight": ((tuple((0.5, 0.5, 0.5) if r != "mlp" else (0.1, 0.5, 0.5) for r in ROLES)),)},
    )
    with pytest.raises(GenomeError, match=r"weight of the mlp tensors of layer 0 is \(0\.1, 0\.5, 0\.5\)"):
        encode(spec, mixed_roles, sources=SOURCES)
    extra = Recipe.uniform("linear", BASE, paths, 2, tensor_params={"weight": [0.5] * 3},
                           global_params={"normalize": False})
    with pytest.raises(GenomeError, match=r"add genome\.fixed\.normalize"):
        encode(spec, extra, sources=SOURCES)
    with pytest.raises(GenomeError, match=r"recipe\.method: 'ties', but the genome searches 'linear'"):
        encode(spec, Recipe.uniform("ties", BASE, paths, 2, tensor_params={"weight": [0.5] * 3}), sources=SOURCES)
    reordered = Recipe.uniform("linear", BASE, paths[::-1], 2, tensor_params={"weight": [0.5] * 3})
    with pytest.raises(GenomeError, match=r"recipe\.sources: expected"):
        encode(spec, reordered, sources=SOURCES)


def test_a_one_group_baseline_encodes_into_a_per_group_genome() -> None:
    """Baselines are written as one group; a genome with finer groups repeats their values."""
    spec = ties_spec(lambda_=None, fixed={"normalize": True, "lambda": 1.0})
    paths = tuple(SOURCES.values())
    baseline = Recipe.uniform(
        "ties", BASE, paths, 4, tensor_params={"weight": [0.5, 0.25, 1.0], "density": [0.5, 0.5, 0.5]},
        global_params={"normalize": True, "lambda": 1.0},
    )
    params = encode(spec, baseline, sources=SOURCES)
    assert params["g0.weight.refunds"] == params["g1.weight.refunds"] == 0.25
    recipe = decode(spec, params, base=BASE, sources=SOURCES, n_layers=4, seed=0)
    assert recipe.groups == ((0, 2), (2, 4))
    for layer in range(4):
        for role in ROLES:
            assert recipe.tensor_values("weight", recipe.group_of_layer(layer), role) == (0.5, 0.25, 1.0)
    assert encode(spec, recipe, sources=SOURCES) == params


def test_encode_ignores_rows_no_tensor_reads() -> None:
    """Only group 0's embed row and the last group's head row reach tensors."""
    spec = GenomeSpec("linear", layer_granularity=1)
    paths = ("/a", "/b")
    rows = []
    for g in range(2):
        row = []
        for role in ROLES:
            unused = (role == "embed" and g == 1) or (role == "head" and g == 0)
            row.append((0.9, 0.9) if unused else (0.25 * (g + 1), 0.5))
        rows.append(tuple(row))
    recipe = Recipe("linear", BASE, paths, ((0, 1), (1, 2)), tensor_params={"weight": tuple(rows)})
    params = encode(spec, recipe, sources={"a": "/a", "b": "/b"})
    assert params == {"g0.weight.a": 0.25, "g0.weight.b": 0.5, "g1.weight.a": 0.5, "g1.weight.b": 0.5}


# -- spec errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(method="tiez"), r"genome\.method: unknown method 'tiez' \(known: .*ties"),
        (dict(method="linear", density=Bounds(0.1, 1.0)), r"genome\.density: method 'linear' has no density \(sparsifying"),
        (dict(method="ties", t=Bounds(0, 1)), r"genome\.t: method 'ties' has no t \(methods with t: slerp, nearswap\)"),
        (dict(method="slerp"), r"genome\.t: method 'slerp' needs t"),
        (dict(method="ties", density=Bounds(0.1, 1.5)), r"genome\.density\.max: must be <= 1, got 1\.5"),
        (dict(method="ties", weight=Bounds(1.0, 0.5)), r"genome\.weight: min must be <= max"),
        (dict(method="ties", weight=Bounds(0.0, 1.0, 0.3)), r"genome\.weight\.step: max - min \(1\) must be a whole"),
        (dict(method="ties", weight=Bounds(0.0, math.inf)), r"genome\.weight\.max: expected a finite number"),
        (dict(method="linear", fixed={"rescale": True}), r"genome\.fixed\.rescale: method 'linear' has no parameter"),
        (dict(method="ties", fixed={"normalize": 1.0}), r"genome\.fixed\.normalize: expected true or false"),
        (dict(method="ties", lambda_=Bounds(0, 2), fixed={"lambda": 1.0}), r"genome\.fixed\.lambda: lambda is searched"),
        (dict(method="linear", weight=None), r"genome\.weight: method 'linear' needs per-source weights"),
        (dict(method="passthrough"), r"genome\.frankenmerge: method 'passthrough' needs a frankenmerge table"),
        (dict(method="ties", frankenmerge=FrankenSpec()), r"genome\.frankenmerge: only for method 'passthrough'"),
        (dict(method="passthrough", frankenmerge=FrankenSpec(pick="random")), r"genome\.frankenmerge\.pick: expected one of"),
        (dict(method="ties", layer_granularity=-1), r"genome\.layer_granularity: expected an integer >= 0"),
    ],
)
def test_bad_specs_name_the_field(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(GenomeError, match=message):
        GenomeSpec(**kwargs)  # type: ignore[arg-type]


def test_source_count_and_label_errors() -> None:
    with pytest.raises(GenomeError, match=r"method 'slerp' takes exactly 1 source\(s\) besides the base, got 3"):
        check_sources(GenomeSpec("slerp", t=Bounds(0, 1)), SOURCES)
    with pytest.raises(GenomeError, match=r"method 'model_stock' takes at least 2"):
        check_sources(GenomeSpec("model_stock"), ["a"])
    with pytest.raises(GenomeError, match=r"label 'a\.b' cannot be part of a gene name"):
        gene_space(GenomeSpec("linear"), sources=["a.b"], n_layers=2)
    with pytest.raises(GenomeError, match=r"frankenmerge\.layers: 6 output layers with pick = \"same_index\""):
        gene_space(GenomeSpec("passthrough", frankenmerge=FrankenSpec(layers=6)), sources=SOURCES, n_layers=4)
    with pytest.raises(GenomeError, match=r"needs at least two checkpoints"):
        gene_space(GenomeSpec("passthrough", frankenmerge=FrankenSpec()), sources=["a"], n_layers=4)
