"""LoRA sources (``MODEL+ADAPTER``) against real peft and real mergekit 0.1.5.

The adapters are made with peft on tiny models (random A and B, so every targeted
tensor moves). mergekit folds a ``model+lora`` with transformers + peft
(``ModelReference.merged``); ``merges.lora`` folds without loading a model, and must give
the same tensors bit for bit, in the model's own dtype.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from mergekit.common import ModelReference
from safetensors.torch import load_file

from merges.checkpoint import open_checkpoint
from merges.engine import MergeEngine
from merges.errors import CheckpointError
from merges.lora import LoraCheckpoint
from merges.recipe import Recipe
from search.cli import main as search_main
from search.commands.validate import check_checkpoints
from search.config import load_study
from search.errors import StudyConfigError
from tests.checkpoints import TinyFamily, lora_adapter, perturbed, save, tiny_model
from tests.studies import run, write_study
from tests.test_mergekit_golden import assert_same_tensors

pytestmark = pytest.mark.slow

MERGEKIT_YAML = str(Path(sys.executable).with_name("mergekit-yaml"))
LLAMA_TARGETS = ("q_proj", "v_proj", "down_proj", "embed_tokens")


@pytest.fixture(scope="module")
def lora_family(tmp_path_factory: pytest.TempPathFactory) -> tuple[TinyFamily, Path]:
    """A tiny llama base, two full fine-tunes, and a LoRA adapter of the base."""
    root = tmp_path_factory.mktemp("lora")
    model = tiny_model("llama", seed=3)
    base = save(model, root / "base")
    sources = tuple(save(perturbed(model, seed=30 + i), root / f"source{i}") for i in range(2))
    adapter = lora_adapter(model, root / "adapter", seed=7, targets=LLAMA_TARGETS)
    return TinyFamily(base, sources), adapter


def _mergekit_fold(model: Path, adapter: Path, cache: Path) -> dict[str, torch.Tensor]:
    merged = ModelReference.parse(f"{model}+{adapter}").merged(cache_dir=str(cache))
    return load_file(Path(merged.model.path) / "model.safetensors")


@pytest.mark.parametrize(("arch", "dtype", "targets", "options"), [
    ("llama", torch.float32, LLAMA_TARGETS, {}),
    ("llama", torch.bfloat16, LLAMA_TARGETS, {"use_rslora": True}),
    ("llama", torch.float16, ("o_proj", "up_proj", "lm_head"), {}),
    ("gpt2", torch.float32, ("c_attn", "c_fc", "wte"), {}),  # GPT-2's Conv1D: stored transposed
])
def test_fold_equals_mergekits_peft_fold_bit_for_bit(arch: str, dtype: torch.dtype, targets: tuple[str, ...],
                                                     options: dict[str, object], tmp_path: Path) -> None:
    model = tiny_model(arch, seed=1).to(dtype)
    base = save(model, tmp_path / "base")
    adapter = lora_adapter(model, tmp_path / "adapter", seed=2, targets=targets, **options)
    theirs = _mergekit_fold(base, adapter, tmp_path / "cache")
    ours = open_checkpoint(f"{base}+{adapter}")
    assert isinstance(ours, LoraCheckpoint)
    assert set(ours.shapes) == set(theirs)
    moved = 0
    for name, tensor in theirs.items():
        mine = ours.read(name)
        assert mine.dtype == tensor.dtype == ours.dtypes[name], name
        assert torch.equal(mine, tensor), name
        moved += not torch.equal(tensor, open_checkpoint(base).read(name))
    assert moved >= len(targets)  # every target changed in at least one layer


def test_search_merge_of_a_model_plus_lora_yaml_matches_mergekit_yaml(
    lora_family: tuple[TinyFamily, Path], tmp_path: Path
) -> None:
    family, adapter = lora_family
    config = tmp_path / "ties.yaml"
    config.write_text(yaml.safe_dump({
        "merge_method": "ties",
        "base_model": str(family.base),
        "models": [
            {"model": str(family.sources[0]), "parameters": {"weight": 0.6, "density": 0.7}},
            {"model": f"{family.base}+{adapter}", "parameters": {"weight": 0.5, "density": 0.5}},
        ],
        "dtype": "float32",
    }))
    ours = tmp_path / "ours"
    assert search_main(["merge", str(config), str(ours)]) == 0
    theirs = tmp_path / "theirs"
    done = subprocess.run([MERGEKIT_YAML, str(config), str(theirs), "--no-lazy-unpickle",
                           "--lora-merge-cache", str(tmp_path / "cache")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    layout = open_checkpoint(family.base).layout
    assert_same_tensors(load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors"), layout)


def _lora_study(folder: Path, family: TinyFamily, adapter: Path, *, trials: int) -> Path:
    """A study whose source ``s1`` is the base with the LoRA adapter, as a {model, lora} table."""
    path = write_study(folder, family, trials=trials, method="ties")
    text = path.read_text().replace(f's1 = "{family.sources[1]}"', f's1 = {{model = "{family.base}", lora = "{adapter}"}}')
    assert "lora =" in text
    path.write_text(text)
    return path


def test_a_study_with_a_lora_source_exports_model_plus_lora_that_mergekit_rebuilds(
    lora_family: tuple[TinyFamily, Path], tmp_path: Path
) -> None:
    family, adapter = lora_family
    path = _lora_study(tmp_path, family, adapter, trials=3)
    config = load_study(path)
    assert config.models.sources["s1"] == Path(f"{family.base}+{adapter}")
    run(path)
    study = optuna.load_study(study_name=config.name, storage=config.storage)
    recipe = Recipe.from_dict(study.trials[study.user_attrs["final_trial"]].user_attrs["recipe"])
    shipped = tmp_path / "ship" / "recipe.yaml"
    assert search_main(["export", str(path), "-o", str(shipped)]) == 0
    models = {s["model"] for sl in yaml.safe_load(shipped.read_text())["slices"] for s in sl["sources"]}
    lora = [m for m in models if "+" in m]  # relative to the YAML's folder, both halves
    assert len(lora) == 1 and lora[0].startswith("../") and lora[0].endswith("/base+../../lora0/adapter"), models
    rebuilt = tmp_path / "rebuilt"
    done = subprocess.run([MERGEKIT_YAML, str(shipped), str(rebuilt), "--no-lazy-unpickle",
                           "--lora-merge-cache", str(tmp_path / "cache")], cwd=shipped.parent,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    base = open_checkpoint(recipe.base)
    ours = MergeEngine(base, [open_checkpoint(p) for p in recipe.sources]).materialize(recipe)
    assert_same_tensors(ours, load_file(rebuilt / "model.safetensors"), base.layout)


# -- bad adapters: named at search validate ------------------------------------------------


def _validate_error(folder: Path, family: TinyFamily, adapter: Path) -> str:
    config = load_study(_lora_study(folder, family, adapter, trials=0))
    with pytest.raises(StudyConfigError) as caught:
        check_checkpoints(config)
    return str(caught.value)


def test_an_adapter_for_another_base_names_the_tensor_and_shapes(
    lora_family: tuple[TinyFamily, Path], tmp_path: Path
) -> None:
    family, _ = lora_family
    other = tiny_model("llama", seed=3)
    other.config.intermediate_size = 48  # another base: other MLP width
    wider = type(other)(other.config)
    adapter = lora_adapter(wider, tmp_path / "other-adapter", seed=1, targets=("down_proj",))
    message = _validate_error(tmp_path, family, adapter)
    assert "models.sources.s1" in message
    assert "model.layers.0.mlp.down_proj.weight" in message and "[32, 48]" in message and "[32, 64]" in message


@pytest.mark.parametrize(("change", "expected"), [
    ({"use_dora": True}, "use_dora = True: DoRA"),
    ({"peft_type": "IA3"}, "peft_type 'IA3'"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
])
def test_adapter_types_that_cannot_be_folded_are_named(
    change: dict[str, object], expected: str, lora_family: tuple[TinyFamily, Path], tmp_path: Path
) -> None:
    family, adapter = lora_family
    copy = tmp_path / "adapter"
    copy.mkdir()
    (copy / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    config = json.loads((adapter / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps({**config, **change}))
    message = _validate_error(tmp_path, family, copy)
    assert "models.sources.s1" in message and "adapter_config.json" in message and expected in message


def test_missing_adapter_files_are_named(lora_family: tuple[TinyFamily, Path], tmp_path: Path) -> None:
    family, adapter = lora_family
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="adapter_config.json is missing"):
        open_checkpoint(f"{family.base}+{empty}")
    (empty / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    with pytest.raises(CheckpointError, match="adapter_model.safetensors is missing"):
        open_checkpoint(f"{family.base}+{empty}")
    with pytest.raises(CheckpointError, match="does not exist"):
        open_checkpoint(f"{family.base}+{tmp_path / 'nowhere'}")


def test_a_lora_source_read_again_folds_once(lora_family: tuple[TinyFamily, Path]) -> None:
    """Every read of a LoRA source folds the adapter into a fresh copy: the stream plan reads it
    per chunk (``Checkpoint.read``: no file offsets), the resident plan again for linear (the
    sources themselves), and all plans merge the same tensors, bit for bit."""
    family, adapter = lora_family
    sources = [f"{family.base}+{adapter}", str(family.sources[0])]
    lora = open_checkpoint(sources[0])
    assert open_checkpoint(family.base).readable_by_offset and not lora.readable_by_offset
    name = "model.embed_tokens.weight"
    assert torch.equal(lora.read(name).clone(), lora.read(name))
    recipes = [Recipe.uniform("ties", str(family.base), sources, 4, {"weight": [0.6, 0.4], "density": [0.5, 0.7]}),
               Recipe.uniform("linear", str(family.base), sources, 4, {"weight": [0.6, 0.4]})]
    merged = {plan: MergeEngine(open_checkpoint(family.base), [open_checkpoint(s) for s in sources], device="cpu",
                                plan=plan) for plan in ("resident", "lean", "stream")}
    for recipe in recipes:
        expected = merged["resident"].materialize(recipe)
        for plan in ("lean", "stream"):
            ours = merged[plan].materialize(recipe)
            assert list(ours) == list(expected)
            for tensor_name, tensor in expected.items():
                assert torch.equal(ours[tensor_name], tensor), (recipe.method, plan, tensor_name)
