"""The stream engine plan: nothing held between chunks, each chunk's inputs read by file offsets
(``Checkpoint.read_into``), the resident plan's tensors bit for bit; ``iter_materialize``."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import merges.checkpoint as checkpoint_module
from merges.checkpoint import Checkpoint, open_checkpoint
from merges.engine import MergeEngine
from merges.errors import CheckpointError
from tests.checkpoints import TinyFamily, bf16_copy
from tests.test_engine import RECIPES, open_family, recipe


def assert_same(expected: dict[str, torch.Tensor], merged: dict[str, torch.Tensor], what: object) -> None:
    assert list(merged) == list(expected), what
    for name, tensor in expected.items():
        assert merged[name].dtype == tensor.dtype and torch.equal(merged[name], tensor), (what, name)


def test_read_into_equals_read_and_keeps_nothing_open(llama_family: TinyFamily) -> None:
    base = open_checkpoint(llama_family.base)
    assert base.readable_by_offset
    for name in base.names:
        out = torch.full(base.shapes[name], -7.0, dtype=base.dtypes[name])
        assert base.read_into(name, out) is out and torch.equal(out, base.read(name)), name
    base.release()
    base.read_into(base.names[0], torch.empty(base.shapes[base.names[0]], dtype=base.dtypes[base.names[0]]))
    assert not base._handles  # no memory map opened by it
    folder = str(Path(llama_family.base).resolve())
    assert not any(os.readlink(f"/proc/self/fd/{fd}").startswith(folder) for fd in os.listdir("/proc/self/fd")
                   if os.path.exists(f"/proc/self/fd/{fd}"))
    with pytest.raises(CheckpointError, match="holds .* bytes"):
        base.read_into(base.names[0], torch.empty(1, dtype=base.dtypes[base.names[0]]))


def test_stream_equals_resident_bit_for_bit(llama_family: TinyFamily) -> None:
    """Every method, float32 and bfloat16 arithmetic (float32 files: read as stored, then cast
    once); the engine holds no input and no mapped file between merges."""
    base, sources = open_family(llama_family)  # the stream engine's own: the resident one maps its files
    for dtype in (torch.float32, torch.bfloat16):
        resident = MergeEngine(*open_family(llama_family), device="cpu", dtype=dtype, plan="resident", threads=2)
        stream = MergeEngine(base, sources, device="cpu", dtype=dtype, plan="stream", threads=2)
        assert stream.plan == "stream" and stream.resident_bytes() == 0
        for method in sorted(RECIPES):
            r = dataclasses.replace(recipe(llama_family, method, *RECIPES[method]),
                                    dtype=str(dtype).removeprefix("torch."))
            assert_same(resident.materialize(r), stream.materialize(r), (dtype, method))
        assert stream.resident_bytes() == 0 and not stream._held
        assert all(not c._handles for c in (base, *sources))  # read by offset: no memory map kept


def test_stream_reads_no_memory_map(llama_family: TinyFamily, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading, merging and building the live model never open a file through safetensors."""
    base, sources = open_family(llama_family)
    expected = MergeEngine(base, sources, device="cpu", plan="resident").materialize(
        recipe(llama_family, "ties", *RECIPES["ties"]))
    for checkpoint in (base, *sources):
        checkpoint.release()

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("safe_open called")

    monkeypatch.setattr(checkpoint_module, "safe_open", refuse)
    stream = MergeEngine(base, sources, device="cpu", plan="stream")
    model = stream.new_model()
    stream.merge_into(model, recipe(llama_family, "ties", *RECIPES["ties"]))
    live = model.state_dict()
    for name, tensor in expected.items():
        assert torch.equal(live[name], tensor), name


def _shard(folder: Path, into: Path) -> Path:
    """A copy of ``folder`` with its weights split over two shards and an index."""
    shutil.copytree(folder, into)
    tensors = load_file(str(into / "model.safetensors"))
    (into / "model.safetensors").unlink()
    names = list(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(into / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (into / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return into


def test_stream_sharded_and_pickle_checkpoints(llama_family: TinyFamily, tmp_path: Path) -> None:
    """A sharded base (offsets per shard) and a pickle source (read through ``Checkpoint.read``,
    no offsets) merge as the resident plan does; the live model is the base's."""
    sharded = _shard(Path(llama_family.base), tmp_path / "base")
    pickled = tmp_path / "source0"
    shutil.copytree(llama_family.sources[0], pickled)
    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    base = open_checkpoint(sharded)
    sources = [open_checkpoint(pickled, allow_pickle=True), *map(open_checkpoint, llama_family.sources[1:])]
    assert base.readable_by_offset and not sources[0].readable_by_offset
    family = TinyFamily(sharded, (pickled, *llama_family.sources[1:]))
    resident = MergeEngine(base, sources, device="cpu", plan="resident")
    stream = MergeEngine(base, sources, device="cpu", plan="stream")
    for method in ("ties", "linear", "dare_ties"):
        r = recipe(family, method, *RECIPES[method])
        assert_same(resident.materialize(r), stream.materialize(r), method)
    from_file = resident.new_model().state_dict()
    read = stream.new_model().state_dict()
    assert read.keys() == from_file.keys()
    for name, tensor in from_file.items():
        assert torch.equal(read[name], tensor), name


def test_stream_bf16_checkpoints_and_live_model(llama_family: TinyFamily, tmp_path: Path) -> None:
    """bf16 files in float32 arithmetic: read as stored (bf16) into the chunk's buffers; the live
    model is read again and cast once, as from_pretrained casts the file; it owns its memory."""
    bf16 = bf16_copy(llama_family, tmp_path)
    base, sources = open_family(bf16)
    resident = MergeEngine(base, sources, device="cpu", plan="resident")
    stream = MergeEngine(base, sources, device="cpu", plan="stream")
    for method in ("ties", "breadcrumbs_ties", "linear"):
        r = recipe(bf16, method, *RECIPES[method])
        assert_same(resident.materialize(r), stream.materialize(r), method)
    model = stream.new_model()
    from_file = resident.new_model().state_dict()
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, from_file[name]), name
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stream.merge_into(model, recipe(bf16, "ties", *RECIPES["ties"]))
    assert any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    assert isinstance(base, Checkpoint) and torch.equal(  # the file is untouched by the merge
        base.read("model.layers.0.mlp.up_proj.weight").float(), from_file["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.parametrize("plan", ["resident", "lean", "stream"])
def test_iter_materialize_equals_materialize(llama_family: TinyFamily, plan: str) -> None:
    """Same names in the same (layout) order, dtypes and values, tensor by tensor as yielded
    (each copied at once: it is valid until the iterator moves on); out_dtype and passthrough too."""
    base, sources = open_family(llama_family)
    engine = MergeEngine(base, sources, device="cpu", plan=plan, threads=2)
    cases = [recipe(llama_family, "ties", *RECIPES["ties"]),
             dataclasses.replace(recipe(llama_family, "linear", *RECIPES["linear"]), out_dtype="bfloat16"),
             recipe(llama_family, "passthrough", {}, {}, n_sources=1)]
    for r in cases:
        expected = engine.materialize(r)
        streamed = {name: tensor.clone() for name, tensor in engine.iter_materialize(r)}
        assert list(expected) == list(engine.layout.names)
        assert_same(expected, streamed, (plan, r.method))


def test_any_thread_count_gives_the_same_bits(llama_family: TinyFamily, tmp_path: Path) -> None:
    """An inline worker merges on every core and scores on its own torch threads (search.plan):
    sound only because the engine's thread count never changes a bit: lean and stream, bf16
    checkpoints whose TIES cuts are tied and replayed side by side."""
    family = bf16_copy(llama_family, tmp_path)
    for plan in ("lean", "stream"):
        one = MergeEngine(*open_family(family), device="cpu", plan=plan, threads=1)
        three = MergeEngine(*open_family(family), device="cpu", plan=plan, threads=3)
        for method in ("ties", "dare_ties", "breadcrumbs_ties", "della"):
            r = recipe(family, method, *RECIPES[method])
            assert_same(one.materialize(r), three.materialize(r), (plan, method))


def test_sources_left_as_the_base_read_zeros_and_merge_the_same(llama_family: TinyFamily, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A source tensor equal to the base bit for bit (what a LoRA-merged fine-tune leaves in most
    tensors) is not subtracted per trial: lean and stream read its task vector from one zero buffer,
    lean holds it once (the base's tensor) and stream does not read it, and every method still gives
    the resident plan's bits. A tensor that differs from the base only
    by -0.0 against +0.0 has a -0.0 delta there, so it is not taken for one."""
    from merges.methods import magnitude_sketch

    monkeypatch.setattr(magnitude_sketch, "MIN_NUMEL", 1)  # every tensor sketched, as a large one is
    family = TinyFamily(tmp_path / "base", tuple(tmp_path / f"source{i}" for i in range(3)))
    shutil.copytree(llama_family.base, family.base)
    base_tensors = load_file(str(family.base / "model.safetensors"))
    floating = [n for n, t in base_tensors.items() if t.is_floating_point()]
    signed = floating[1]
    base_tensors[signed] = base_tensors[signed].clone()
    base_tensors[signed].view(-1)[0] = 0.0
    save_file(base_tensors, str(family.base / "model.safetensors"), metadata={"format": "pt"})
    same = set()
    for i, (src, dst) in enumerate(zip(llama_family.sources, family.sources, strict=True)):
        shutil.copytree(src, dst)
        tensors = load_file(str(dst / "model.safetensors"))
        if i == 0:  # every other tensor left as the base
            tensors.update({n: base_tensors[n].clone() for n in floating[::2]})
        if i == 1:  # the base's tensor but a -0.0 where the base holds +0.0
            tensors[signed] = base_tensors[signed].clone()
            tensors[signed].view(-1)[0] = -0.0
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
        same |= {(n, i) for n in floating if torch.equal(tensors[n].view(torch.int32), base_tensors[n].view(torch.int32))}
    assert {(n, 0) for n in floating[::2]} <= same and (signed, 1) not in same
    resident = MergeEngine(*open_family(family), device="cpu", plan="resident", threads=2)
    for plan in ("lean", "stream"):
        engine = MergeEngine(*open_family(family), device="cpu", plan=plan, threads=2)
        assert engine._same == same, plan
        if plan == "lean":  # such a tensor is held once: the source's entry is the base's tensor
            assert all((engine._held[n][i + 1] is engine._held[n][0]) == ((n, i) in same)
                       for n in floating for i in range(3))
        else:  # and stream does not read it: the chunk's base tensor stands for it
            reads: list[tuple[str, int]] = []
            read_held = engine._read_held

            def counted(checkpoint: object, name: str, out: torch.Tensor | None = None, _read: object = read_held,
                        _models: list = engine._models, _reads: list = reads) -> torch.Tensor:
                _reads.append((name, _models.index(checkpoint) - 1))
                return _read(checkpoint, name, out)  # type: ignore[operator]

            monkeypatch.setattr(engine, "_read_held", counted)
        for method in sorted(RECIPES):
            r = recipe(family, method, *RECIPES[method])
            assert_same(resident.materialize(r), engine.materialize(r), (plan, method))
        if plan == "stream":
            assert reads and not set(reads) & same  # every other source tensor is read
            assert {(n, i) for n in floating for i in range(3) if (n, i) not in same} <= set(reads)
        assert engine._zeros is not None and not engine._zeros.any()  # never written
    # float8 checkpoints are held as stored, one byte per entry: compared bit for bit too
    f8 = torch.tensor([0.5, -0.0, 0.0, 2.0]).to(torch.float8_e4m3fn)
    zero_bucket = np.array([f8.numel()], dtype=np.int32)
    engine._note_same("f8", 0, zero_bucket, f8.clone(), f8)
    negated = f8.clone()
    negated[2] = -0.0
    engine._note_same("f8", 1, zero_bucket, negated, f8)
    assert ("f8", 0) in engine._same and ("f8", 1) not in engine._same
