"""Recipe ⇄ mergekit YAML: structure, exact round trips, mergekit's resolution rules, refusals.

mergekit's own ``evaluate_setting`` is the oracle for how a written setting resolves per
tensor; the end-to-end comparison against real mergekit merges is in
``test_mergekit_golden.py``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mergekit.config import ParameterSetting, evaluate_setting
from pydantic import TypeAdapter

from merges.checkpoint import open_checkpoint
from merges.errors import RecipeError, UnsupportedConfigError
from merges.layout import Layout, TensorInfo
from merges.mergekit_yaml import (
    recipe_from_mergekit,
    recipe_to_mergekit,
    rename_models,
    role_filters,
)
from merges.methods.registry import METHODS
from merges.recipe import ROLES, LayerSlice, Recipe
from tests.checkpoints import TinyFamily

BASE, A, B, C = "/models/base", "/models/a", "/models/b", "/models/c"


@pytest.fixture(scope="module")
def llama_layout(llama_family: TinyFamily) -> Layout:
    return open_checkpoint(llama_family.base).layout


@pytest.fixture(scope="module")
def gpt2_layout(gpt2_family: TinyFamily) -> Layout:
    return open_checkpoint(gpt2_family.base).layout


def _table(values: list[list[list[float]]]) -> tuple[tuple[tuple[float, ...], ...], ...]:
    return tuple(tuple(tuple(cell) for cell in row) for row in values)


def _per_role(*values: float) -> tuple[tuple[float, ...], ...]:
    """One source, values per role in ROLES order."""
    return tuple((v,) for v in values)


_SETTING = TypeAdapter(ParameterSetting)


def _resolve_like_mergekit(setting: object, name: str, t: float = 0.0, validate: type | None = None) -> object:
    """mergekit's own resolution of a YAML setting (parsed as its config parses it)."""
    return evaluate_setting(name, _SETTING.validate_python(setting), t, validate=validate or (lambda v: v))


# -- role filters -------------------------------------------------------------------


def test_role_filters_for_llama_and_gpt2(llama_layout: Layout, gpt2_layout: Layout) -> None:
    assert role_filters(llama_layout) == [
        ("self_attn", "attention"), ("mlp", "mlp"), ("embed_tokens", "embed"),
        ("lm_head", "head"), ("model.norm", "head"),
    ]
    # GPT-2 here ties its head: no lm_head tensor, so no lm_head filter.
    assert role_filters(gpt2_layout) == [
        ("attn", "attention"), ("mlp", "mlp"), ("wte", "embed"), ("wpe", "embed"), ("ln_f", "head"),
    ]


def test_role_filters_give_every_tensor_its_role(llama_layout: Layout, gpt2_layout: Layout) -> None:
    for layout in (llama_layout, gpt2_layout):
        filters = role_filters(layout)
        setting = [{"filter": sub, "value": role} for sub, role in filters] + [{"value": "norm"}]
        for info in layout.tensors:
            assert _resolve_like_mergekit(setting, info.name) == info.role, info.name


def test_role_filters_refuse_a_layout_they_cannot_express() -> None:
    # A norm whose name contains "self_attn": the attention filter would capture it.
    tensors = (
        TensorInfo("model.embed_tokens.weight", None, "embed"),
        TensorInfo("model.layers.0.self_attn.q_proj.weight", 0, "attention"),
        TensorInfo("model.layers.0.self_attn_norm.weight", 0, "norm"),
        TensorInfo("model.norm.weight", None, "head"),
    )
    layout = Layout(1, tensors, False, "model.layers.")
    with pytest.raises(UnsupportedConfigError, match="self_attn_norm.*'norm'.*'attention'"):
        role_filters(layout)


def test_role_filters_refuse_an_unknown_family() -> None:
    layout = Layout(1, (TensorInfo("blocks.0.w", 0, "mlp"),), False, "blocks.")
    with pytest.raises(UnsupportedConfigError, match="layer prefix 'blocks.'"):
        role_filters(layout)


# -- export -------------------------------------------------------------------------


def _two_group_ties() -> Recipe:
    weight = _table([
        [[0.5, 0.25]] * 5,  # group 0: the same for every role -> scalars
        [[0.1, 0.2], [0.3, 0.4], [0.5, 0.6], [0.7, 0.8], [0.9, 1.0]],  # group 1: per role
    ])
    return Recipe(
        "ties", BASE, (A, B), ((0, 1), (1, 4)),
        tensor_params={"weight": weight, "density": _table([[[0.5, 0.5]] * 5] * 2)},
        global_params={"lambda": ((1.5,) * 5, (1.5,) * 5), "normalize": ((True,) * 5, (False,) * 5)},
        out_dtype="bfloat16",
    )


def test_export_writes_one_slice_per_group_with_the_base_in_each(llama_layout: Layout) -> None:
    text = recipe_to_mergekit(_two_group_ties(), llama_layout, header="best trial 7\nscore 0.5")
    assert text.startswith("# best trial 7\n# score 0.5\n")
    config = yaml.safe_load(text)
    assert config["merge_method"] == "ties" and config["base_model"] == BASE
    assert (config["dtype"], config["out_dtype"], config["tokenizer_source"]) == ("float32", "bfloat16", "base")
    assert config["parameters"] == {"lambda": 1.5}  # equal everywhere -> top level
    assert [s["sources"][0]["layer_range"] for s in config["slices"]] == [[0, 1], [1, 4]]
    for piece in config["slices"]:
        assert [s["model"] for s in piece["sources"]] == [A, B, BASE]
        assert "parameters" not in piece["sources"][-1]
    first, second = config["slices"]
    assert first["sources"][0]["parameters"] == {"weight": 0.5, "density": 0.5}
    assert first["parameters"] == {"normalize": True}
    assert second["parameters"] == {"normalize": False}
    weight_b = second["sources"][1]["parameters"]["weight"]
    assert weight_b[-1] == {"value": 0.8}  # the catch-all is the norm role
    expected_b = dict(zip(ROLES, (0.2, 0.4, 0.6, 0.8, 1.0), strict=True))
    for info in llama_layout.tensors:
        assert _resolve_like_mergekit(weight_b, info.name) == expected_b[info.role], info.name


def test_export_numbers_are_exact_reprs(llama_layout: Layout) -> None:
    tiny = 0.1 + 0.2  # 0.30000000000000004: must survive exactly
    recipe = Recipe.uniform("linear", None, [A, B], 4, tensor_params={"weight": [tiny, 1e-17]})
    config = yaml.safe_load(recipe_to_mergekit(recipe, llama_layout))
    assert config["slices"][0]["sources"][0]["parameters"]["weight"] == tiny
    assert config["slices"][0]["sources"][1]["parameters"]["weight"] == 1e-17
    assert "base_model" not in config and "tokenizer_source" not in config
    assert [s["model"] for s in config["slices"][0]["sources"]] == [A, B]  # linear: no base input


def test_export_notes_seeded_masks_for_dare(llama_layout: Layout) -> None:
    recipe = Recipe.uniform("dare_ties", BASE, [A, B], 4,
                            tensor_params={"weight": [0.5, 0.5], "density": [0.3, 0.7]}, seed=42)
    text = recipe_to_mergekit(recipe, llama_layout)
    assert "--random-seed 42" in text and "not bit for bit" in text
    assert recipe_from_mergekit(text, layout=llama_layout).seed == 42


def test_export_of_a_frankenmerge(llama_layout: Layout) -> None:
    pieces = (LayerSlice(A, 0, 3), LayerSlice(B, 1, 4, 0.5), LayerSlice(A, 2, 4))
    recipe = Recipe("passthrough", BASE, (A, B), ((0, 3), (3, 6), (6, 8)), layer_slices=pieces)
    config = yaml.safe_load(recipe_to_mergekit(recipe, llama_layout))
    assert config["slices"] == [
        {"sources": [{"model": A, "layer_range": [0, 3]}]},
        {"sources": [{"model": B, "layer_range": [1, 4], "parameters": {"scale": 0.5}}]},
        {"sources": [{"model": A, "layer_range": [2, 4]}]},
    ]
    assert recipe_from_mergekit(recipe_to_mergekit(recipe, llama_layout), layout=llama_layout) == recipe


def test_export_refuses_what_mergekit_would_misread(llama_layout: Layout) -> None:
    lora = Recipe.uniform("linear", None, ["/m/x+lora+again"], 4, tensor_params={"weight": [1.0]})
    with pytest.raises(UnsupportedConfigError, match="LoRA"):
        recipe_to_mergekit(lora, llama_layout)
    wrong_depth = Recipe.uniform("linear", None, [A], 3, tensor_params={"weight": [1.0]})
    with pytest.raises(UnsupportedConfigError, match="3 layers but the base has 4"):
        recipe_to_mergekit(wrong_depth, llama_layout)


# -- exact round trips (property) ----------------------------------------------------

_FLOATS = st.one_of(
    st.sampled_from([0.0, 0.5, 1.0, 0.1 + 0.2, -0.25]),
    st.floats(min_value=-3.0, max_value=3.0, allow_nan=False, allow_infinity=False),
)
_NON_PASSTHROUGH = sorted(m for m in METHODS if m != "passthrough")


@st.composite
def _row(draw: st.DrawFn, value: st.SearchStrategy[object]) -> tuple[object, ...]:
    """One value per role: often the same for all roles (the scalar path), else independent."""
    if draw(st.booleans()):
        return (draw(value),) * len(ROLES)
    return tuple(draw(value) for _ in ROLES)


@st.composite
def _recipes(draw: st.DrawFn, n_layers: int) -> Recipe:
    method = draw(st.sampled_from([*_NON_PASSTHROUGH, "passthrough"]))
    spec = METHODS[method]
    dtype = draw(st.sampled_from(["float32", "bfloat16", "float16"]))
    out_dtype = draw(st.sampled_from([None, "float32", "bfloat16"]))
    seed = draw(st.integers(0, 2**31 - 1))
    if method == "passthrough" and draw(st.booleans()):  # one model in place, scale per cell
        cuts = sorted(draw(st.sets(st.integers(1, n_layers - 1))))
        bounds = [0, *cuts, n_layers]
        groups = tuple(zip(bounds, bounds[1:], strict=False))
        scale = {}
        if draw(st.booleans()):
            scale["scale"] = tuple(tuple((v,) for v in draw(_row(_FLOATS))) for _ in groups)
        return Recipe(method, draw(st.sampled_from([None, BASE])), (A,), groups, scale,
                      dtype=dtype, out_dtype=out_dtype, seed=seed)
    if method == "passthrough":
        models = [BASE, A, B]
        pieces = []
        for _ in range(draw(st.integers(1, 4))):
            start = draw(st.integers(0, n_layers - 1))
            end = draw(st.integers(start + 1, n_layers))
            scale = draw(st.sampled_from([1.0, 0.5])) if draw(st.booleans()) else draw(_FLOATS)
            pieces.append(LayerSlice(draw(st.sampled_from(models)), start, end, scale))
        if draw(st.booleans()):  # in place: one model, its layers where they are
            cuts = sorted(draw(st.sets(st.integers(1, n_layers - 1))))
            bounds = [0, *cuts, n_layers]
            model = draw(st.sampled_from(models))
            pieces = [LayerSlice(model, a, b, draw(_FLOATS)) for a, b in zip(bounds, bounds[1:], strict=False)]
        groups, start = [], 0
        for piece in pieces:
            groups.append((start, start + piece.end - piece.start))
            start += piece.end - piece.start
        sources = tuple(dict.fromkeys(p.model for p in pieces))
        if draw(st.booleans()):  # the genome lists every source, used or not
            sources = tuple(dict.fromkeys([*draw(st.permutations(models)), *sources]))
        base = draw(st.sampled_from([None, BASE]))
        return Recipe(method, base, sources, tuple(groups), layer_slices=tuple(pieces),
                      dtype=dtype, out_dtype=out_dtype, seed=seed)

    low = max(spec.min_sources, 1)
    high = spec.max_sources or 3
    sources = (A, B, C)[: draw(st.integers(low, high))]
    base = BASE if spec.needs_base else draw(st.sampled_from([None, BASE]))
    cuts = sorted(draw(st.sets(st.integers(1, n_layers - 1))))
    bounds = [0, *cuts, n_layers]
    groups = tuple(zip(bounds, bounds[1:], strict=False))
    tensor_params = {}
    for name, default in spec.tensor_params.items():
        if default is None or draw(st.booleans()):
            tensor_params[name] = tuple(
                tuple(zip(*(draw(_row(_FLOATS)) for _ in sources), strict=True)) for _ in groups
            )
    global_params = {}
    for name, default in spec.global_params.items():
        if default is None or draw(st.booleans()):
            value = st.booleans() if isinstance(default, bool) else _FLOATS
            if spec.param(name).kind is int:  # karcher's max_iter
                value = st.integers(0, 20)
            global_params[name] = tuple(draw(_row(value)) for _ in groups)
    return Recipe(method, base, sources, groups, tensor_params, global_params,
                  dtype=dtype, out_dtype=out_dtype, seed=seed)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_round_trip_is_exact_for_every_recipe(data: st.DataObject, llama_layout: Layout,
                                              gpt2_layout: Layout) -> None:
    layout = data.draw(st.sampled_from([llama_layout, gpt2_layout]))
    recipe = data.draw(_recipes(layout.n_layers))
    text = recipe_to_mergekit(recipe, layout)
    assert recipe_from_mergekit(text, layout=layout) == recipe


# -- import: mergekit's rules --------------------------------------------------------


def test_models_form_is_one_uniform_group(llama_layout: Layout) -> None:
    text = f"""
merge_method: task_arithmetic
base_model: {BASE}
dtype: bfloat16
models:
  - model: {A}
    parameters: {{weight: 0.7}}
  - model: {B}
    parameters: {{weight: 1}}
parameters:
  lambda: 1e-1
"""
    recipe = recipe_from_mergekit(text, layout=llama_layout)
    assert recipe == Recipe.uniform("task_arithmetic", BASE, [A, B], 4, tensor_params={"weight": [0.7, 1.0]},
                                    global_params={"lambda": 0.1}, dtype="bfloat16")


def test_filters_that_select_whole_roles_become_role_values(llama_layout: Layout) -> None:
    def config(weight: str) -> str:
        return (f"merge_method: linear\ndtype: float32\nslices:\n  - sources:\n      - model: {A}\n"
                f"        layer_range: [0, 4]\n        parameters:\n          weight: {weight}\n")

    whole = ("[{filter: lm_head, value: 3.0}, {filter: model.norm, value: 3.0}, {filter: layernorm, value: 4.0},"
             " {filter: self_attn, value: 2.0}, {value: 1.0}]")
    recipe = recipe_from_mergekit(config(whole), layout=llama_layout)
    assert recipe.tensor_params["weight"] == (_per_role(1.0, 2.0, 1.0, 4.0, 3.0),)
    # "norm" also matches model.norm, a head tensor: the head role would split.
    with pytest.raises(UnsupportedConfigError, match="3.0 for 'lm_head.weight' but 4.0 for 'model.norm.weight'"):
        recipe_from_mergekit(config("[{filter: lm_head, value: 3.0}, {filter: norm, value: 4.0}, {value: 1.0}]"),
                             layout=llama_layout)
    # Without a filter for model.norm the head role splits (lm_head 3.0, model.norm 1.0).
    split = "[{filter: lm_head, value: 3.0}, {value: 1.0}]"
    with pytest.raises(UnsupportedConfigError, match="'lm_head.weight' but 1.0 for 'model.norm.weight'"):
        recipe_from_mergekit(config(split), layout=llama_layout)


def test_gradients_expand_per_layer_like_mergekit(llama_layout: Layout) -> None:
    gradient = [0.0, 0.3, 1.0]
    text = f"""
merge_method: linear
dtype: float32
slices:
  - sources:
      - model: {A}
        layer_range: [0, 1]
        parameters: {{weight: 2.0}}
  - sources:
      - model: {A}
        layer_range: [1, 4]
        parameters:
          weight: [{{filter: mlp, value: {gradient}}}, {{value: 0.5}}]
"""
    recipe = recipe_from_mergekit(text, layout=llama_layout)
    assert recipe.groups == ((0, 1), (1, 2), (2, 3), (3, 4))
    setting = [{"filter": "mlp", "value": gradient}, {"value": 0.5}]
    for layer in (1, 2, 3):
        t = (layer - 1) / 2
        want = _resolve_like_mergekit(setting, "model.layers.1.mlp.up_proj.weight", t, float)
        assert recipe.tensor_values("weight", layer, "mlp") == (want,)
        assert recipe.tensor_values("weight", layer, "attention") == (0.5,)
    assert recipe.tensor_values("weight", 0, "embed") == (2.0,)
    assert recipe.tensor_values("weight", 3, "head") == (0.5,)


def test_head_and_embeddings_take_t_zero_of_their_slice(llama_layout: Layout) -> None:
    # The last layer sits at t = 1 of the gradient, the final norm and head at t = 0.
    text = f"""
merge_method: linear
dtype: float32
models:
  - model: {A}
    parameters: {{weight: [0.25, 0.75]}}
"""
    recipe = recipe_from_mergekit(text, layout=llama_layout)
    assert len(recipe.groups) == 4
    assert recipe.tensor_values("weight", 0, "embed") == (0.25,)
    assert recipe.tensor_values("weight", 3, "head") == (0.25,)
    assert recipe.tensor_values("weight", 3, "mlp") == (0.75,)
    want = _resolve_like_mergekit([0.25, 0.75], "model.layers.1.mlp.up_proj.weight", 1 / 3, float)
    assert recipe.tensor_values("weight", 1, "mlp") == (want,)


def test_relative_model_paths_resolve_against_the_working_folder(tmp_path: Path, llama_layout: Layout,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """As mergekit's ``ModelReference.local_path``: the path as written, from where it runs."""
    config = tmp_path / "cfg" / "merge.yaml"
    (config.parent / "a").mkdir(parents=True)  # a decoy beside the YAML
    run = tmp_path / "run"
    (run / "a").mkdir(parents=True)
    monkeypatch.chdir(run)
    config.write_text("merge_method: linear\ndtype: float32\nmodels:\n  - model: a\n"
                      "    parameters: {weight: 1.0}\n  - model: ../m/b\n    parameters: {weight: 1.0}\n"
                      "  - model: ~/c\n    parameters: {weight: 1.0}\n")
    # "~/c" stays as written: mergekit does not expand it (it takes it for a Hub id)
    want = (str(run / "a"), str(run / "../m/b"), str(run / "~/c"))
    assert recipe_from_mergekit(config, layout=llama_layout).sources == want
    assert recipe_from_mergekit(config.read_text(), layout=llama_layout).sources == want
    other = tmp_path / "elsewhere"
    assert recipe_from_mergekit(config, base_dir=other, layout=llama_layout).sources[0] == str(other / "a")


@pytest.mark.slow
def test_search_merge_reads_the_models_mergekit_reads_despite_a_decoy(
        llama_family: TinyFamily, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Folders named like the config's models exist both beside the YAML (other models) and
    in the working folder: ``search merge`` and mergekit both merge the working folder's."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from safetensors.torch import load_file

    from search.cli import main as search_main

    run, beside = tmp_path / "run", tmp_path / "cfg"
    run.mkdir()
    beside.mkdir()
    real = {"base": llama_family.base, "m0": llama_family.sources[0], "m1": llama_family.sources[1]}
    decoy = {"base": llama_family.base, "m0": llama_family.sources[2], "m1": llama_family.sources[0]}
    for name in real:
        (run / name).symlink_to(real[name], target_is_directory=True)
        (beside / name).symlink_to(decoy[name], target_is_directory=True)
    config = beside / "merge.yaml"
    config.write_text("merge_method: task_arithmetic\nbase_model: base\ndtype: float32\nmodels:\n"
                      "  - model: m0\n    parameters: {weight: 0.7}\n"
                      "  - model: m1\n    parameters: {weight: 0.4}\n")
    monkeypatch.chdir(run)
    assert recipe_from_mergekit(config).sources == (str(run / "m0"), str(run / "m1"))
    assert search_main(["merge", str(config), str(tmp_path / "ours")]) == 0
    mergekit_config = MergeConfiguration.model_validate(yaml.safe_load(config.read_text()))
    run_merge(mergekit_config, str(tmp_path / "theirs"), MergeOptions(quiet=True, write_model_card=False))
    ours = load_file(tmp_path / "ours" / "model.safetensors")
    theirs = load_file(tmp_path / "theirs" / "model.safetensors")
    layout = open_checkpoint(llama_family.base).layout
    names = [n for n in theirs if not layout.is_tied_head(n)]
    assert names and all(torch.equal(ours[n], theirs[n]) for n in names)
    # run from beside the YAML, the decoys are merged: other tensors (the check can fail)
    monkeypatch.chdir(beside)
    assert search_main(["merge", str(config), str(tmp_path / "decoyed")]) == 0
    decoyed = load_file(tmp_path / "decoyed" / "model.safetensors")
    assert any(not torch.equal(decoyed[n], theirs[n]) for n in names)


_GOOD_SOURCES = f"""
  - model: {A}
    parameters: {{weight: 0.5}}
  - model: {B}
    parameters: {{weight: 0.5}}
"""


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (f"merge_method: ties\nbase_model: {BASE}\ndtype: float32\nmodels:\n  - model: {A}\n"
         "    parameters:\n      weight: [{filter: q_proj, value: 1.0}, {value: 0.5}]\n",
         "q_proj.*attention tensors of one layer group"),
        (f"merge_method: linear\ndtype: float32\ntokenizer_source: union\ntokenizer: {{source: union}}\n"
         f"models:{_GOOD_SOURCES}", "both tokenizer_source and tokenizer"),
        (f"merge_method: linear\ndtype: float32\ntokenizer: {{source: union, pad_to_multiple_of: 0}}\n"
         f"models:{_GOOD_SOURCES}", "pad_to_multiple_of"),
        (f"merge_method: frobnicate\ndtype: float32\nmodels:{_GOOD_SOURCES}", "'frobnicate' is not one the engine implements"),
        (f"merge_method: linear\ndtype: float32\nmodels:\n  - model: {A}+/l/x+/l/y\n    parameters: {{weight: 1}}\n",
         "LoRA"),
        (f"merge_method: linear\ndtype: float32\nmodels:\n  - model: {A}@v2\n    parameters: {{weight: 1}}\n",
         "revision"),
        (f"merge_method: linear\nbase_model: {BASE}\ndtype: float32\nmodels:{_GOOD_SOURCES}",
         "without parameters"),
        (f"merge_method: ties\nbase_model: {BASE}\ndtype: float32\nslices:\n  - sources:\n"
         f"      - {{model: {A}, layer_range: [0, 4], parameters: {{weight: 1.0}}}}\n",
         "base model must be listed"),
        (f"merge_method: ties\nbase_model: {BASE}\ndtype: float32\nslices:\n  - sources:\n"
         f"      - {{model: {A}, layer_range: [0, 2], parameters: {{weight: 1.0}}}}\n"
         f"      - {{model: {BASE}, layer_range: [2, 4]}}\n",
         "every source of a slice must use the slice's own output range"),
        (f"merge_method: ties\nbase_model: {BASE}\ndtype: float32\nmodels:\n  - model: {A}\n",
         r"missing required parameter\(s\) \['weight'\]"),
        (f"merge_method: ties\ndtype: float32\nslices:\n  - base_model: {BASE}\n    sources:\n"
         f"      - {{model: {A}, layer_range: [0, 2], parameters: {{weight: 1.0}}}}\n"
         f"      - {{model: {BASE}, layer_range: [0, 2]}}\n"
         f"  - sources:\n"
         f"      - {{model: {A}, layer_range: [2, 4], parameters: {{weight: 1.0}}}}\n"
         f"      - {{model: {BASE}, layer_range: [2, 4]}}\n",
         r"slices\[1\]: no base_model, while other slices merge ties against one"),
        (f"merge_method: ties\nbase_model: {BASE}\ndtype: float32\nslices:\n  - base_model: {B}\n    sources:\n"
         f"      - {{model: {A}, layer_range: [0, 4], parameters: {{weight: 1.0}}}}\n"
         f"      - {{model: {BASE}, layer_range: [0, 4], parameters: {{weight: 1.0}}}}\n",
         r"slices\[0\]: the base model must be listed .*uses /models/b"),
        (f"merge_method: ties\nbase_model: {BASE}\ndtype: float32\nslices:\n  - sources:\n"
         f"      - {{model: {A}, layer_range: [0, 2], parameters: {{weight: 1.0}}}}\n"
         f"      - {{model: {B}, layer_range: [0, 2], parameters: {{weight: 1.0}}}}\n"
         f"      - {{model: {BASE}, layer_range: [0, 2]}}\n"
         f"  - base_model: {B}\n    sources:\n"
         f"      - {{model: {BASE}, layer_range: [2, 4], parameters: {{weight: 1.0}}}}\n"
         f"      - {{model: {A}, layer_range: [2, 4], parameters: {{weight: 1.0}}}}\n"
         f"      - {{model: {B}, layer_range: [2, 4]}}\n",
         r"slices\[1\]: models \['/models/base', '/models/a'\] are merged in another order .*"
         r"\['/models/a', '/models/base'\]"),
        (f"merge_method: ties\nbase_model: {BASE}\ndtype: float32\nslices:\n  - sources:\n"
         f"      - {{model: {A}, layer_range: [0, 2], parameters: {{weight: 1.0}}}}\n"
         f"      - {{model: {BASE}, layer_range: [0, 2]}}\n"
         f"  - base_model: {B}\n    sources:\n"
         f"      - {{model: {A}, layer_range: [2, 4], parameters: {{weight: 1.0}}}}\n"
         f"      - {{model: {B}, layer_range: [2, 4]}}\n",
         r"slices\[1\]: models .* differ from the first slice's .*same models"),
        (f"merge_method: linear\ndtype: float32\nmodules: {{}}\nmodels:{_GOOD_SOURCES}", "per-module"),
        (f"merge_method: linear\ndtype: float32\nslices:\n  - sources:\n"
         f"      - {{model: {A}, layer_range: [0, 3], parameters: {{weight: 1.0}}}}\n",
         "slices give 3 layers but the base has 4"),
    ],
)
def test_unsupported_configs_are_refused_with_the_reason(text: str, reason: str, llama_layout: Layout) -> None:
    with pytest.raises(UnsupportedConfigError, match=reason):
        recipe_from_mergekit(text, layout=llama_layout)


def _two_bases(method: str, top: str | None) -> str:
    """Layers [0, 2) merged against BASE, [2, 4) against B (its own base_model)."""
    head = f"merge_method: {method}\n" + (f"base_model: {top}\n" if top else "") + "dtype: float32\nslices:\n"
    return head + (
        f"  - base_model: {BASE}\n    sources:\n"
        f"      - {{model: {A}, layer_range: [0, 2], parameters: {{weight: 0.3}}}}\n"
        f"      - {{model: {B}, layer_range: [0, 2], parameters: {{weight: 0.7}}}}\n"
        f"      - {{model: {BASE}, layer_range: [0, 2]}}\n"
        f"  - base_model: {B}\n    sources:\n"
        f"      - {{model: {A}, layer_range: [2, 4], parameters: {{weight: 0.4}}}}\n"
        f"      - {{model: {BASE}, layer_range: [2, 4], parameters: {{weight: 0.6}}}}\n"
        f"      - {{model: {B}, layer_range: [2, 4]}}\n")


@pytest.mark.parametrize(("method", "top", "base"), [
    ("task_arithmetic", None, BASE),  # no top-level base: the first slice's gives config and tokenizer
    ("task_arithmetic", C, C),  # a top-level base no slice merges against: only config and tokenizer
    ("nuslerp", BASE, BASE),  # an optional base counts too
])
def test_slice_bases_that_differ_import_per_group_and_round_trip(method: str, top: str | None, base: str,
                                                                  llama_layout: Layout) -> None:
    recipe = recipe_from_mergekit(_two_bases(method, top), layout=llama_layout)
    assert (recipe.base, recipe.group_bases, recipe.groups) == (base, (BASE, B), ((0, 2), (2, 4)))
    assert recipe.sources == (A, B, BASE)
    # a model's values where it is the group's base change nothing: mergekit's default, else 0
    assert [row[0] for row in recipe.tensor_params["weight"]] == [(0.3, 0.7, 0.0), (0.4, 0.0, 0.6)]
    text = recipe_to_mergekit(recipe, llama_layout)
    assert recipe_from_mergekit(text, layout=llama_layout) == recipe
    assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe
    renamed = rename_models(recipe, {p: p.replace("/models/", "hub/") for p in (A, B, C, BASE)})
    assert renamed.group_bases == ("hub/base", "hub/b")
    assert "group_bases" not in dataclasses.replace(recipe, group_bases=()).to_dict()  # stored dicts unchanged


def test_group_bases_are_checked_by_the_recipe() -> None:
    with pytest.raises(RecipeError, match="one base per layer group"):
        Recipe("ties", BASE, (A,), ((0, 2), (2, 4)), group_bases=(B,))
    with pytest.raises(RecipeError, match="some group's base differs"):
        Recipe("ties", BASE, (A,), ((0, 2), (2, 4)), group_bases=(BASE, BASE))
    with pytest.raises(RecipeError, match="some group's base differs"):
        Recipe("ties", None, (A,), ((0, 2), (2, 4)), group_bases=(A, B))


def test_a_per_slice_base_is_ignored_where_mergekit_ignores_it(llama_layout: Layout) -> None:
    """linear takes no base (mergekit's BasePolicy.IGNORED): a slice's own base_model changes nothing."""
    body = (f"  - sources:\n      - {{model: {A}, layer_range: [0, 4], parameters: {{weight: 0.3}}}}\n"
            f"      - {{model: {B}, layer_range: [0, 4], parameters: {{weight: 0.7}}}}\n")
    text = f"merge_method: linear\nbase_model: {BASE}\ndtype: float32\nslices:\n" + body.replace(
        "  - sources:", f"  - base_model: {C}\n    sources:")
    from merges.mergekit_yaml import IgnoredConfigWarning

    with pytest.warns(IgnoredConfigWarning, match="base_model '/models/c' is ignored"):
        recipe = recipe_from_mergekit(text, layout=llama_layout)
    clean = f"merge_method: linear\nbase_model: {BASE}\ndtype: float32\nslices:\n" + body
    assert recipe == recipe_from_mergekit(clean, layout=llama_layout)


@pytest.mark.parametrize(
    ("text", "clean", "named"),
    [
        # mergekit's own slerp / model_stock tests pass a weight; neither method declares one
        (f"merge_method: slerp\nbase_model: {BASE}\ndtype: float16\nparameters: {{t: 0.3}}\nmodels:\n"
         f"  - model: {A}\n    parameters: {{weight: 0.5}}\n  - model: {BASE}\n    parameters: {{weight: 0.5}}\n",
         f"merge_method: slerp\nbase_model: {BASE}\ndtype: float16\nparameters: {{t: 0.3}}\nmodels:\n"
         f"  - model: {A}\n  - model: {BASE}\n", ["'weight' is not a parameter of slerp"]),
        (f"merge_method: model_stock\nbase_model: {BASE}\ndtype: bfloat16\nmodels:\n"
         f"  - model: {A}\n    parameters: {{weight: 1.0}}\n  - model: {B}\n    parameters: {{weight: 1.0}}\n"
         f"  - model: {BASE}\n",
         f"merge_method: model_stock\nbase_model: {BASE}\ndtype: bfloat16\nmodels:\n"
         f"  - model: {A}\n  - model: {B}\n  - model: {BASE}\n", ["'weight' is not a parameter of model_stock"]),
        (f"merge_method: ties\nbase_model: {BASE}\ndtype: float32\n"
         f"models:\n  - model: {A}\n    parameters: {{weight: 1.0, wieght: 2.0, lambda: 2.0}}\n",
         f"merge_method: ties\nbase_model: {BASE}\ndtype: float32\nmodels:\n  - model: {A}\n"
         "    parameters: {weight: 1.0}\n",
         ["'wieght' is not a parameter of ties",
          "'lambda' is shared by all models"]),
    ],
)
def test_parameters_mergekit_ignores_are_accepted_with_a_warning(text: str, clean: str, named: list[str],
                                                                  llama_layout: Layout) -> None:
    from mergekit.config import MergeConfiguration

    from merges.mergekit_yaml import IgnoredConfigWarning

    MergeConfiguration.model_validate(yaml.safe_load(text))  # mergekit takes the config as it is
    with pytest.warns(IgnoredConfigWarning) as caught:
        recipe = recipe_from_mergekit(text, layout=llama_layout)
    messages = [str(w.message) for w in caught]
    for name in named:
        assert any(name in m for m in messages), (name, messages)
    assert recipe == recipe_from_mergekit(clean, layout=llama_layout)


def test_without_dtype_the_stored_float32_is_used(llama_family: TinyFamily) -> None:
    # No layout given: the importer reads the base checkpoint's layer map and dtypes.
    text = (f"merge_method: ties\nbase_model: {llama_family.base}\nmodels:\n"
            f"  - model: {llama_family.sources[0]}\n    parameters: {{weight: 0.5}}\n")
    recipe = recipe_from_mergekit(text)
    assert recipe.dtype == "float32" and recipe.n_layers == 4
    assert recipe.sources == (str(llama_family.sources[0]),)


def test_a_base_listed_among_sources_is_written_once_as_the_base(llama_layout: Layout) -> None:
    recipe = Recipe.uniform("ties", BASE, [A, BASE], 4, tensor_params={"weight": [0.5, 0.9]})
    config = yaml.safe_load(recipe_to_mergekit(recipe, llama_layout))
    assert [s["model"] for s in config["slices"][0]["sources"]] == [A, BASE]
    assert "parameters" not in config["slices"][0]["sources"][1]


def test_a_header_cannot_change_the_recorded_seed(llama_layout: Layout, tmp_path: Path) -> None:
    recipe = Recipe.uniform("dare_linear", BASE, [A], 4, tensor_params={"weight": [1.0], "density": [0.5]}, seed=9)
    text = recipe_to_mergekit(recipe, llama_layout, header='mergesearch: {"seed": 1}\nfrom trial 3')
    assert text.splitlines()[:2] == ['# mergesearch: {"seed": 1}', "# from trial 3"]
    assert '# mergesearch: {"seed": 9}' in text
    config = tmp_path / "recipe.txt"  # a path given as a string, whatever its suffix
    config.write_text(text)
    assert recipe_from_mergekit(str(config), layout=llama_layout) == recipe


# -- chat_template -----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("template", "tokenizer_source"), [
    ("chatml", True), ("{% for m in messages %}{{ m['content'] }}\n{% endfor %}", True), ("llama3", False),
    ("auto", False),  # no model's tokenizer has one: none is written
])
def test_chat_template_is_written_as_mergekit_writes_it(template: str, tokenizer_source: bool,
                                                        llama_family: TinyFamily, tmp_path: Path) -> None:
    """mergekit sets the template on the tokenizer it saves: the one ``tokenizer_source``
    builds, else the base's, saved again with ``save_pretrained``."""
    import transformers
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from search.cli import main as search_main

    text = (f"merge_method: linear\nbase_model: {llama_family.base}\ndtype: float32\nmodels:\n"
            f"  - model: {llama_family.base}\n    parameters: {{weight: 0.5}}\n"
            f"  - model: {llama_family.sources[0]}\n    parameters: {{weight: 0.5}}\n"
            + yaml.safe_dump({"chat_template": template}) + ("tokenizer_source: base\n" if tokenizer_source else ""))
    config = tmp_path / "merge.yaml"
    config.write_text(text)
    assert search_main(["merge", str(config), str(tmp_path / "ours")]) == 0
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(tmp_path / "theirs"),
              MergeOptions(quiet=True, write_model_card=False))
    ours = transformers.AutoTokenizer.from_pretrained(tmp_path / "ours").chat_template
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "theirs").chat_template
    assert ours == theirs
    assert (ours is None) == (template == "auto")
    if template == "chatml":
        assert "<|im_start|>" in ours
    if template.startswith("{%"):
        assert ours == template


def test_a_chat_template_mergekit_refuses_is_refused(llama_family: TinyFamily) -> None:
    from merges.mergekit_yaml import mergekit_chat_template

    text = (f"merge_method: linear\nbase_model: {llama_family.base}\ndtype: float32\ntokenizer_source: base\n"
            "chat_template: nosuchname\n"
            f"models:\n  - model: {llama_family.base}\n    parameters: {{weight: 1.0}}\n"
            f"  - model: {llama_family.sources[0]}\n    parameters: {{weight: 1.0}}\n")
    recipe = recipe_from_mergekit(text)
    with pytest.raises(UnsupportedConfigError, match="'nosuchname' is neither one of mergekit's named"):
        mergekit_chat_template(text, recipe)
