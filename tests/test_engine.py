"""MergeEngine on tiny Llama / GPT-2 families: live merges equal materialised ones and the
reference tensor functions, parameters reach exactly their tensors, errors name the culprit."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import merges.engine as engine_module
from merges.checkpoint import Checkpoint, open_checkpoint
from merges.engine import MergeEngine
from merges.errors import MergeError, NonFiniteMergeError, RecipeError
from merges.methods.linear import linear
from merges.methods.slerp import slerp
from merges.methods.task_arithmetic import merge_task_vectors
from merges.recipe import ROLES, LayerSlice, Recipe
from tests.checkpoints import TinyFamily, bf16_copy

N_LAYERS = 4
WEIGHTS = [0.6, 0.3, 0.9]
DENSITIES = [0.5, 0.3, 0.7]


def open_family(family: TinyFamily) -> tuple[Checkpoint, list[Checkpoint]]:
    return open_checkpoint(family.base), [open_checkpoint(s) for s in family.sources]


# every test here runs under each engine plan (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("engine_plan")


@pytest.fixture(scope="module")
def llama_engine(llama_family: TinyFamily, engine_plan: str) -> MergeEngine:
    base, sources = open_family(llama_family)
    return MergeEngine(base, sources, device="cpu", threads=2)


@pytest.fixture(scope="module")
def gpt2_engine(gpt2_family: TinyFamily, engine_plan: str) -> MergeEngine:
    base, sources = open_family(gpt2_family)
    return MergeEngine(base, sources, device="cpu", threads=2)


def recipe(family: TinyFamily, method: str, tensor_params: dict[str, list[float]] | None = None,
           global_params: dict[str, float | bool] | None = None, *, n_sources: int = 3,
           seed: int = 0) -> Recipe:
    sources = [str(s) for s in family.sources[:n_sources]]
    return Recipe.uniform(method, str(family.base), sources, N_LAYERS, tensor_params,
                          global_params, seed=seed)


RECIPES = {
    "linear": ({"weight": WEIGHTS}, {}),
    "task_arithmetic": ({"weight": WEIGHTS}, {"lambda": 0.8}),
    "ties": ({"weight": WEIGHTS, "density": DENSITIES}, {}),
    "dare_ties": ({"weight": WEIGHTS, "density": DENSITIES}, {}),
    "dare_linear": ({"weight": WEIGHTS, "density": DENSITIES}, {}),
    "breadcrumbs_ties": ({"weight": WEIGHTS, "density": DENSITIES, "gamma": [0.05] * 3}, {}),
    "della": ({"weight": WEIGHTS, "density": DENSITIES, "epsilon": [0.1] * 3}, {}),
    "model_stock": ({}, {"filter_wise": True}),
}


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_model_equals(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    live = model.state_dict()
    for name, tensor in tensors.items():
        assert torch.equal(live[name], tensor), name


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_merge_into_equals_materialize_llama(llama_family: TinyFamily, llama_engine: MergeEngine,
                                             method: str) -> None:
    r = recipe(llama_family, method, *RECIPES[method])
    model = llama_engine.new_model()
    llama_engine.merge_into(model, r)
    merged = llama_engine.materialize(r)
    assert set(merged) == set(llama_engine.layout.names)
    assert_model_equals(model, merged)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 2]])).logits
    assert torch.isfinite(logits).all()


def test_slerp_and_gpt2_tied_embeddings(gpt2_family: TinyFamily, gpt2_engine: MergeEngine) -> None:
    for r in (recipe(gpt2_family, "slerp", {}, {"t": 0.4}, n_sources=1),
              recipe(gpt2_family, "ties", {"weight": WEIGHTS, "density": DENSITIES})):
        model = gpt2_engine.new_model()
        gpt2_engine.merge_into(model, r)
        merged = gpt2_engine.materialize(r)
        assert_model_equals(model, merged)
        # the tied head is the merged embedding
        assert torch.equal(model.lm_head.weight, merged["transformer.wte.weight"])
        with torch.no_grad():
            assert torch.isfinite(model(torch.tensor([[1, 5, 9]])).logits).all()


def test_engine_equals_reference_functions(llama_family: TinyFamily,
                                           llama_engine: MergeEngine) -> None:
    base, sources = open_family(llama_family)
    name = "model.layers.2.self_attn.q_proj.weight"
    b, xs = base.read(name), [s.read(name) for s in sources]
    merged = llama_engine.materialize(recipe(llama_family, "ties", *RECIPES["ties"]))
    torch.testing.assert_close(merged[name], merge_task_vectors(
        "ties", b, xs, weights=WEIGHTS, densities=DENSITIES), rtol=1e-6, atol=1e-7)
    merged = llama_engine.materialize(recipe(llama_family, "linear", *RECIPES["linear"]))
    torch.testing.assert_close(merged[name], linear(xs, WEIGHTS), rtol=1e-6, atol=1e-7)
    merged = llama_engine.materialize(recipe(llama_family, "slerp", {}, {"t": 0.3}, n_sources=1))
    torch.testing.assert_close(merged[name], slerp(0.3, b, xs[0]), rtol=1e-6, atol=1e-7)


def test_eager_path_equals_native(llama_family: TinyFamily, monkeypatch: pytest.MonkeyPatch) -> None:
    base, sources = open_family(llama_family)
    native = MergeEngine(base, sources, device="cpu")
    monkeypatch.setattr(engine_module, "native_library", lambda: None)
    eager = MergeEngine(base, sources, device="cpu")
    for method in ("ties", "dare_ties", "linear"):
        r = recipe(llama_family, method, *RECIPES[method], seed=3)
        a, b = native.materialize(r), eager.materialize(r)
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7)


def test_group_and_role_parameters_reach_exactly_their_tensors(
        llama_family: TinyFamily, llama_engine: MergeEngine) -> None:
    sources = [str(s) for s in llama_family.sources]
    groups = ((0, 2), (2, 4))

    def weight_table(changed: set[tuple[int, str]]) -> tuple:
        return tuple(tuple(tuple([2.0, 0.1, 0.1] if (g, role) in changed else WEIGHTS)
                           for role in ROLES) for g in range(len(groups)))

    def merged(changed: set[tuple[int, str]]) -> dict[str, torch.Tensor]:
        r = Recipe("task_arithmetic", str(llama_family.base), tuple(sources), groups,
                   {"weight": weight_table(changed)})
        return llama_engine.materialize(r)

    plain = merged(set())
    layout = llama_engine.layout
    base, checkpoints = open_family(llama_family)
    # the test family leaves some tensors untouched by every fine-tune: weights cannot move those
    moved = {name for name in layout.names
             if any(not torch.equal(c.read(name), base.read(name)) for c in checkpoints)}
    for cell, belongs in [
        ((1, "mlp"), lambda i: i.layer in (2, 3) and i.role == "mlp"),
        ((0, "attention"), lambda i: i.layer in (0, 1) and i.role == "attention"),
        ((0, "norm"), lambda i: i.layer in (0, 1) and i.role == "norm"),
        ((0, "embed"), lambda i: i.layer is None and i.role == "embed"),
        ((1, "head"), lambda i: i.layer is None and i.role == "head"),
        ((0, "head"), lambda i: False),  # outside the layers only the last group's head row counts
        ((1, "embed"), lambda i: False),  # ... and only the first group's embed row
    ]:
        changed = merged({cell})
        differs = {name for name in plain if not torch.equal(plain[name], changed[name])}
        expected = {info.name for info in layout.tensors if belongs(info)} & moved
        assert differs == expected, cell
        assert expected or cell in {(0, "head"), (1, "embed")}, cell  # not vacuous


def test_dare_is_deterministic_per_seed(llama_family: TinyFamily) -> None:
    base, sources = open_family(llama_family)
    r = recipe(llama_family, "dare_ties", *RECIPES["dare_ties"], seed=11)
    first = MergeEngine(base, sources, device="cpu").materialize(r)
    again = MergeEngine(base, sources, device="cpu", threads=1).materialize(r)
    other = MergeEngine(base, sources, device="cpu").materialize(
        recipe(llama_family, "dare_ties", *RECIPES["dare_ties"], seed=12))
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert any(not torch.equal(first[n], other[n]) for n in first)


def test_two_recipes_in_a_row_leak_nothing(llama_family: TinyFamily,
                                           llama_engine: MergeEngine) -> None:
    a = recipe(llama_family, "ties", *RECIPES["ties"])
    b = recipe(llama_family, "dare_linear", *RECIPES["dare_linear"], seed=5)
    model = llama_engine.new_model()
    llama_engine.merge_into(model, a)
    after_a = state(model)
    llama_engine.merge_into(model, b)
    after_ab = state(model)
    fresh = llama_engine.new_model()
    llama_engine.merge_into(fresh, b)
    assert all(torch.equal(after_ab[k], v) for k, v in state(fresh).items())
    llama_engine.merge_into(model, a)
    assert all(torch.equal(after_a[k], v) for k, v in state(model).items())


def test_passthrough_frankenmerge(llama_family: TinyFamily, llama_engine: MergeEngine) -> None:
    base, src0 = str(llama_family.base), str(llama_family.sources[0])
    slices = (LayerSlice(base, 0, 3), LayerSlice(src0, 1, 4, scale=0.5))
    r = Recipe("passthrough", None, (base, src0), ((0, 3), (3, 6)), layer_slices=slices)
    merged = llama_engine.materialize(r)
    base_ckpt, source_ckpt = open_checkpoint(base), open_checkpoint(src0)
    assert torch.equal(merged["model.layers.2.mlp.up_proj.weight"],
                       base_ckpt.read("model.layers.2.mlp.up_proj.weight"))
    torch.testing.assert_close(merged["model.layers.5.mlp.up_proj.weight"],
                               source_ckpt.read("model.layers.3.mlp.up_proj.weight") * 0.5)
    assert torch.equal(merged["model.embed_tokens.weight"], base_ckpt.read("model.embed_tokens.weight"))
    torch.testing.assert_close(merged["lm_head.weight"], source_ckpt.read("lm_head.weight") * 0.5)
    assert not any(".layers.6." in n for n in merged)
    # a live model with six layers takes the same merge; a four-layer one is refused
    config = llama_engine.new_model().config
    config.num_hidden_layers = 6
    six = type(llama_engine.new_model())(config)
    llama_engine.merge_into(six, r)
    assert_model_equals(six, merged)
    with pytest.raises(RecipeError, match="model has no tensor 'model.layers.4"):
        llama_engine.merge_into(llama_engine.new_model(), r)


def test_recipe_errors_name_the_culprit(llama_family: TinyFamily, llama_engine: MergeEngine,
                                        tmp_path: Path) -> None:
    model = llama_engine.new_model()
    before = state(model)
    with pytest.raises(RecipeError, match="unknown merge method 'tie'"):
        llama_engine.merge_into(model, recipe(llama_family, "tie", {"weight": WEIGHTS}))
    with pytest.raises(RecipeError, match="'ties' has no per-source parameter 'epsilon'"):
        llama_engine.merge_into(model, recipe(llama_family, "ties", {"weight": WEIGHTS,
                                                                     "epsilon": [0.1] * 3}))
    stranger = str(tmp_path / "elsewhere")
    r = Recipe.uniform("linear", None, [str(llama_family.sources[0]), stranger], N_LAYERS,
                       {"weight": [1.0, 1.0]})
    with pytest.raises(RecipeError, match=f"source '{stranger}' is not one of the engine"):
        llama_engine.merge_into(model, r)
    with pytest.raises(RecipeError, match="cover 2 layers, the checkpoints have 4"):
        llama_engine.merge_into(model, Recipe.uniform("linear", None, [str(llama_family.base)], 2,
                                                      {"weight": [1.0]}))
    with pytest.raises(RecipeError, match="dtype 'bfloat16'"):
        llama_engine.merge_into(model, Recipe.uniform("linear", None, [str(llama_family.base)],
                                                      N_LAYERS, {"weight": [1.0]},
                                                      dtype="bfloat16"))
    assert all(torch.equal(before[k], v) for k, v in state(model).items())  # nothing written


def test_non_finite_merge_names_tensor_and_method(llama_family: TinyFamily,
                                                  llama_engine: MergeEngine) -> None:
    r = recipe(llama_family, "linear", {"weight": [1.0, -1.0, 0.0]})  # weights sum to zero
    with pytest.raises(NonFiniteMergeError, match=r"merged tensor '.+' holds NaN or inf \(method 'linear'\)"):
        llama_engine.merge_into(llama_engine.new_model(), r)


def test_nan_in_a_source_is_caught_at_construction(llama_family: TinyFamily, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(llama_family.sources[1], broken)
    tensors = load_file(broken / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    base, sources = open_family(llama_family)
    with pytest.raises(MergeError, match="broken: tensor 'model.layers.1.mlp.down_proj.weight' holds NaN"):
        MergeEngine(base, [sources[0], open_checkpoint(broken)], device="cpu")


def test_resident_bytes_counts_inputs_and_statistics(llama_family: TinyFamily, engine_plan: str) -> None:
    base, sources = open_family(llama_family)
    engine = MergeEngine(base, sources, device="cpu")
    n = sum(torch.Size(s).numel() for s in base.shapes.values())
    # fp32 checkpoints: held as stored; lean holds a source tensor equal to the base's once
    changed = sum(base.read(name).numel() for source in sources for name in base.shapes
                  if not torch.equal(source.read(name).view(-1).view(torch.uint8), base.read(name).view(-1).view(torch.uint8)))
    held = {"stream": 0, "lean": 4 * (n + changed)}.get(engine_plan, 4 * n * (1 + len(sources)))
    assert engine.resident_bytes() == held  # stream: nothing (no sketch on tensors this small)
    for method in ("ties", "dare_ties", "linear", "breadcrumbs_ties"):
        engine.materialize(recipe(llama_family, method, *RECIPES[method]))
        if method == "ties" and engine_plan == "resident":
            assert engine.resident_bytes() == 4 * n * (1 + 2 * len(sources))  # + sorted magnitudes
    # the lean plans keep nothing of a trial: no task vectors, sorted copies, keys or sources
    assert (engine.resident_bytes() == held) == (engine_plan != "resident")


def test_lean_plan_holds_bf16_checkpoints_as_stored(llama_family: TinyFamily, tmp_path: Path) -> None:
    """bf16 checkpoints stay bf16 in the lean plan (half the bytes of fp32 arithmetic) and every
    method merges them into the resident plan's tensors bit for bit, in fp32 and in bf16."""
    bf16 = bf16_copy(llama_family, tmp_path)
    base, sources = open_family(bf16)
    n = sum(torch.Size(s).numel() for s in base.shapes.values())
    # a source tensor equal to the base's is held once (the base's)
    changed = sum(base.read(name).numel() for source in sources for name in base.shapes
                  if not torch.equal(source.read(name).view(-1).view(torch.uint8), base.read(name).view(-1).view(torch.uint8)))
    for dtype in (torch.float32, torch.bfloat16):
        resident = MergeEngine(base, sources, device="cpu", dtype=dtype, plan="resident")
        lean = MergeEngine(base, sources, device="cpu", dtype=dtype, plan="lean")
        assert lean.plan == "lean" and lean.resident_bytes() == 2 * (n + changed)
        for method in sorted(RECIPES):
            r = dataclasses.replace(recipe(bf16, method, *RECIPES[method]), dtype=str(dtype).removeprefix("torch."))
            expected, merged = resident.materialize(r), lean.materialize(r)
            assert merged.keys() == expected.keys()
            for name, tensor in expected.items():
                assert torch.equal(merged[name], tensor), (dtype, method, name)
        # the live model: built from the held bf16 tensors (lean), from the file (resident), the same
        from_held, from_file = state(lean.new_model()), state(resident.new_model())
        assert from_held.keys() == from_file.keys()
        for name, tensor in from_file.items():
            assert from_held[name].dtype == tensor.dtype == dtype and torch.equal(from_held[name], tensor), name


def test_lean_live_model_owns_its_memory(llama_family: TinyFamily) -> None:
    """The lean plan builds the live model from its held tensors; a merge into it leaves them as they were."""
    base, sources = open_family(llama_family)
    lean = MergeEngine(base, sources, device="cpu", plan="lean")
    held = {name: tensors[0].clone() for name, tensors in lean._held.items()}
    model = lean.new_model()
    assert state(model).keys() == state(MergeEngine(base, sources, device="cpu").new_model()).keys()
    lean.merge_into(model, recipe(llama_family, "ties", *RECIPES["ties"]))
    assert all(torch.equal(lean._held[name][0], tensor) for name, tensor in held.items())
    assert any(not torch.equal(p.detach().reshape(-1), held[n]) for n, p in model.named_parameters() if n in held)


def test_tied_magnitudes_follow_mergekit_sort_order(tmp_path: Path, engine_plan: str) -> None:
    """Quantised fine-tunes: many equal |delta| straddle the TIES / breadcrumbs cut, where the
    engine falls back to mergekit's own sort order; the merge must still equal the reference."""
    from tests.checkpoints import quantised_family

    quantised_family(tmp_path, seed=4, source_seed=100)
    base = open_checkpoint(tmp_path / "base")
    sources = [open_checkpoint(tmp_path / f"source{i}") for i in range(2)]
    engine = MergeEngine(base, sources, device="cpu")
    resident = MergeEngine(base, sources, device="cpu", plan="resident")
    paths = [str(tmp_path / f"source{i}") for i in range(2)]
    for method, extra in (("ties", {}), ("breadcrumbs_ties", {"gamma": [0.05, 0.1]})):
        params = {"weight": [0.7, 0.4], "density": [0.35, 0.6], **extra}
        r = Recipe.uniform(method, str(tmp_path / "base"), paths, 2, params)
        merged = engine.materialize(r)
        for name, tensor in resident.materialize(r).items():  # every plan: the same tensors, bit for bit
            assert torch.equal(merged[name], tensor), name
        for name in merged:
            expected = merge_task_vectors(
                method, base.read(name), [s.read(name) for s in sources], weights=params["weight"],
                densities=params["density"], gammas=extra.get("gamma"))
            torch.testing.assert_close(merged[name], expected, rtol=1e-6, atol=1e-7)
    n = sum(torch.Size(shape).numel() for shape in base.shapes.values())
    if engine_plan == "resident":  # sort positions were kept for some tensors: beyond base, deltas and sorted magnitudes
        assert engine.resident_bytes() > 4 * n * (1 + 2 * len(sources))
    else:  # formed per trial and dropped (stream: the inputs too)
        assert engine.resident_bytes() == (0 if engine_plan == "stream" else 4 * n * (1 + len(sources)))


def test_engine_without_base_merges_linear(llama_family: TinyFamily) -> None:
    _, sources = open_family(llama_family)
    engine = MergeEngine(None, sources, device="cpu")
    paths = [str(s) for s in llama_family.sources]
    r = Recipe.uniform("linear", None, paths, N_LAYERS, {"weight": WEIGHTS})
    merged = engine.materialize(r)
    name = "model.layers.3.mlp.down_proj.weight"
    torch.testing.assert_close(merged[name], linear([s.read(name) for s in sources], WEIGHTS),
                               rtol=1e-6, atol=1e-7)
    model = engine.new_model()
    engine.merge_into(model, r)
    assert_model_equals(model, merged)
    with pytest.raises(RecipeError, match="'ties' needs a base model"):
        engine.materialize(Recipe.uniform("ties", None, paths, N_LAYERS, {"weight": WEIGHTS}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_finite_agrees_with_isfinite_entry_by_entry(dtype: torch.dtype) -> None:
    """The engine's output check: a sum first, entries only when the sum is not finite. Finite
    entries whose sum overflows are finite; one NaN or inf anywhere is not."""
    from merges.engine import all_finite

    big = torch.finfo(dtype).max
    cases = [torch.zeros(5), torch.full((7,), big), torch.tensor([big, big, -1.0]),
             torch.tensor([1.0, float("nan")]), torch.tensor([float("inf"), 2.0]),
             torch.tensor([float("-inf"), float("inf")]), torch.tensor([-big, float("-inf")])]
    for values in cases:
        tensor = values.to(dtype)
        assert all_finite(tensor) == bool(torch.isfinite(tensor).all()), values
