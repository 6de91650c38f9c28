"""Small random Hugging Face checkpoints for tests: a base and fine-tune-like sources.

Nothing is downloaded: models come from ``transformers`` configs with random weights,
sources are the base plus small seeded perturbations (some tensors left unchanged, as a
real fine-tune often leaves them), saved with ``save_pretrained`` as safetensors.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from tokenizers.normalizers import Normalizer
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

VOCAB = ["<pad>", "<bos>", "<eos>", "<unk>"] + [f"w{i}" for i in range(60)]


@dataclass(frozen=True)
class TinyFamily:
    base: Path
    sources: tuple[Path, ...]


def tiny_model(arch: str, *, seed: int = 0, layers: int = 4, tie: bool = False) -> PreTrainedModel:
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=len(VOCAB), max_position_embeddings=64,
            tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )
        return LlamaForCausalLM(cfg)
    if arch == "gpt2":
        cfg = GPT2Config(
            n_embd=32, n_layer=layers, n_head=4, vocab_size=len(VOCAB), n_positions=64,
            bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )
        return GPT2LMHeadModel(cfg)
    raise ValueError(arch)


def word_tokenizer(words: Sequence[str], normalizer: Normalizer | None = None) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer, ``words[i]`` with id ``i``, and the test special tokens."""
    tok = Tokenizer(models.WordLevel(vocab={word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_tokenizer(extra_tokens: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    return word_tokenizer([*VOCAB, *extra_tokens])


def perturbed(model: PreTrainedModel, *, seed: int, scale: float = 0.02, keep_every: int = 5) -> PreTrainedModel:
    """A fine-tune-like copy: seeded noise on most tensors, every ``keep_every``-th left as the base."""
    gen = torch.Generator().manual_seed(seed)
    copy = type(model)(model.config)
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        for index, (_, param) in enumerate(copy.named_parameters()):
            if keep_every and index % keep_every == keep_every - 1:
                continue
            noise = torch.randn(param.shape, generator=gen) * scale * (1.0 + param.std().nan_to_num())
            param.add_(noise)
    return copy


def save(model: PreTrainedModel, path: Path, tokenizer: PreTrainedTokenizerFast | None = None) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    (tokenizer or tiny_tokenizer()).save_pretrained(path)
    return path


def make_family(root: Path, arch: str = "llama", *, n_sources: int = 3, seed: int = 0, layers: int = 4,
                tie: bool = False) -> TinyFamily:
    """Write ``root/base`` and ``root/source{i}`` checkpoints; returns their paths."""
    base = tiny_model(arch, seed=seed, layers=layers, tie=tie)
    base_dir = save(base, root / "base")
    sources = tuple(
        save(perturbed(base, seed=seed * 1000 + i + 1), root / f"source{i}") for i in range(n_sources)
    )
    return TinyFamily(base_dir, sources)


def bf16_copy(family: TinyFamily, root: Path) -> TinyFamily:
    """The family copied under ``root`` (config, tokenizer) with its weights stored in bf16."""
    import shutil

    from safetensors.torch import load_file, save_file

    folders = []
    for folder in (family.base, *family.sources):
        copy = root / Path(folder).name
        shutil.copytree(folder, copy)
        tensors = load_file(str(copy / "model.safetensors"))
        save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(copy / "model.safetensors"),
                  metadata={"format": "pt"})
        folders.append(copy)
    return TinyFamily(folders[0], tuple(folders[1:]))


def quantised_family(root: Path, *, seed: int, source_seed: int, dtype: torch.dtype = torch.float32) -> None:
    """``root/base`` and two sources ``root/source{0,1}`` whose deltas are multiples of 0.01 in
    [-0.02, 0.02] (before the sources are stored in ``dtype``, as the base): many equal |delta|, so
    TIES / breadcrumbs cuts fall inside ties."""
    base_model = tiny_model("llama", seed=seed, layers=2).to(dtype)
    save(base_model, root / "base")
    for i in range(2):
        gen = torch.Generator().manual_seed(source_seed + i)
        source = type(base_model)(base_model.config).to(dtype)
        source.load_state_dict(base_model.state_dict())
        with torch.no_grad():
            for param in source.parameters():
                param.add_((torch.randint(-2, 3, param.shape, generator=gen).float() * 0.01).to(dtype))
        save(source, root / f"source{i}")


def lora_adapter(model: PreTrainedModel, path: Path, *, seed: int, targets: tuple[str, ...],
                 **config: object) -> Path:
    """A PEFT LoRA adapter for ``model`` with random A and B (a trained-looking, nonzero update), saved to ``path``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    copy = type(model)(model.config).to(model.dtype)
    copy.load_state_dict(model.state_dict())
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False, **config)
    get_peft_model(copy, lora).save_pretrained(path)
    return path


def with_added_tokens(model: PreTrainedModel, path: Path, *, seed: int, tokens: tuple[str, ...],
                      special: tuple[str, ...] = ()) -> Path:
    """A fine-tune whose tokenizer adds ``tokens`` (and ``special`` tokens), with new embedding rows."""
    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens(list(tokens))
    if special:
        tokenizer.add_special_tokens({"additional_special_tokens": list(special)})
    tuned = perturbed(copy.deepcopy(model), seed=seed)  # its own config: resizing changes vocab_size
    torch.manual_seed(seed)
    tuned.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():  # the new rows: learned-looking values, not resize's initialisation
        for embedding in {id(e): e for e in (tuned.get_input_embeddings(), tuned.get_output_embeddings())}.values():
            embedding.weight[len(VOCAB):] = torch.randn(embedding.weight[len(VOCAB):].shape) * 0.05
    return save(tuned, path, tokenizer)
