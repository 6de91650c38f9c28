"""Saving merged tensors: round trip, shards, tied heads, frankenmerges, atomicity."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save, save_file
from transformers import AutoModelForCausalLM

from merges.checkpoint import Checkpoint, open_checkpoint
from merges.errors import CheckpointError, NonFiniteMergeError
from merges.output import MARKER, OutputError
from merges.save import DEFAULT_MAX_SHARD_BYTES, TensorSpec, save_checkpoint, save_checkpoint_stream
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


# -- the streamed writer ----------------------------------------------------------------------


def _specs(tensors: dict[str, torch.Tensor]) -> list[TensorSpec]:
    return [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]


def _mixed(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, every third in bfloat16 and every fifth in float16 (safetensors
    orders a file's tensors by dtype, then name: the header must follow)."""
    tensors = _source_tensors(ckpt)
    for index, name in enumerate(tensors):
        if index % 3 == 0:
            tensors[name] = tensors[name].to(torch.bfloat16)
        elif index % 5 == 0:
            tensors[name] = tensors[name].to(torch.float16)
    return tensors


@pytest.mark.parametrize("limit", [DEFAULT_MAX_SHARD_BYTES, 10_000])
def test_each_file_is_what_save_file_writes(llama_family: TinyFamily, tmp_path: Path, limit: int) -> None:
    base = open_checkpoint(llama_family.base)
    tensors = _mixed(open_checkpoint(llama_family.sources[0]))
    out = save_checkpoint(tensors, tmp_path / "out", like=base, max_shard_bytes=limit)
    files = sorted(out.glob("*.safetensors"))
    assert (len(files) > 3) == (limit == 10_000)
    written: list[str] = []
    for file in files:
        with safe_open(str(file), "pt") as f:
            names = list(f.keys())
        written += names
        expected = tmp_path / "expected.safetensors"
        save_file({n: tensors[n] for n in names}, str(expected), metadata={"format": "pt"})
        assert file.read_bytes() == expected.read_bytes(), file.name
    assert sorted(written) == sorted(tensors)


def test_header_is_safetensors_for_every_dtype() -> None:
    """Every dtype the writer knows, a 0-d and an empty tensor and a non-ASCII name: the header
    and the offsets are those of safetensors' own serialisation."""
    from merges.save import _SAFETENSORS_DTYPES, _shard

    tensors = {f"t{index:02d}": torch.zeros(index % 3 + 1, 2).to(dtype)
               for index, dtype in enumerate(reversed(_SAFETENSORS_DTYPES))}
    tensors.update({"scalar": torch.tensor(1.5), "empty": torch.zeros(0, 4), "größe": torch.ones(3)})
    expected = save(tensors, metadata={"format": "pt"})
    shard = _shard("x.safetensors", _specs(tensors), None)
    assert expected.startswith(shard.header)
    for name, tensor in tensors.items():
        raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        assert expected[shard.offsets[name]:shard.offsets[name] + len(raw)] == raw, name
    assert len(expected) == len(shard.header) + shard.nbytes


@pytest.mark.parametrize("limit", [DEFAULT_MAX_SHARD_BYTES, 20_000])
def test_stream_writes_the_files_of_the_dict(gpt2_family: TinyFamily, tmp_path: Path, limit: int) -> None:
    """Fed one tensor at a time (the tied head among them, skipped), the files are the dict's;
    a cast to bfloat16 applies to each tensor as it comes."""
    base = open_checkpoint(gpt2_family.base)
    tensors = dict(AutoModelForCausalLM.from_pretrained(gpt2_family.sources[1]).state_dict())
    assert base.layout.is_tied_head("lm_head.weight") and "lm_head.weight" in tensors
    kwargs = {"like": base, "max_shard_bytes": limit, "dtype": torch.bfloat16}
    whole = save_checkpoint(tensors, tmp_path / "dict", **kwargs)

    def one_at_a_time() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in tensors.items():
            yield name, tensor.clone()  # a fresh buffer each time, as a chunked engine's

    streamed = save_checkpoint_stream(_specs(tensors), one_at_a_time(), tmp_path / "stream", **kwargs)
    dict_files, stream_files = _files(whole), _files(streamed)
    assert (len([n for n in dict_files if n.endswith(".safetensors")]) > 1) == (limit == 20_000)
    del dict_files[MARKER], stream_files[MARKER]  # mtimes differ
    assert stream_files == dict_files
    loaded = AutoModelForCausalLM.from_pretrained(streamed, dtype=torch.bfloat16).state_dict()
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor.to(torch.bfloat16)), name


def test_an_error_mid_stream_leaves_the_output_as_it_was(llama_family: TinyFamily, tmp_path: Path) -> None:
    base = open_checkpoint(llama_family.base)
    tensors = _source_tensors(open_checkpoint(llama_family.sources[0]))

    def failing(after: int) -> Iterator[tuple[str, torch.Tensor]]:
        for index, item in enumerate(tensors.items()):
            if index == after:
                raise RuntimeError("the merge failed")
            yield item

    for limit in (DEFAULT_MAX_SHARD_BYTES, 10_000):  # in the only file, or after whole shards
        with pytest.raises(RuntimeError, match="the merge failed"):
            save_checkpoint_stream(_specs(tensors), failing(len(tensors) - 2), tmp_path / "out",
                                   like=base, max_shard_bytes=limit)
        assert list(tmp_path.iterdir()) == []
    out = save_checkpoint(_source_tensors(base), tmp_path / "out", like=base)
    before = _files(out)
    with pytest.raises(RuntimeError, match="the merge failed"):
        save_checkpoint_stream(_specs(tensors), failing(5), out, like=base, overwrite=True)
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_tensor_unlike_its_spec_is_named(llama_family: TinyFamily, tmp_path: Path) -> None:
    base = open_checkpoint(llama_family.base)
    tensors = _source_tensors(base)
    specs = _specs(tensors)
    items = list(tensors.items())
    name, tensor = items[4]
    last = items[-1][0]
    cases = [  # (the stream, what the message says, the tensor it names)
        ([*items[:4], items[5], items[4], *items[6:]], "arrived where", items[5][0]),  # out of order
        ([*items[:4], (name, tensor.half()), *items[5:]], r"as \[64, 32\] torch.float16, expected \[64, 32\] "
         "torch.float32", name),
        ([*items[:4], (name, tensor[None]), *items[5:]], r"as \[1, 64, 32\] torch.float32, expected", name),
        (items[:-1], "never arrived", last),
        ([*items, ("model.extra.weight", tensor)], "after the last expected one", "model.extra.weight"),
    ]
    for stream, message, named in cases:
        with pytest.raises(CheckpointError, match=message) as raised:
            save_checkpoint_stream(specs, iter(stream), tmp_path / "out", like=base)
        assert f"tensor {named!r}" in str(raised.value), message
        assert list(tmp_path.iterdir()) == []
    with pytest.raises(CheckpointError, match=f"{name!r} is listed twice"):
        save_checkpoint_stream([*specs, specs[4]], iter(items), tmp_path / "out", like=base)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_nan_and_inf_are_refused_in_every_float_dtype(dtype: torch.dtype) -> None:
    from merges.save import _stored_bytes

    good = torch.linspace(-2, 2, 50).to(dtype).view(5, 10)
    assert bytes(_stored_bytes("w", good[:, ::2], None)) == good[:, ::2].contiguous().view(torch.uint8).numpy().tobytes()
    for bad in (float("nan"), float("inf"), -float("inf")):
        poisoned = good.clone()
        poisoned[3, 7] = bad
        for tensor in (poisoned, poisoned[:, 1::2]):  # contiguous or a strided view
            with pytest.raises(NonFiniteMergeError, match="'w' holds NaN or inf"):
                _stored_bytes("w", tensor, None)
