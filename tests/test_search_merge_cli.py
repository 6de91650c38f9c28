"""``search merge CONFIG OUT_DIR``: output, errors, seeds, frankenmerges (agreement with
mergekit itself is in ``test_mergekit_golden.py``)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from merges.checkpoint import open_checkpoint
from merges.engine import MergeEngine
from merges.errors import NonFiniteMergeError
from merges.mergekit_yaml import recipe_to_mergekit
from merges.output import MARKER
from merges.recipe import LayerSlice, Recipe
from merges.save import save_checkpoint
from search.cli import main
from tests.checkpoints import TinyFamily


def _write(tmp_path: Path, recipe: Recipe, family: TinyFamily) -> Path:
    config = tmp_path / "recipe.yaml"
    config.write_text(recipe_to_mergekit(recipe, open_checkpoint(family.base).layout))
    return config


def _ties(family: TinyFamily, **kwargs: object) -> Recipe:
    return Recipe.uniform("ties", str(family.base), [str(s) for s in family.sources], 4,
                          tensor_params={"weight": [0.5, 0.3, 0.2], "density": [0.5, 0.7, 0.9]}, **kwargs)


def _only_entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_help_describes_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["merge", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for words in ("mergekit-yaml", "OUT_DIR", "--device", "--seed", "--allow-pickle", "refused", "--overwrite"):
        assert words in text


def test_merge_writes_a_loadable_checkpoint_equal_to_the_engine(
    llama_family: TinyFamily, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = _ties(llama_family)
    out = tmp_path / "merged"
    assert main(["merge", str(_write(tmp_path, recipe, llama_family)), str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    written = load_file(out / "model.safetensors")
    base = open_checkpoint(llama_family.base)
    expected = MergeEngine(base, [open_checkpoint(p) for p in llama_family.sources]).materialize(recipe)
    assert sorted(written) == sorted(expected)
    assert all(torch.equal(written[name], expected[name]) for name in expected)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.state_dict()["model.norm.weight"], expected["model.norm.weight"])
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(llama_family.base).get_vocab()
    assert _only_entries(tmp_path) == ["merged", "recipe.yaml"]  # no temporary folder left
    assert (out / MARKER).is_file()  # what lets a later --overwrite recognise it


def test_unsupported_config_is_refused_with_its_reason_and_writes_nothing(
    llama_family: TinyFamily, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "union.yaml"
    config.write_text(
        f"merge_method: linear\ndtype: float32\ntokenizer: {{source: union, merge_vocab: yes}}\nmodels:\n"
        f"  - model: {llama_family.sources[0]}\n    parameters: {{weight: 1.0}}\n"
    )
    assert main(["merge", str(config), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "merge_vocab" in err and err.count("\n") == 1
    assert _only_entries(tmp_path) == ["union.yaml"]


def test_missing_checkpoint_is_an_error_and_writes_nothing(
    llama_family: TinyFamily, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = Recipe.uniform("linear", None, [str(llama_family.sources[0]), str(tmp_path / "gone")], 4,
                            tensor_params={"weight": [0.5, 0.5]})
    config = _write(tmp_path, recipe, llama_family)
    assert main(["merge", str(config), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "gone" in err
    assert _only_entries(tmp_path) == ["recipe.yaml"]


def test_missing_config_file_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["merge", str(tmp_path / "nope.yaml"), str(tmp_path / "out")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_seed_flag_overrides_the_recorded_seed(llama_family: TinyFamily, tmp_path: Path) -> None:
    recipe = Recipe.uniform("dare_ties", str(llama_family.base), [str(s) for s in llama_family.sources], 4,
                            tensor_params={"weight": [0.5, 0.3, 0.2], "density": [0.5, 0.5, 0.5]}, seed=7)
    config = _write(tmp_path, recipe, llama_family)

    def merged(*flags: str, name: str) -> dict[str, torch.Tensor]:
        assert main(["merge", str(config), str(tmp_path / name), *flags]) == 0
        return load_file(tmp_path / name / "model.safetensors")

    recorded, seven, other = merged(name="a"), merged("--seed", "7", name="b"), merged("--seed", "8", name="c")
    assert all(torch.equal(recorded[n], seven[n]) for n in recorded)
    assert any(not torch.equal(recorded[n], other[n]) for n in recorded)


def test_frankenmerge_sets_the_layer_count(llama_family: TinyFamily, tmp_path: Path) -> None:
    base, s0 = str(llama_family.base), str(llama_family.sources[0])
    recipe = Recipe("passthrough", base, (s0, base), ((0, 3), (3, 5)),
                    layer_slices=(LayerSlice(s0, 0, 3), LayerSlice(base, 2, 4)))
    out = tmp_path / "franken"
    assert main(["merge", str(_write(tmp_path, recipe, llama_family)), str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 5
    model = AutoModelForCausalLM.from_pretrained(out)
    base_tensors = open_checkpoint(llama_family.base)
    # Output layer 4 is the base's layer 3 (the second slice starts at base layer 2).
    assert torch.equal(model.state_dict()["model.layers.4.mlp.up_proj.weight"],
                       base_tensors.read("model.layers.3.mlp.up_proj.weight"))


def test_cuda_device_needs_cuda(llama_family: TinyFamily, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    config = _write(tmp_path, _ties(llama_family), llama_family)
    code = main(["merge", str(config), str(tmp_path / "out"), "--device", "cuda"])
    if torch.cuda.is_available():
        assert code == 0 and (tmp_path / "out" / "model.safetensors").exists()
    else:
        assert code == 2 and "no CUDA device" in capsys.readouterr().err
        assert not (tmp_path / "out").exists()


def _linear(family: TinyFamily, **kwargs: object) -> Recipe:
    return Recipe.uniform("linear", str(family.base), [str(s) for s in family.sources], 4,
                          tensor_params={"weight": [0.5, 0.3, 0.2]}, **kwargs)


def test_output_specs_are_what_materialize_returns(llama_family: TinyFamily, gpt2_family: TinyFamily) -> None:
    """The streamed save writes its headers from ``output_specs``: names (a tied head too),
    shapes, dtypes (``out_dtype``, a float32 result from half inputs) and order must be the tensors'."""
    recipes = [
        (llama_family, _ties(llama_family)),
        (gpt2_family, _linear(gpt2_family, dtype="bfloat16", out_dtype="float16")),
        (llama_family, Recipe.uniform("ramplus_tl", str(llama_family.base), [str(llama_family.sources[0])], 4,
                                      dtype="bfloat16")),
    ]
    for family, recipe in recipes:
        engine = MergeEngine(open_checkpoint(family.base), [open_checkpoint(s) for s in recipe.sources],
                             dtype=getattr(torch, recipe.dtype), plan="stream")
        tensors = engine.materialize(recipe)
        assert engine.output_specs(recipe) == [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
        # Each yielded tensor is valid only until the iterator advances: compare it there.
        names = [n for n, t in engine.iter_materialize(recipe) if torch.equal(t, tensors[n])]
        assert names == list(tensors)
    assert {t.dtype for t in tensors.values()} == {torch.float32}  # ramplus_tl: float32 from bf16


def test_merge_writes_the_files_of_a_dict_save(gpt2_family: TinyFamily, tmp_path: Path) -> None:
    """Streamed tensor by tensor (tied head, an out_dtype cast), the weights and config are those
    ``save_checkpoint`` writes from the whole merged dict."""
    recipe = _linear(gpt2_family, out_dtype="bfloat16")
    out = tmp_path / "merged"
    assert main(["merge", str(_write(tmp_path, recipe, gpt2_family)), str(out)]) == 0
    base = open_checkpoint(gpt2_family.base)
    engine = MergeEngine(base, [open_checkpoint(p) for p in gpt2_family.sources], plan="lean")
    whole = save_checkpoint(engine.materialize(recipe), tmp_path / "dict", like=base, dtype=torch.bfloat16,
                            config_dtype=torch.bfloat16)
    assert _only_entries(out) == _only_entries(whole)
    for name in ("model.safetensors", "config.json"):  # the tokenizer goes through mergekit's path
        assert (out / name).read_bytes() == (whole / name).read_bytes(), name


def test_a_merge_failing_mid_stream_writes_nothing(
    llama_family: TinyFamily, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _write(tmp_path, _ties(llama_family), llama_family)
    out = tmp_path / "out"
    assert main(["merge", str(config), str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    shutil.rmtree(out)
    real = MergeEngine.iter_materialize

    def failing(self: MergeEngine, recipe: Recipe, **kwargs: object) -> Iterator[tuple[str, torch.Tensor]]:
        for index, item in enumerate(real(self, recipe, **kwargs)):  # type: ignore[arg-type]
            if index == 5:
                raise NonFiniteMergeError(f"tensor {item[0]!r} holds NaN or inf")
            yield item

    monkeypatch.setattr(MergeEngine, "iter_materialize", failing)
    assert main(["merge", str(config), str(out)]) == 2
    assert "holds NaN or inf" in capsys.readouterr().err
    assert _only_entries(tmp_path) == ["recipe.yaml"]
    monkeypatch.undo()
    assert main(["merge", str(config), str(out)]) == 0
    previous = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    assert {n: b for n, (b, _) in previous.items() if n != MARKER} == {n: b for n, b in before.items() if n != MARKER}
    monkeypatch.setattr(MergeEngine, "iter_materialize", failing)
    assert main(["merge", str(config), str(out), "--overwrite", "--seed", "3"]) == 2
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == previous
    assert _only_entries(tmp_path) == ["out", "recipe.yaml"]
