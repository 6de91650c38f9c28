"""Layer map from tensor names: real transformers models of each family, unknown names, renames."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import (
    BertConfig,
    BertForPreTraining,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from merges.errors import CheckpointError
from merges.layout import Layout, layout_of
from merges.recipe import ROLES

TINY = {"vocab_size": 40, "num_attention_heads": 2}


def _layout(model: PreTrainedModel, drop: tuple[str, ...] = ()) -> tuple[Layout, dict[str, str]]:
    state = {k: v for k, v in model.state_dict().items() if k not in drop}
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    layout = layout_of(list(state), model.config.to_dict(), shapes)
    return layout, {info.name: info.role for info in layout.tensors}


def _llama_like(
    config_cls: type[PretrainedConfig], model_cls: type[PreTrainedModel]
) -> PreTrainedModel:
    torch.manual_seed(0)
    return model_cls(
        config_cls(
            hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_key_value_heads=2, **TINY
        )
    )


@pytest.mark.parametrize(
    ("config_cls", "model_cls"),
    [
        (LlamaConfig, LlamaForCausalLM),
        (MistralConfig, MistralForCausalLM),
        (Qwen2Config, Qwen2ForCausalLM),
    ],
)
def test_llama_family_roles(
    config_cls: type[PretrainedConfig], model_cls: type[PreTrainedModel]
) -> None:
    layout, roles = _layout(_llama_like(config_cls, model_cls))
    assert layout.n_layers == 3
    assert layout.layer_prefix == "model.layers."
    assert not layout.tied_embeddings
    assert roles["model.embed_tokens.weight"] == "embed"
    assert roles["model.norm.weight"] == "head"
    assert roles["lm_head.weight"] == "head"
    assert roles["model.layers.2.self_attn.q_proj.weight"] == "attention"
    assert roles["model.layers.1.mlp.down_proj.weight"] == "mlp"
    assert roles["model.layers.0.input_layernorm.weight"] == "norm"
    assert roles["model.layers.0.post_attention_layernorm.weight"] == "norm"
    info = layout.info("model.layers.2.mlp.up_proj.weight")
    assert (info.layer, info.role) == (2, "mlp")
    assert layout.info("model.norm.weight").layer is None
    # Every layer holds the same roles, and names keep their given order.
    per_layer = [Counter(i.role for i in layout.layer_tensors(n)) for n in range(3)]
    assert per_layer[0] == per_layer[1] == per_layer[2]
    assert per_layer[0]["norm"] == 2 and per_layer[0]["mlp"] == 3
    assert [i.name for i in layout.tensors] == list(_llama_like(config_cls, model_cls).state_dict())


def test_llama_with_tied_embeddings_has_no_head_tensor_to_save() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        **TINY,
    )
    layout, _ = _layout(LlamaForCausalLM(config))
    assert layout.tied_embeddings and layout.is_tied_head("lm_head.weight")
    untied, _ = _layout(_llama_like(LlamaConfig, LlamaForCausalLM))
    assert not untied.is_tied_head("lm_head.weight")


def test_qwen2_attention_biases_are_attention() -> None:
    _, roles = _layout(_llama_like(Qwen2Config, Qwen2ForCausalLM))
    assert roles["model.layers.1.self_attn.k_proj.bias"] == "attention"


def test_gpt2_roles_and_tied_head() -> None:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=40, n_positions=32)
    )
    layout, roles = _layout(model)
    assert (layout.n_layers, layout.layer_prefix, layout.tied_embeddings) == (
        2,
        "transformer.h.",
        True,
    )
    assert roles["transformer.wte.weight"] == roles["transformer.wpe.weight"] == "embed"
    assert roles["transformer.ln_f.weight"] == roles["transformer.ln_f.bias"] == "head"
    assert roles["transformer.h.1.attn.c_attn.weight"] == "attention"
    assert roles["transformer.h.1.mlp.c_fc.bias"] == "mlp"
    assert roles["transformer.h.0.ln_1.weight"] == roles["transformer.h.0.ln_2.bias"] == "norm"
    assert layout.is_tied_head("lm_head.weight")
    assert not layout.is_tied_head("transformer.wte.weight")
    # Without lm_head (as save_pretrained writes a tied GPT-2) the layout is still tied.
    no_head, _ = _layout(model, drop=("lm_head.weight",))
    assert no_head.tied_embeddings


def test_gpt2_legacy_names_and_mask_buffers() -> None:
    """Old GPT-2 checkpoints: no ``transformer.`` prefix and ``attn.bias`` causal masks."""
    names = [
        "wte.weight",
        "wpe.weight",
        "h.0.attn.bias",
        "h.0.attn.masked_bias",
        "h.0.attn.c_attn.weight",
        "h.0.ln_1.weight",
        "h.0.mlp.c_fc.weight",
        "ln_f.weight",
    ]
    layout = layout_of(names, {"model_type": "gpt2", "n_layer": 1})
    assert layout.layer_prefix == "h."
    assert layout.info("h.0.attn.bias").role == "attention"
    assert layout.info("h.0.attn.masked_bias").layer == 0
    assert layout.tied_embeddings  # GPT-2 default when config.json does not say


def test_gpt_neox_roles() -> None:
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(
        GPTNeoXConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, **TINY)
    )
    layout, roles = _layout(model)
    assert (layout.n_layers, layout.layer_prefix, layout.tied_embeddings) == (
        2,
        "gpt_neox.layers.",
        False,
    )
    assert roles["gpt_neox.embed_in.weight"] == "embed"
    assert roles["gpt_neox.final_layer_norm.weight"] == "head"
    assert roles["gpt_neox.layers.1.attention.query_key_value.weight"] == "attention"
    assert roles["gpt_neox.layers.1.mlp.dense_4h_to_h.bias"] == "mlp"
    assert roles["gpt_neox.layers.0.post_attention_layernorm.weight"] == "norm"
    head_name = next(n for n in roles if n.startswith(("embed_out", "lm_head")))
    assert roles[head_name] == "head"
    # Older NeoX checkpoints name the head embed_out and keep rotary buffers per layer.
    legacy = layout_of(
        [
            "gpt_neox.embed_in.weight",
            "gpt_neox.layers.0.attention.rotary_emb.inv_freq",
            "gpt_neox.layers.0.attention.dense.weight",
            "gpt_neox.final_layer_norm.weight",
            "embed_out.weight",
        ],
        {"num_hidden_layers": 1, "tie_word_embeddings": False},
    )
    assert legacy.info("gpt_neox.layers.0.attention.rotary_emb.inv_freq").role == "attention"
    assert legacy.info("embed_out.weight").role == "head"
    assert not legacy.tied_embeddings


def test_bert_roles() -> None:
    torch.manual_seed(0)
    model = BertForPreTraining(
        BertConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, **TINY)
    )
    layout, roles = _layout(model)
    assert (layout.n_layers, layout.layer_prefix) == (2, "bert.encoder.layer.")
    assert layout.tied_embeddings
    assert roles["bert.embeddings.word_embeddings.weight"] == "embed"
    assert roles["bert.embeddings.LayerNorm.weight"] == "embed"
    assert roles["bert.encoder.layer.1.attention.self.query.weight"] == "attention"
    assert roles["bert.encoder.layer.1.attention.output.dense.weight"] == "attention"
    assert roles["bert.encoder.layer.1.attention.output.LayerNorm.weight"] == "norm"
    assert roles["bert.encoder.layer.0.intermediate.dense.weight"] == "mlp"
    assert roles["bert.encoder.layer.0.output.dense.weight"] == "mlp"
    assert roles["bert.encoder.layer.0.output.LayerNorm.bias"] == "norm"
    assert roles["bert.pooler.dense.weight"] == "head"
    assert roles["cls.predictions.transform.dense.weight"] == "head"
    assert roles["cls.seq_relationship.weight"] == "head"


def test_every_role_is_a_recipe_role() -> None:
    _, roles = _layout(_llama_like(LlamaConfig, LlamaForCausalLM))
    assert set(roles.values()) == set(ROLES)


LLAMA_NAMES = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.1.self_attn.q_proj.weight",
    "model.layers.1.input_layernorm.weight",
    "model.norm.weight",
    "lm_head.weight",
]


def test_unknown_1d_tensor_in_a_layer_is_a_norm() -> None:
    name = "model.layers.1.q_norm_extra.weight"
    layout = layout_of([*LLAMA_NAMES, name], {"num_hidden_layers": 2}, {name: (16,)})
    assert (layout.info(name).layer, layout.info(name).role) == (1, "norm")


def test_unknown_2d_tensor_in_a_layer_is_an_error() -> None:
    name = "model.layers.1.mystery.weight"
    with pytest.raises(CheckpointError, match="model.layers.1.mystery.weight"):
        layout_of([*LLAMA_NAMES, name], {"num_hidden_layers": 2}, {name: (16, 16)})
    with pytest.raises(CheckpointError, match="model.layers.1.mystery.weight"):
        layout_of([*LLAMA_NAMES, name], {"num_hidden_layers": 2})  # no shape: never guess


def test_unknown_tensor_outside_layers_is_an_error() -> None:
    with pytest.raises(CheckpointError, match="vision_tower.proj.weight"):
        layout_of(
            [*LLAMA_NAMES, "vision_tower.proj.weight"], {}, {"vision_tower.proj.weight": (4,)}
        )


def test_layer_count_disagreeing_with_config_names_both_numbers() -> None:
    with pytest.raises(CheckpointError, match=r"num_hidden_layers = 3.*2 layers"):
        layout_of(LLAMA_NAMES, {"num_hidden_layers": 3})
    with pytest.raises(CheckpointError, match=r"n_layer = 5"):
        layout_of(["transformer.wte.weight", "transformer.h.0.ln_1.weight"], {"n_layer": 5})


def test_gap_in_layers_is_an_error() -> None:
    names = [n.replace("layers.1.", "layers.2.") for n in LLAMA_NAMES]
    with pytest.raises(CheckpointError, match=r"layers \[1\]"):
        layout_of(names, {})


def test_unrecognised_architecture_is_an_error() -> None:
    with pytest.raises(CheckpointError, match="encoder.block.0"):
        layout_of(["encoder.block.0.layer.0.SelfAttention.q.weight"], {})


def test_info_of_unknown_name_is_an_error() -> None:
    layout = layout_of(LLAMA_NAMES, {})
    with pytest.raises(CheckpointError, match="nope"):
        layout.info("nope")


def test_rename_layer_moves_only_the_layer_index() -> None:
    layout = layout_of(LLAMA_NAMES, {"num_hidden_layers": 2})
    assert (
        layout.rename_layer("model.layers.1.self_attn.q_proj.weight", 13)
        == "model.layers.13.self_attn.q_proj.weight"
    )
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        layout.rename_layer("model.norm.weight", 0)


SUFFIXES = {
    "self_attn.o_proj.weight": "attention",
    "mlp.gate_proj.weight": "mlp",
    "post_attention_layernorm.weight": "norm",
}


@settings(max_examples=40, deadline=None)
@given(n_layers=st.integers(1, 40), target=st.integers(0, 200), data=st.data())
def test_layer_indices_and_renames_for_any_depth(
    n_layers: int, target: int, data: st.DataObject
) -> None:
    names = ["model.embed_tokens.weight"]
    names += [f"model.layers.{i}.{s}" for i in range(n_layers) for s in SUFFIXES]
    names += ["model.norm.weight", "lm_head.weight"]
    layout = layout_of(names, {"num_hidden_layers": n_layers, "tie_word_embeddings": False})
    assert layout.n_layers == n_layers
    layer = data.draw(st.integers(0, n_layers - 1))
    suffix = data.draw(st.sampled_from(sorted(SUFFIXES)))
    name = f"model.layers.{layer}.{suffix}"
    assert layout.info(name) == layout.info(name).__class__(name, layer, SUFFIXES[suffix])
    renamed = layout.rename_layer(name, target)
    assert renamed == f"model.layers.{target}.{suffix}"
    # Renaming back recovers the name (layer 10 vs 1 prefixes must not be confused).
    if target < n_layers:
        assert layout.rename_layer(renamed, layer) == name


@pytest.mark.parametrize("prefix", ["language_model.", "model.language_model."])
def test_vision_language_checkpoint_is_refused_with_the_reason(prefix: str) -> None:
    """LLaVA-style names (old and transformers 5 layouts): mergekit 0.1.5 cannot merge them
    (tests/test_mergekit_golden.py runs it), so the layout refuses them, naming what is there."""
    inner = "model.layers.0.self_attn.q_proj.weight" if prefix == "language_model." else "layers.0.self_attn.q_proj.weight"
    outer = "" if prefix == "language_model." else "model."
    names = [f"{prefix}{inner}", f"{outer}vision_tower.encoder.layers.0.mlp.fc1.weight",
             f"{outer}multi_modal_projector.linear_1.weight"]
    with pytest.raises(CheckpointError, match=r"vision-language checkpoint .*multi_modal_projector.*mergekit 0\.1\.5 cannot merge it"):
        layout_of(names, {})
