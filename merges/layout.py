"""Layer index and role of every tensor, from tensor names alone.

The naming knowledge lives in ``_FAMILIES``: per architecture family, one regex for the
layer prefix (``model.layers.N.``) and ordered tables of regexes for the rest of an
in-layer name and for names outside the layers. The first matching rule wins. The family
that recognises the most names of a checkpoint is the one used; adding an architecture
means adding a row, not a branch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from merges.errors import CheckpointError
from merges.recipe import ROLES


@dataclass(frozen=True)
class TensorInfo:
    name: str
    layer: int | None  # transformer layer index, None outside the layers
    role: str  # one of merges.recipe.ROLES


@dataclass(frozen=True)
class Layout:
    """The layer map of one checkpoint: every tensor's layer and role, in checkpoint order."""

    n_layers: int
    tensors: tuple[TensorInfo, ...]
    tied_embeddings: bool
    layer_prefix: str  # e.g. "model.layers." / "transformer.h." / "gpt_neox.layers."
    head_pattern: str = ""  # regex of the output projection's weight name in this family
    _by_name: dict[str, TensorInfo] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {info.name: info for info in self.tensors})

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(info.name for info in self.tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._by_name[name]
        except KeyError:
            raise CheckpointError(f"tensor {name!r} is not in this layout") from None

    def is_tied_head(self, name: str) -> bool:
        """True for the output projection when it is tied to the embedding (never saved)."""
        return (
            self.tied_embeddings
            and bool(self.head_pattern)
            and re.fullmatch(self.head_pattern, name) is not None
        )

    def layer_tensors(self, layer: int) -> tuple[TensorInfo, ...]:
        """The tensors of one transformer layer, in checkpoint order."""
        return tuple(info for info in self.tensors if info.layer == layer)

    def rename_layer(self, name: str, new_layer: int) -> str:
        """``name`` moved to layer ``new_layer`` (for passthrough frankenmerges)."""
        info = self.info(name)
        if info.layer is None:
            raise CheckpointError(
                f"tensor {name!r} is outside the transformer layers; it has no layer to rename"
            )
        if new_layer < 0:
            raise CheckpointError(f"cannot move tensor {name!r} to negative layer {new_layer}")
        old = f"{self.layer_prefix}{info.layer}."
        return f"{self.layer_prefix}{new_layer}.{name[len(old) :]}"


# -- naming tables ----------------------------------------------------------------

Rule = tuple[str, str]  # (regex, role)


@dataclass(frozen=True)
class _Family:
    name: str
    layer: str  # regex matching "<prefix><N>." at the start; groups "prefix" and "layer"
    in_layer: tuple[Rule, ...]  # matched against the rest of the name after "<prefix><N>."
    outside: tuple[Rule, ...]  # matched against the full name
    head_weight: str  # regex of the output projection (absent when tied)
    tied_default: bool  # tie_word_embeddings when config.json does not say


_FAMILIES: tuple[_Family, ...] = (
    _Family(
        name="llama",  # also Mistral, Qwen2, Gemma, Phi-3 style names
        layer=r"(?P<prefix>(?:model\.)?layers\.)(?P<layer>\d+)\.",
        in_layer=(
            (r"self_attn\.", "attention"),
            (r"(?:mlp|block_sparse_moe)\.", "mlp"),
            (r"(?:input|post_attention|pre_feedforward|post_feedforward)_layernorm\.", "norm"),
            (r"rotary_emb\.", "attention"),
        ),
        outside=(
            (r"(?:model\.)?embed_tokens\.", "embed"),
            (r"(?:model\.)?rotary_emb\.", "embed"),
            (r"(?:model\.)?norm\.", "head"),
            (r"lm_head\.", "head"),
        ),
        head_weight=r"lm_head\.weight",
        tied_default=False,
    ),
    _Family(
        name="gpt2",
        layer=r"(?P<prefix>(?:transformer\.)?h\.)(?P<layer>\d+)\.",
        in_layer=(
            (r"(?:attn|crossattention)\.", "attention"),  # incl. attn.bias / masked_bias masks
            (r"mlp\.", "mlp"),
            (r"ln_(?:1|2|cross_attn)\.", "norm"),
        ),
        outside=(
            (r"(?:transformer\.)?w[tp]e\.", "embed"),
            (r"(?:transformer\.)?ln_f\.", "head"),
            (r"lm_head\.", "head"),
        ),
        head_weight=r"lm_head\.weight",
        tied_default=True,
    ),
    _Family(
        name="gpt_neox",
        layer=r"(?P<prefix>gpt_neox\.layers\.)(?P<layer>\d+)\.",
        in_layer=(
            (r"attention\.", "attention"),  # incl. rotary_emb.inv_freq and bias masks
            (r"mlp\.", "mlp"),
            (r"(?:input|post_attention)_layernorm\.", "norm"),
        ),
        outside=(
            (r"gpt_neox\.embed_in\.", "embed"),
            (r"gpt_neox\.rotary_emb\.", "embed"),
            (r"gpt_neox\.final_layer_norm\.", "head"),
            (r"(?:embed_out|lm_head)\.", "head"),
        ),
        head_weight=r"(?:embed_out|lm_head)\.weight",
        tied_default=False,
    ),
    _Family(
        name="bert",
        layer=r"(?P<prefix>(?:bert\.)?encoder\.layer\.)(?P<layer>\d+)\.",
        in_layer=(
            (r"attention\.output\.LayerNorm\.", "norm"),
            (r"attention\.", "attention"),
            (r"intermediate\.", "mlp"),
            (r"output\.LayerNorm\.", "norm"),
            (r"output\.dense\.", "mlp"),
        ),
        outside=(
            (r"(?:bert\.)?embeddings\.", "embed"),  # its LayerNorm too
            (r"(?:bert\.)?pooler\.", "head"),
            (r"cls\.", "head"),
        ),
        head_weight=r"cls\.predictions\.decoder\.weight",
        tied_default=True,
    ),
)

_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass(frozen=True)
class _Match:
    layer: int | None
    role: str | None  # None: in a layer but no rule matched
    prefix: str | None


def _match(family: _Family, name: str) -> _Match | None:
    """What ``family``'s tables say about ``name``; None when they do not recognise it at all."""
    layer_match = re.match(family.layer, name)
    if layer_match:
        rest = name[layer_match.end() :]
        role = next((r for pattern, r in family.in_layer if re.match(pattern, rest)), None)
        return _Match(int(layer_match["layer"]), role, layer_match["prefix"])
    role = next((r for pattern, r in family.outside if re.match(pattern, name)), None)
    return _Match(None, role, None) if role else None


# A vision-language checkpoint (LLaVA-style): its language model under one of these prefixes.
_LANGUAGE_MODEL_PREFIXES = ("language_model.", "model.language_model.")


def _refuse_vision_language(names: Sequence[str]) -> None:
    """mergekit 0.1.5 has no architecture definition for LLaVA-style checkpoints: it infers
    one module per layer stack (vision tower, language model) plus the loose tensors, refuses
    ``slices:`` without ``modules:`` and, with transformers 5's in-memory names, its ``models:``
    form writes the vision tower and projector renamed and drops the language model (or fails
    on the projector's names). No mergekit result to reproduce: refused."""
    inner = next((n for n in names if n.startswith(_LANGUAGE_MODEL_PREFIXES)), None)
    if inner is None:
        return
    others = sorted({n.split(".")[0] if not n.startswith("model.") else ".".join(n.split(".")[:2])
                     for n in names if not n.startswith(_LANGUAGE_MODEL_PREFIXES)})
    raise CheckpointError(
        f"a vision-language checkpoint (language model under {inner[:inner.index('language_model.')]}"
        f"language_model., beside {others}): mergekit 0.1.5 cannot merge it (no architecture "
        "definition: it infers several modules, refuses slices: without modules:, and its models: "
        "form drops the language model), so the engine does not either"
    )


def _pick_family(names: Sequence[str]) -> _Family:
    _refuse_vision_language(names)

    def recognised(family: _Family) -> int:
        return sum(1 for n in names if (m := _match(family, n)) is not None and m.role is not None)

    best = max(_FAMILIES, key=recognised)  # max keeps the first on ties: table order decides
    if recognised(best) == 0:
        shown = ", ".join(repr(n) for n in list(names)[:3])
        raise CheckpointError(
            f"no known architecture recognises these tensor names (first: {shown})"
        )
    return best


def layout_of(
    tensor_names: Sequence[str],
    config: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> Layout:
    """The layer map of a checkpoint with these tensor names and this parsed config.json.

    ``shapes`` (optional) lets an unknown 1-D tensor inside a layer count as a norm;
    without shapes, or for any other unknown tensor, a ``CheckpointError`` names it.
    """
    if not tensor_names:
        raise CheckpointError("checkpoint has no tensors")
    family = _pick_family(tensor_names)
    infos: list[TensorInfo] = []
    prefixes: set[str] = set()
    layers: set[int] = set()
    for name in tensor_names:
        m = _match(family, name)
        if m is None:
            raise CheckpointError(
                f"tensor {name!r} is not recognised by the {family.name} naming tables "
                "(outside the transformer layers); cannot tell its role"
            )
        role = m.role
        if role is None:  # in a layer, unknown suffix: only a 1-D tensor is safely a norm
            shape = shapes.get(name) if shapes is not None else None
            if shape is None or len(shape) != 1:
                raise CheckpointError(
                    f"tensor {name!r} (layer {m.layer}, shape {shape}) is not recognised by the "
                    f"{family.name} naming tables; cannot tell its role"
                )
            role = "norm"
        assert role in ROLES, role
        if m.layer is not None and m.prefix is not None:
            layers.add(m.layer)
            prefixes.add(m.prefix)
        infos.append(TensorInfo(name, m.layer, role))

    if not layers:
        raise CheckpointError(f"no transformer layers found in tensor names ({family.name} naming)")
    if len(prefixes) > 1:
        raise CheckpointError(f"tensor names use several layer prefixes: {sorted(prefixes)}")
    n_layers = max(layers) + 1
    missing = sorted(set(range(n_layers)) - layers)
    if missing:
        raise CheckpointError(f"layers {missing} have no tensors, yet layer {n_layers - 1} exists")
    for key in _LAYER_COUNT_KEYS:
        if key in config and isinstance(config[key], int):
            if config[key] != n_layers:
                raise CheckpointError(
                    f"config.json {key} = {config[key]} but the tensor names hold {n_layers} layers"
                )
            break

    has_head = any(re.fullmatch(family.head_weight, n) for n in tensor_names)
    tie_flag = config.get("tie_word_embeddings")
    tied = bool(family.tied_default if tie_flag is None else tie_flag) or not has_head
    return Layout(n_layers, tuple(infos), tied, prefixes.pop(), family.head_weight)
