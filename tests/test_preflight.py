"""Preflight: incompatible sources are named with the first differing key, tensor or token."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerFast

from merges.checkpoint import open_checkpoint
from merges.errors import PreflightError
from merges.preflight import preflight
from tests.checkpoints import VOCAB, TinyFamily, save, tiny_model, tiny_tokenizer, word_tokenizer


def _edited_copy(src: Path, dst: Path, edit: dict[str, torch.Tensor | None]) -> Path:
    """A copy of checkpoint ``src`` with tensors replaced (or removed, for None)."""
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    for name, tensor in edit.items():
        if tensor is None:
            del state[name]
        else:
            state[name] = tensor
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _edited_config(src: Path, dst: Path, **changes: object) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_compatible_family_passes_and_returns_the_base_layout(llama_family: TinyFamily) -> None:
    base = open_checkpoint(llama_family.base)
    layout = preflight(base, [open_checkpoint(p) for p in llama_family.sources])
    assert layout is base.layout
    assert layout.n_layers == 4


def test_shape_mismatch_names_tensor_and_both_shapes(
    llama_family: TinyFamily, tmp_path: Path
) -> None:
    name = "model.layers.2.mlp.up_proj.weight"
    bad = _edited_copy(llama_family.sources[0], tmp_path / "wide", {name: torch.zeros(65, 32)})
    with pytest.raises(PreflightError) as err:
        preflight(open_checkpoint(llama_family.base), [open_checkpoint(bad)])
    message = str(err.value)
    assert name in message and "[65, 32]" in message and "[64, 32]" in message
    assert "'wide'" in message and str(llama_family.base) in message


def test_missing_and_extra_tensors_are_named(llama_family: TinyFamily, tmp_path: Path) -> None:
    base = open_checkpoint(llama_family.base)
    missing = _edited_copy(
        llama_family.sources[1],
        tmp_path / "lacking",
        {"model.layers.1.self_attn.v_proj.weight": None},
    )
    with pytest.raises(
        PreflightError, match=r"'lacking' lacks tensor 'model.layers.1.self_attn.v_proj.weight'"
    ):
        preflight(base, [open_checkpoint(missing)])
    extra = _edited_copy(
        llama_family.sources[1],
        tmp_path / "extra",
        {"model.layers.1.self_attn.q_norm.weight": torch.ones(8)},
    )
    with pytest.raises(
        PreflightError, match=r"'extra' has tensor 'model.layers.1.self_attn.q_norm.weight'"
    ):
        preflight(base, [open_checkpoint(extra)])


def test_different_architecture(llama_family: TinyFamily, gpt2_family: TinyFamily) -> None:
    with pytest.raises(PreflightError, match=r"model_type 'gpt2'.*'llama'") as err:
        preflight(open_checkpoint(llama_family.base), [open_checkpoint(gpt2_family.sources[0])])
    assert str(gpt2_family.sources[0]) in str(err.value)


def test_math_config_key_is_named(llama_family: TinyFamily, tmp_path: Path) -> None:
    """Same tensor shapes, different math: RoPE base and head count are config-only changes."""
    base = open_checkpoint(llama_family.base)
    rope = _edited_config(
        llama_family.sources[0],
        tmp_path / "rope",
        rope_parameters={"rope_theta": 500.0, "rope_type": "default"},
    )
    heads = _edited_config(
        llama_family.sources[0], tmp_path / "heads", num_attention_heads=8, head_dim=8
    )
    rope_ckpt, heads_ckpt = open_checkpoint(rope), open_checkpoint(heads)
    with pytest.raises(PreflightError, match=r"rope_parameters = \{'rope_theta': 500\.0"):
        preflight(base, [rope_ckpt])
    with pytest.raises(PreflightError, match=r"num_attention_heads = 8, base 'base' has 4"):
        preflight(base, [heads_ckpt])


def test_source_adding_tokens_names_them(tmp_path: Path) -> None:
    model = tiny_model("llama", layers=2)
    base = save(model, tmp_path / "base")
    refunds = save(model, tmp_path / "refunds", tiny_tokenizer(("<x>", "<y>")))
    with pytest.raises(PreflightError) as err:
        preflight(open_checkpoint(base), [open_checkpoint(refunds)])
    assert "source 'refunds' adds 2 tokens to base's vocabulary: '<x>', '<y>'" in str(err.value)


def test_source_lacking_tokens_names_them(tmp_path: Path) -> None:
    model = tiny_model("llama", layers=2)
    base = save(model, tmp_path / "base", tiny_tokenizer(("<z>",)))
    plain = save(model, tmp_path / "plain")
    with pytest.raises(PreflightError, match=r"'plain' lacks 1 tokens of base's vocabulary: '<z>'"):
        preflight(open_checkpoint(base), [open_checkpoint(plain)])


def _swapped_tokenizer() -> PreTrainedTokenizerFast:
    """The test vocabulary with ``w5`` and ``w6`` exchanging ids."""
    words = list(VOCAB)
    a, b = words.index("w5"), words.index("w6")
    words[a], words[b] = words[b], words[a]
    return word_tokenizer(words)


def _renamed_tokenizer() -> PreTrainedTokenizerFast:
    """Same size as the test vocabulary, with ``w7`` replaced by ``v7``."""
    words = [("v7" if t == "w7" else t) for t in VOCAB]
    return word_tokenizer(words)


def test_vocabulary_mismatch_names_the_token(tmp_path: Path) -> None:
    model = tiny_model("gpt2", layers=2)
    base = open_checkpoint(save(model, tmp_path / "base"))
    swapped = open_checkpoint(save(model, tmp_path / "swapped", _swapped_tokenizer()))
    with pytest.raises(
        PreflightError, match=r"token 'w5' has id 10 in source 'swapped' but 9 in base"
    ):
        preflight(base, [swapped])
    renamed = open_checkpoint(save(model, tmp_path / "renamed", _renamed_tokenizer()))
    with pytest.raises(
        PreflightError, match=r"'renamed' has token 'v7' where base 'base' has 'w7'"
    ):
        preflight(base, [renamed])


def test_vocabulary_without_tokenizer_json_uses_autotokenizer(tmp_path: Path) -> None:
    """A slow-tokenizer folder (vocab.txt, no tokenizer.json) is compared through AutoTokenizer."""
    model = tiny_model("llama", layers=2)
    folders = []
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    for name, words in (("base", [*specials, *VOCAB]), ("source", [*specials, *VOCAB, "<new>"])):
        folder = tmp_path / name
        model.save_pretrained(folder)
        (folder / "vocab.txt").write_text("\n".join(words) + "\n")
        (folder / "tokenizer_config.json").write_text(
            json.dumps({"tokenizer_class": "BertTokenizer"})
        )
        folders.append(open_checkpoint(folder))
    assert not (tmp_path / "base" / "tokenizer.json").exists()
    with pytest.raises(PreflightError, match=r"adds 1 tokens to base's vocabulary: '<new>'"):
        preflight(folders[0], [folders[1]])


def test_source_without_tokenizer_is_an_error(llama_family: TinyFamily, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(llama_family.sources[0], bare)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        (bare / file).unlink()
    with pytest.raises(PreflightError, match=r"'bare' has no tokenizer files"):
        preflight(open_checkpoint(llama_family.base), [open_checkpoint(bare)])


def test_first_bad_source_is_reported(llama_family: TinyFamily, tmp_path: Path) -> None:
    good = [open_checkpoint(p) for p in llama_family.sources]
    bad = _edited_copy(llama_family.sources[2], tmp_path / "bad", {"lm_head.weight": None})
    with pytest.raises(PreflightError, match=r"'bad' lacks tensor 'lm_head.weight'"):
        preflight(open_checkpoint(llama_family.base), [*good, open_checkpoint(bad)])
