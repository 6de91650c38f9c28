"""Saving merged tensors: round trip, shards, tied heads, frankenmerges, atomicity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from merges.checkpoint import Checkpoint, open_checkpoint
from merges.errors import CheckpointError, NonFiniteMergeError
from merges.output import MARKER, OutputError
from merges.save import save_checkpoint
from tests.checkpoints import TinyFamily


def _source_tensors(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    return {name: ckpt.read(name) for name in ckpt.shapes}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_round_trip_through_from_pretrained(llama_family: TinyFamily, tmp_path: Path) -> None:
    base = open_checkpoint(llama_family.base)
    tensors = _source_tensors(open_checkpoint(llama_family.sources[0]))
    out = save_checkpoint(tensors, tmp_path / "merged", like=base)
    assert out == tmp_path / "merged"
    assert {p.name for p in out.iterdir()} == {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        MARKER,
    }
    assert (out / "tokenizer.json").read_bytes() == (
        llama_family.base / "tokenizer.json"
    ).read_bytes()
    model = AutoModelForCausalLM.from_pretrained(out)
    state = model.state_dict()
    assert set(state) == set(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(state[name], tensor), name
    reopened = open_checkpoint(out)
    assert reopened.layout == base.layout


def test_tied_head_is_written_once(gpt2_family: TinyFamily, tmp_path: Path) -> None:
    base = open_checkpoint(gpt2_family.base)
    assert base.layout.tied_embeddings
    live = AutoModelForCausalLM.from_pretrained(gpt2_family.sources[1])
    tensors = dict(live.state_dict())  # includes lm_head.weight, the tied copy
    assert "lm_head.weight" in tensors
    out = save_checkpoint(tensors, tmp_path / "tied", like=base)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert torch.equal(loaded["lm_head.weight"], tensors["transformer.wte.weight"])
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor), name


def test_dtype_cast_updates_config(llama_family: TinyFamily, tmp_path: Path) -> None:
    base = open_checkpoint(llama_family.base)
    tensors = _source_tensors(base)
    out = save_checkpoint(tensors, tmp_path / "bf16", like=base, dtype=torch.bfloat16)
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    reopened = open_checkpoint(out)
    assert set(reopened.dtypes.values()) == {torch.bfloat16}
    name = "model.layers.1.self_attn.o_proj.weight"
    assert torch.equal(reopened.read(name), tensors[name].to(torch.bfloat16))


def test_sharded_save_writes_an_index_that_loads(llama_family: TinyFamily, tmp_path: Path) -> None:
    base = open_checkpoint(llama_family.base)
    tensors = _source_tensors(open_checkpoint(llama_family.sources[2]))
    out = save_checkpoint(tensors, tmp_path / "sharded", like=base, max_shard_bytes=10_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 3 and not (out / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(tensors)
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in tensors.values()
    )
    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor), name


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(limit=st.integers(1_000, 200_000), scale=st.floats(-3.0, 3.0))
def test_any_shard_limit_preserves_tensors(
    llama_family: TinyFamily, tmp_path_factory: pytest.TempPathFactory, limit: int, scale: float
) -> None:
    base = open_checkpoint(llama_family.base)
    tensors = {name: base.read(name) * scale for name in base.shapes}
    out = save_checkpoint(
        tensors, tmp_path_factory.mktemp("any") / "out", like=base, max_shard_bytes=limit
    )
    reopened = open_checkpoint(out)
    for name, tensor in tensors.items():
        assert torch.equal(reopened.read(name), tensor), name
    for shard in out.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            names = list(f.keys())
        size = sum(tensors[n].numel() * tensors[n].element_size() for n in names)
        assert size <= limit or len(names) == 1


def test_frankenmerge_with_layer_count_override(llama_family: TinyFamily, tmp_path: Path) -> None:
    """Layers [0, 1, 2, 3, 2, 3] stacked into a 6-layer model, like a passthrough merge."""
    base = open_checkpoint(llama_family.base)
    order = [0, 1, 2, 3, 2, 3]
    tensors: dict[str, torch.Tensor] = {}
    for info in base.layout.tensors:
        if info.layer is None:
            tensors[info.name] = base.read(info.name)
    for new_layer, old_layer in enumerate(order):
        for info in base.layout.layer_tensors(old_layer):
            tensors[base.layout.rename_layer(info.name, new_layer)] = base.read(info.name)

    with pytest.raises(
        CheckpointError, match=r"num_hidden_layers = 4 but the tensor names hold 6 layers"
    ):
        save_checkpoint(tensors, tmp_path / "franken", like=base)
    assert not (tmp_path / "franken").exists()

    out = save_checkpoint(
        tensors, tmp_path / "franken", like=base, config_overrides={"num_hidden_layers": 6}
    )
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 6
    state = model.state_dict()
    for new_layer, old_layer in enumerate(order):
        assert torch.equal(
            state[f"model.layers.{new_layer}.mlp.up_proj.weight"],
            base.read(f"model.layers.{old_layer}.mlp.up_proj.weight"),
        )


def test_failed_save_leaves_existing_folder_unchanged(
    llama_family: TinyFamily, tmp_path: Path
) -> None:
    base = open_checkpoint(llama_family.base)
    out = save_checkpoint(_source_tensors(base), tmp_path / "out", like=base)
    before = _files(out)
    good = _source_tensors(open_checkpoint(llama_family.sources[0]))

    # A NaN in a late tensor fails after several shards were already written.
    poisoned = dict(good)
    last = list(poisoned)[-1]
    poisoned[last] = poisoned[last].clone()
    poisoned[last].view(-1)[3] = float("nan")
    with pytest.raises(NonFiniteMergeError, match=last):
        save_checkpoint(poisoned, out, like=base, max_shard_bytes=10_000, overwrite=True)
    assert _files(out) == before

    # A finite input with a wrong key fails the name check.
    misnamed = dict(good)
    misnamed["model.layers.1.mlp.up_projection.weight"] = misnamed.pop(
        "model.layers.1.mlp.up_proj.weight"
    )
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_projection.weight"):
        save_checkpoint(misnamed, out, like=base, overwrite=True)
    assert _files(out) == before

    # A tensor the base has is missing; a shape differs.
    lacking = {k: v for k, v in good.items() if k != "model.norm.weight"}
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        save_checkpoint(lacking, out, like=base, overwrite=True)
    wrong_shape = {**good, "model.layers.0.mlp.down_proj.weight": torch.zeros(32, 63)}
    with pytest.raises(
        CheckpointError, match=r"down_proj.weight' has shape \[32, 63\], base 'base' has \[32, 64\]"
    ):
        save_checkpoint(wrong_shape, out, like=base, overwrite=True)
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folders left behind

    # Without --overwrite a good save is refused; with it, it replaces the folder.
    with pytest.raises(OutputError, match="pass --overwrite"):
        save_checkpoint(good, out, like=base)
    assert _files(out) == before
    save_checkpoint(good, out, like=base, overwrite=True)
    assert _files(out) != before
    assert torch.equal(open_checkpoint(out).read(last), good[last])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_refuses_to_overwrite_its_base(llama_family: TinyFamily) -> None:
    base = open_checkpoint(llama_family.base)
    before = _files(llama_family.base)
    for target in (llama_family.base, llama_family.base.parent):  # the base, or a folder holding it
        for overwrite in (False, True):
            with pytest.raises(OutputError, match="base checkpoint"):
                save_checkpoint(_source_tensors(base), target, like=base, overwrite=overwrite)
    assert _files(llama_family.base) == before


def test_config_overrides_and_generation_config(gpt2_family: TinyFamily, tmp_path: Path) -> None:
    base = open_checkpoint(gpt2_family.base)
    out = save_checkpoint(
        _source_tensors(base), tmp_path / "g", like=base, config_overrides={"use_cache": False}
    )
    config = json.loads((out / "config.json").read_text())
    assert config["use_cache"] is False
    assert config["n_layer"] == 4 and config["model_type"] == "gpt2"
    assert (out / "generation_config.json").read_text() == (
        gpt2_family.base / "generation_config.json"
    ).read_text()
