"""Opening checkpoint folders: safetensors, shards, lazy mmap reads, pickle opt-in, errors."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merges.checkpoint import Checkpoint, open_checkpoint
from merges.errors import CheckpointError
from tests.checkpoints import TinyFamily, save, tiny_model


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A 6-layer Llama saved in many small shards, with its state dict."""
    model = tiny_model("llama", seed=3, layers=6)
    folder = tmp_path_factory.mktemp("sharded") / "llama6"
    model.save_pretrained(folder, max_shard_size="20KB")
    return folder, {k: v.clone() for k, v in model.state_dict().items()}


def test_open_reads_config_shapes_dtypes_and_layout(llama_family: TinyFamily) -> None:
    ckpt = open_checkpoint(llama_family.base)
    on_disk = load_file(llama_family.base / "model.safetensors")
    assert ckpt.label == "base"
    assert ckpt.config["model_type"] == "llama"
    assert set(ckpt.shapes) == set(on_disk)
    assert all(ckpt.shapes[n] == tuple(t.shape) for n, t in on_disk.items())
    assert all(ckpt.dtypes[n] == t.dtype for n, t in on_disk.items())
    assert ckpt.layout.n_layers == 4
    assert [i.name for i in ckpt.layout.tensors] == list(ckpt.shapes)
    for name, tensor in on_disk.items():
        assert torch.equal(ckpt.read(name), tensor)


def test_read_casts_and_rejects_unknown_names(llama_family: TinyFamily) -> None:
    ckpt = open_checkpoint(llama_family.base)
    name = "model.layers.2.mlp.up_proj.weight"
    half = ckpt.read(name, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    assert torch.equal(half, ckpt.read(name).to(torch.bfloat16))
    with pytest.raises(CheckpointError, match="model.layers.9.mlp.up_proj.weight"):
        ckpt.read("model.layers.9.mlp.up_proj.weight")


def test_tokenizer_files_are_listed(llama_family: TinyFamily) -> None:
    files = open_checkpoint(llama_family.base).tokenizer_files()
    assert {f.name for f in files} == {"tokenizer.json", "tokenizer_config.json"}
    assert all(f.parent == llama_family.base for f in files)


def test_sharded_checkpoint_reads_every_tensor(
    sharded: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    folder, state = sharded
    assert len(list(folder.glob("model-*.safetensors"))) > 5
    ckpt = open_checkpoint(folder)
    assert set(ckpt.shapes) == set(state)
    assert ckpt.layout.n_layers == 6
    for name, tensor in state.items():
        assert torch.equal(ckpt.read(name), tensor), name
    # Checkpoint order follows the shards: the embedding (first shard) before the last layer.
    order = list(ckpt.shapes)
    assert order.index("model.embed_tokens.weight") < order.index(
        "model.layers.5.mlp.down_proj.weight"
    )


def test_shard_handles_stay_open(
    sharded: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    """Each shard is opened once and kept: replacing a file on disk later does not change reads."""
    folder = tmp_path / "copy"
    shutil.copytree(sharded[0], folder)
    ckpt = open_checkpoint(folder)
    name = "model.layers.3.self_attn.q_proj.weight"
    before = ckpt.read(name)
    shard = (
        folder
        / json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][name]
    )
    replacement = folder / "replacement"
    replacement.write_bytes(b"not a safetensors file")
    os.replace(replacement, shard)  # new inode; an already-open memory map still sees the old one
    assert torch.equal(ckpt.read(name), before)
    with pytest.raises(CheckpointError, match=shard.name):
        open_checkpoint(folder)


def _write_sparse_safetensors(path: Path, big_bytes: int) -> None:
    """A safetensors file whose big tensor is a sparse hole of zeros (no disk, no page cache)."""
    header = {
        "model.layers.0.input_layernorm.weight": {
            "dtype": "F32",
            "shape": [4],
            "data_offsets": [0, 16],
        },
        "model.embed_tokens.weight": {
            "dtype": "F32",
            "shape": [big_bytes // 16, 4],
            "data_offsets": [16, 16 + big_bytes],
        },
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.write(struct.pack("<4f", 1.0, 2.0, 3.0, 4.0))
        f.truncate(8 + len(raw) + 16 + big_bytes)


def _bytes_read_by_this_process() -> int:
    # rchar counts bytes passed through read(); pages of a memory map do not count.
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def _resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
def test_reading_one_tensor_does_not_read_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1}))
    big = 256 * 2**20
    _write_sparse_safetensors(folder / "model.safetensors", big)
    before, resident_before = _bytes_read_by_this_process(), _resident_bytes()
    ckpt = open_checkpoint(folder)
    small = ckpt.read("model.layers.0.input_layernorm.weight")
    read = _bytes_read_by_this_process() - before
    # Neither read() through the file nor a materialised copy of the big tensor held alive.
    assert _resident_bytes() - resident_before < big // 4
    assert small.tolist() == [1.0, 2.0, 3.0, 4.0]
    assert ckpt.shapes["model.embed_tokens.weight"] == (big // 16, 4)
    assert read < big // 64, f"read {read} bytes to get one 16-byte tensor"


def test_pickle_weights_need_opt_in(tmp_path: Path) -> None:
    model = tiny_model("gpt2", seed=1, layers=2)
    folder = tmp_path / "pickled"
    folder.mkdir()
    model.config.to_json_file(folder / "config.json")
    state = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*allow_pickle=True"):
        open_checkpoint(folder)
    ckpt = open_checkpoint(folder, allow_pickle=True)
    assert ckpt.layout.tied_embeddings and ckpt.layout.n_layers == 2
    assert set(ckpt.shapes) == set(state)
    for name, tensor in state.items():
        assert torch.equal(ckpt.read(name), tensor)
        assert ckpt.dtypes[name] == tensor.dtype


def test_sharded_pickle_index_with_opt_in(tmp_path: Path) -> None:
    model = tiny_model("llama", seed=4, layers=2)
    folder = tmp_path / "pickled-shards"
    folder.mkdir()
    model.config.to_json_file(folder / "config.json")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    names = list(state)
    halves = {
        "pytorch_model-00001-of-00002.bin": names[:5],
        "pytorch_model-00002-of-00002.bin": names[5:],
    }
    for file, part in halves.items():
        torch.save({n: state[n] for n in part}, folder / file)
    weight_map = {n: file for file, part in halves.items() for n in part}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        open_checkpoint(folder)
    ckpt = open_checkpoint(folder, allow_pickle=True)
    assert list(ckpt.shapes) == names
    for name, tensor in state.items():
        assert torch.equal(ckpt.read(name), tensor), name


def test_single_pt_file_with_opt_in(tmp_path: Path) -> None:
    model = tiny_model("llama", seed=2, layers=2)
    folder = tmp_path / "pt"
    folder.mkdir()
    model.config.to_json_file(folder / "config.json")
    torch.save(model.state_dict(), folder / "weights.pt")
    with pytest.raises(CheckpointError, match="weights.pt"):
        open_checkpoint(folder)
    ckpt = open_checkpoint(folder, allow_pickle=True)
    assert torch.equal(ckpt.read("model.norm.weight"), model.state_dict()["model.norm.weight"])


def test_missing_folder_config_weights_and_shard(
    tmp_path: Path, sharded: tuple[Path, dict]
) -> None:
    with pytest.raises(CheckpointError, match="nowhere"):
        open_checkpoint(tmp_path / "nowhere")
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(CheckpointError, match=r"empty/config\.json"):
        open_checkpoint(folder)
    (folder / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"empty: no weights found"):
        open_checkpoint(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot parse config.json"):
        open_checkpoint(folder)

    broken = tmp_path / "broken"
    shutil.copytree(sharded[0], broken)
    lost = sorted(broken.glob("model-*.safetensors"))[2]
    lost.unlink()
    with pytest.raises(CheckpointError, match=lost.name):
        open_checkpoint(broken)


def test_index_naming_a_tensor_its_shard_lacks(tmp_path: Path, sharded: tuple[Path, dict]) -> None:
    folder = tmp_path / "lying-index"
    shutil.copytree(sharded[0], folder)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.0.extra.weight"] = index["weight_map"]["model.norm.weight"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model.layers.0.extra.weight"):
        open_checkpoint(folder)


def test_checkpoint_survives_pickling(gpt2_family: TinyFamily) -> None:
    """A Checkpoint can be sent to another process (e.g. a Ray actor); handles reopen there."""
    ckpt = open_checkpoint(gpt2_family.sources[0])
    name = "transformer.h.1.attn.c_attn.weight"
    expected = ckpt.read(name)
    copy: Checkpoint = pickle.loads(pickle.dumps(ckpt))
    assert copy.path == ckpt.path and copy.shapes == ckpt.shapes
    assert torch.equal(copy.read(name), expected)


def test_folder_saved_by_test_factory_opens_for_both_families(tmp_path: Path) -> None:
    for arch, prefix in (("llama", "model.layers."), ("gpt2", "transformer.h.")):
        folder = save(tiny_model(arch, layers=3), tmp_path / arch)
        ckpt = open_checkpoint(str(folder))  # str paths too
        assert ckpt.path == folder
        assert (ckpt.layout.n_layers, ckpt.layout.layer_prefix) == (3, prefix)
