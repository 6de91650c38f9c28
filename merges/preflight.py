"""Compatibility of sources with the base, checked once before any merge.

Every source must have the base's architecture, the config values that change the math,
the same tensor names and shapes, and the same tokenizer vocabulary (or, seen through a
tokenizer policy, ``merges.tokenizer_union.vocabulary_views``, the output vocabulary: the
policy covers vocabularies and vocabulary sizes, everything else is still compared). The first difference
is reported as a ``PreflightError`` naming both folders and the key, tensor or token.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merges.checkpoint import Checkpoint, open_checkpoint
from merges.errors import PreflightError
from merges.layout import Layout

if TYPE_CHECKING:
    from merges.recipe import Recipe
    from merges.tokenizer_union import TokenizerPolicy

# config.json keys whose values change tensor shapes or the forward computation.
MATH_CONFIG_KEYS: tuple[str, ...] = (
    "hidden_size",
    "n_embd",
    "num_hidden_layers",
    "n_layer",
    "num_attention_heads",
    "n_head",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "n_inner",
    "vocab_size",
    "hidden_act",
    "activation_function",
    "rotary_pct",
    "rope_theta",
    "rope_parameters",
    "rope_scaling",
    "rms_norm_eps",
    "layer_norm_eps",
    "layer_norm_epsilon",
    "tie_word_embeddings",
)

_SHOWN_TOKENS = 10  # tokens listed in a message before "..."


def preflight(base: Checkpoint, sources: Sequence[Checkpoint]) -> Layout:
    """Raise ``PreflightError`` at the first incompatibility; return the base's layout."""
    base_vocab = _vocabulary(base)
    for source in sources:
        _check_architecture(base, source)
        # Vocabulary before config and shapes: added tokens explain a changed vocab_size.
        _check_vocabulary(base, base_vocab, source, _vocabulary(source))
        _check_config(base, source)
        _check_tensors(base, source)
    return base.layout


def open_and_preflight(base: str | Path, sources: Sequence[str | Path], *, allow_pickle: bool = False,
                       tokenizer: TokenizerPolicy | None = None,
                       trust_remote_code: bool = False) -> tuple[Checkpoint, list[Checkpoint], Layout]:
    """Open the base and the sources (as views of ``tokenizer``'s output vocabulary when a study
    sets one) and preflight them: the one way every caller does it."""
    from merges.tokenizer_union import with_policy

    opened_base = open_checkpoint(base, allow_pickle=allow_pickle)
    opened_sources = [open_checkpoint(path, allow_pickle=allow_pickle) for path in sources]
    opened_base, opened_sources = with_policy(opened_base, opened_sources, tokenizer,
                                              trust_remote_code=trust_remote_code)
    return opened_base, opened_sources, preflight(opened_base, opened_sources)


def refuse_group_bases(recipe: Recipe) -> None:
    """A study merges every trial against its one base (the genome has no per-slice base), so a
    recipe whose slices merge against other bases (``Recipe.group_bases``) is refused, naming them;
    ``search merge`` and ``search export`` take it."""
    if recipe.group_bases:
        others = sorted({b for b in recipe.group_bases if b != recipe.base})
        raise PreflightError(
            f"its slices merge against per-slice base models {others} besides {recipe.base}; a study "
            "merges every layer against its one base (run it with `search merge`)"
        )


def _where(base: Checkpoint, source: Checkpoint) -> str:
    return f"(source {source.path}, base {base.path})"


def _check_architecture(base: Checkpoint, source: Checkpoint) -> None:
    for key in ("model_type", "architectures"):
        if base.config.get(key) != source.config.get(key):
            raise PreflightError(
                f"source {source.label!r} has config {key} {source.config.get(key)!r}, "
                f"base {base.label!r} has {base.config.get(key)!r} {_where(base, source)}"
            )


def _check_config(base: Checkpoint, source: Checkpoint) -> None:
    for key in MATH_CONFIG_KEYS:
        if key in base.config or key in source.config:
            mine, theirs = source.config.get(key), base.config.get(key)
            if mine != theirs:
                raise PreflightError(
                    f"source {source.label!r} has config {key} = {mine!r}, base {base.label!r} "
                    f"has {theirs!r} {_where(base, source)}"
                )


def _check_tensors(base: Checkpoint, source: Checkpoint) -> None:
    missing = next((n for n in base.shapes if n not in source.shapes), None)
    if missing is not None:
        raise PreflightError(
            f"source {source.label!r} lacks tensor {missing!r} of base {base.label!r} "
            f"{_where(base, source)}"
        )
    extra = next((n for n in source.shapes if n not in base.shapes), None)
    if extra is not None:
        raise PreflightError(
            f"source {source.label!r} has tensor {extra!r} that base {base.label!r} lacks "
            f"{_where(base, source)}"
        )
    for name, shape in base.shapes.items():
        if source.shapes[name] != shape:
            raise PreflightError(
                f"tensor {name!r} has shape {list(source.shapes[name])} in source "
                f"{source.label!r} but {list(shape)} in base {base.label!r} {_where(base, source)}"
            )


# -- vocabulary -------------------------------------------------------------------


def _check_vocabulary(
    base: Checkpoint,
    base_vocab: dict[str, int] | None,
    source: Checkpoint,
    vocab: dict[str, int] | None,
) -> None:
    if base_vocab is None and vocab is None:
        return  # neither folder has a tokenizer: nothing to compare
    if base_vocab is None or vocab is None:
        lacking = base if base_vocab is None else source
        raise PreflightError(
            f"{lacking.label!r} has no tokenizer files, so its vocabulary cannot be checked "
            f"against {(source if lacking is base else base).label!r} {_where(base, source)}"
        )
    if vocab == base_vocab:
        return
    added = [t for t in vocab if t not in base_vocab]
    removed = [t for t in base_vocab if t not in vocab]
    moved = next((t for t in base_vocab if t in vocab and vocab[t] != base_vocab[t]), None)
    if moved is not None:
        raise PreflightError(
            f"token {moved!r} has id {vocab[moved]} in source {source.label!r} but "
            f"{base_vocab[moved]} in base {base.label!r} {_where(base, source)}"
        )
    if added and not removed:
        raise PreflightError(
            f"source {source.label!r} adds {len(added)} tokens to base's vocabulary: "
            f"{_token_list(added)} {_where(base, source)}"
        )
    if removed and not added:
        raise PreflightError(
            f"source {source.label!r} lacks {len(removed)} tokens of base's vocabulary: "
            f"{_token_list(removed)} {_where(base, source)}"
        )
    raise PreflightError(
        f"source {source.label!r} has token {added[0]!r} where base {base.label!r} has "
        f"{removed[0]!r} {_where(base, source)}"
    )


def _token_list(tokens: list[str]) -> str:
    shown = ", ".join(repr(t) for t in tokens[:_SHOWN_TOKENS])
    return shown + (", ..." if len(tokens) > _SHOWN_TOKENS else "")


def _vocabulary(checkpoint: Checkpoint) -> dict[str, int] | None:
    """token -> id, from tokenizer.json when present, else through AutoTokenizer; None if none.

    A view on an output vocabulary (``merges.tokenizer_union``: the policy covers how the
    sources' vocabularies differ) has that vocabulary.
    """
    from merges.tokenizer_union import VocabularyView

    if isinstance(checkpoint, VocabularyView):
        return checkpoint.vocabulary()
    tokenizer_json = checkpoint.folder / "tokenizer.json"
    if tokenizer_json.is_file():
        return _vocabulary_from_json(tokenizer_json)
    if not checkpoint.tokenizer_files():
        return None
    from transformers import AutoTokenizer  # slow import, only for folders without tokenizer.json

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint.folder), trust_remote_code=False)
    except Exception as exc:  # transformers raises OSError / ValueError / ImportError variants
        raise PreflightError(f"{checkpoint.path}: cannot load its tokenizer ({exc})") from exc
    return dict(tokenizer.get_vocab())


def _vocabulary_from_json(path: Path) -> dict[str, int]:
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
        model = data["model"]
        raw = model["vocab"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PreflightError(f"{path}: cannot read the vocabulary ({exc!r})") from exc
    if isinstance(raw, dict):  # BPE, WordPiece, WordLevel
        vocab = {str(token): int(index) for token, index in raw.items()}
    elif isinstance(raw, list):  # Unigram: [[token, score], ...], id = position
        vocab = {str(entry[0]): index for index, entry in enumerate(raw)}
    else:
        raise PreflightError(f"{path}: model.vocab is neither a mapping nor a list")
    for added in data.get("added_tokens") or []:
        vocab[str(added["content"])] = int(added["id"])
    return vocab
