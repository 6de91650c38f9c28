"""Sources whose vocabularies differ: one output vocabulary, and every model's embedding rows on it.

mergekit 0.1.5 (``tokenizer: {source: union | base | MODEL, tokens: ..., pad_to_multiple_of:
...}`` or the legacy ``tokenizer_source``) builds an output tokenizer (``tokenizer/build.py``),
then, before a merge method sees the token embedding and the output head
(``tokenizer/embed.py`` ``PermutedVocabulary``), re-indexes each model's rows to the output
vocabulary. The merge method gets equal shapes and no masks. This module does the same, so
the engine merges :class:`VocabularyView` checkpoints unchanged:

* output vocabulary: ``base`` is the base tokenizer; ``MODEL`` that model's; ``union`` is the
  base tokenizer (saved and reloaded) plus, in order, every token another model has that the
  base lacks (plain vocabulary tokens first, then added tokens with their own settings);
  then every token named under ``tokens`` that is still missing;
* a model's row for a token it has is its own row; for a token it lacks (or a ``force``d
  one) the row is: the ``tokens`` entry's source (a model's row for the token or for another
  token, or zeros); else the base's row if the base has it; else the one model's row that has
  it; else the mean of the rows of the models that have it; zeros when none has it;
* rows added by ``pad_to_multiple_of`` are the mean of the real rows;
* the output config's ``vocab_size`` is the output vocabulary's (padded) size, and the output
  tokenizer is written by transformers' ``save_pretrained``, as mergekit writes it.

Where mergekit's result depends on Python's set and hash order (the order in which two sources'
new tokens are appended; ``referenced_models()`` is a set) this module takes the recipe's
order: base, then the sources as listed. A token added with different settings by two models
(mergekit warns and keeps the first) is refused, naming the token and both models.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merges.checkpoint import Checkpoint
from merges.errors import PreflightError

if TYPE_CHECKING:
    import torch

UNION, BASE = "union", "base"
# Tensors indexed by token (mergekit's ``vocabulary_axis``, always the first dimension here).
VOCABULARY_TENSORS: tuple[str, ...] = (
    "embed_tokens.weight", "lm_head.weight", "wte.weight", "embed_in.weight", "embed_out.weight",
    "word_embeddings.weight",
)


@dataclass(frozen=True)
class TokenEmbedding:
    """mergekit's per-token ``TokenEmbeddingConfig``: where a token's row comes from."""

    model: str | None = None  # a model's row (for this token, or for ``token`` / ``token_id``)
    zero: bool = False  # ``{kind: zero}``
    token: str | None = None  # ``{kind: model_token, model, token}``
    token_id: int | None = None  # ``{kind: model_token, model, token_id}``
    force: bool = False  # use it even for models that have the token


@dataclass(frozen=True)
class TokenizerPolicy:
    """What the output vocabulary is: ``source`` is ``union``, ``base`` or a model's path."""

    source: str = UNION
    tokens: tuple[tuple[str, TokenEmbedding], ...] = ()
    pad_to_multiple_of: int | None = None


@dataclass(frozen=True, eq=False)
class OutputVocabulary:
    """The output tokenizer, its vocabulary, and each model's output id -> own id (-1: lacks it)."""

    tokenizer: Any  # a transformers tokenizer
    vocab: dict[str, int]
    size: int  # rows of the output embedding (with pad_to_multiple_of)
    keys: tuple[str, ...]  # the models, by checkpoint path, in recipe order (base first)
    permutations: dict[str, dict[int, int]]
    original_vocabs: dict[str, dict[str, int]]
    policy: TokenizerPolicy


def is_vocabulary_tensor(name: str) -> bool:
    return name.endswith(VOCABULARY_TENSORS)


def with_policy(
    base: Checkpoint, sources: Sequence[Checkpoint], policy: TokenizerPolicy | None, *,
    trust_remote_code: bool = False,
) -> tuple[Checkpoint, list[Checkpoint]]:
    """``base`` and ``sources`` as they are without a policy, else their views (a study's ``models.tokenizer``)."""
    if policy is None:
        return base, list(sources)
    views = vocabulary_views(base, sources, policy, trust_remote_code=trust_remote_code)
    assert views[0] is not None
    return views[0], list(views[1])


def vocabulary_views(
    base: Checkpoint | None, sources: Sequence[Checkpoint], policy: TokenizerPolicy, *,
    trust_remote_code: bool = False,
) -> tuple[VocabularyView | None, list[VocabularyView]]:
    """``base`` and ``sources`` as views on the output vocabulary of ``policy`` (what the engine merges)."""
    models: list[Checkpoint] = []
    for checkpoint in ([base] if base is not None else []) + list(sources):
        if all(str(checkpoint.path) != str(m.path) for m in models):
            models.append(checkpoint)
    output = build_output_vocabulary(models, policy, has_base=base is not None,
                                     trust_remote_code=trust_remote_code)
    permuter = _Permuter(tuple(models), output, has_base=base is not None)
    views = {str(m.path): _view(m, output, permuter) for m in models}
    return (views[str(base.path)] if base is not None else None), [views[str(s.path)] for s in sources]


# -- the output vocabulary (mergekit tokenizer/build.py) ------------------------------------------


def build_output_vocabulary(models: Sequence[Checkpoint], policy: TokenizerPolicy, *, has_base: bool,
                            trust_remote_code: bool = False) -> OutputVocabulary:
    """``models[0]`` is the base (mergekit: the first model when there is none)."""
    from transformers import AutoTokenizer

    base = models[0]
    keys = tuple(str(m.path) for m in models)
    tokenizers = {str(m.path): _tokenizer(m, trust_remote_code) for m in models}
    base_tok = tokenizers[keys[0]]
    _check_within_vocab_size(base, base_tok)
    if policy.source == BASE:
        if not has_base:
            raise PreflightError("tokenizer source 'base' needs a base model")
        out = base_tok
    elif policy.source == UNION:
        out = _union(models, tokenizers, trust_remote_code)
    else:
        donor = _model_named(policy.source, models, "tokenizer source")
        out = AutoTokenizer.from_pretrained(str(donor.folder), trust_remote_code=trust_remote_code)
    if policy.tokens and policy.source == BASE:
        # mergekit 0.1.5 adds them to the base tokenizer it also maps the base with, then fails (KeyError).
        raise PreflightError("tokenizer: tokens with source 'base' fail in mergekit 0.1.5; use source 'union'")
    existing = set(out.get_vocab())
    for token, _ in policy.tokens:
        if token not in existing:
            out.add_tokens(token)
            existing.add(token)
    vocab = dict(out.get_vocab())
    size = len(vocab)
    if sorted(vocab.values()) != list(range(size)):
        raise PreflightError(f"the output tokenizer's ids are not 0..{size - 1} (mergekit 0.1.5 needs them so)")
    if policy.pad_to_multiple_of and size % policy.pad_to_multiple_of:
        size = (size // policy.pad_to_multiple_of + 1) * policy.pad_to_multiple_of

    permutations: dict[str, dict[int, int]] = {}
    for model in models:
        key = str(model.path)
        own = tokenizers[key].get_vocab()
        limit = _vocab_size(model) or len(own)
        mapping: dict[int, int] = {}
        for token, new_id in vocab.items():
            old_id = own.get(token, -1)
            if old_id >= limit:
                raise PreflightError(
                    f"{model.label!r}: token {token!r} has id {old_id}, beyond its vocab_size {limit} "
                    "(mergekit 0.1.5 cannot map it)"
                )
            mapping[new_id] = old_id
        permutations[key] = mapping
    for token, spec in policy.tokens:
        _check_token_spec(token, spec, models, tokenizers)
    return OutputVocabulary(out, vocab, size, keys, permutations,
                            {k: dict(t.get_vocab()) for k, t in tokenizers.items()}, policy)


def _tokenizer(model: Checkpoint, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model.folder), use_fast=True, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises OSError / ValueError / ImportError variants
        raise PreflightError(f"{model.folder}: cannot load its tokenizer ({exc})") from exc


def _vocab_size(model: Checkpoint) -> int | None:
    value = model.config.get("vocab_size")
    return value if isinstance(value, int) else None


def _check_within_vocab_size(base: Checkpoint, tokenizer: Any) -> None:
    limit = _vocab_size(base)
    beyond = sorted((i, t) for t, i in tokenizer.get_vocab().items() if limit is not None and i >= limit)
    if beyond:
        raise PreflightError(
            f"base {base.label!r}: its tokenizer has {len(beyond)} token(s) beyond vocab_size {limit} "
            f"(first {beyond[0][1]!r}, id {beyond[0][0]}); stripping them is not supported"
        )


def _union(models: Sequence[Checkpoint], tokenizers: Mapping[str, Any], trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    out_vocab: dict[str, None] = {}
    added: dict[str, tuple[Any, str]] = {}  # content -> (AddedToken, model label)
    for model in models:
        tokenizer = tokenizers[str(model.path)]
        limit = _vocab_size(model) or tokenizer.vocab_size
        for token, index in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
            if index < limit:
                out_vocab.setdefault(token)
        for index, info in sorted(tokenizer.added_tokens_decoder.items()):
            if index >= limit:
                continue
            seen = added.get(info.content)
            if seen is None:
                added[info.content] = (info, model.label)
            elif seen[0] != info:
                raise PreflightError(
                    f"token {info.content!r} is added as {_added(seen[0])} by {seen[1]!r} but as "
                    f"{_added(info)} by {model.label!r}: a union cannot hold both definitions"
                )
    base_tok = tokenizers[str(models[0].path)]
    with tempfile.TemporaryDirectory() as folder:  # a copy: the base tokenizer itself stays as it is
        base_tok.save_pretrained(folder, legacy_format=False, safe_serialization=True)
        result = AutoTokenizer.from_pretrained(folder, use_fast=True, trust_remote_code=trust_remote_code)
    base_vocab = base_tok.get_vocab()
    for token in out_vocab:
        if token not in added and token not in base_vocab:
            result.add_tokens(token)
    for info, _ in added.values():
        result.add_tokens(info)
    return result


def _added(info: Any) -> str:
    return (f"(special={info.special}, single_word={info.single_word}, lstrip={info.lstrip}, "
            f"rstrip={info.rstrip}, normalized={info.normalized})")


def _model_named(reference: str, models: Sequence[Checkpoint], what: str) -> Checkpoint:
    for model in models:
        if str(model.path) == reference or Path(str(model.path)).resolve() == Path(reference).resolve():
            return model
    raise PreflightError(f"{what} {reference!r} is not one of the merged models ({', '.join(m.label for m in models)})")


def _check_token_spec(token: str, spec: TokenEmbedding, models: Sequence[Checkpoint],
                      tokenizers: Mapping[str, Any]) -> None:
    if spec.model is None:
        return
    model = _model_named(spec.model, models, f"tokens.{token}: source")
    own = tokenizers[str(model.path)].get_vocab()
    if spec.token is not None and spec.token not in own:
        raise PreflightError(f"tokens.{token}: token {spec.token!r} is not in model {model.label!r}'s vocabulary")
    limit = _vocab_size(model) or len(own)
    if spec.token_id is not None and not 0 <= spec.token_id < limit:
        raise PreflightError(f"tokens.{token}: token_id {spec.token_id} is out of range for model {model.label!r}")
    if spec.token is None and spec.token_id is None and token not in own:
        raise PreflightError(f"tokens.{token}: model {model.label!r} does not have the token")


# -- the rows (mergekit tokenizer/embed.py PermutedVocabulary) -------------------------------------


@dataclass(eq=False)
class _Permuter:
    """Computes one vocabulary tensor for every model at once (a row may come from another model)."""

    models: tuple[Checkpoint, ...]
    output: OutputVocabulary
    has_base: bool  # models[0] is the recipe's base (mergekit prefers its rows)
    _ready: dict[tuple[str, str], dict[str, torch.Tensor]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)  # the engine loads from several threads

    def read(self, key: str, name: str, dtype: torch.dtype) -> torch.Tensor:
        slot = (name, str(dtype))
        with self._lock:
            ready = self._ready.get(slot)
            if ready is None or key not in ready:
                ready = self._ready[slot] = self._permute(name, dtype)
            tensor = ready.pop(key)  # each model reads a tensor once: keep no copy
            if not ready:
                del self._ready[slot]
        return tensor

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_ready": {}, "_lock": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def _permute(self, name: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        import torch

        out = self.output
        keys = [str(m.path) for m in self.models]
        tensors = {str(m.path): m.read(name, dtype=dtype) for m in self.models}
        shape = tensors[keys[0]].shape[1:]
        for key, tensor in tensors.items():
            if tensor.shape[1:] != shape:
                raise PreflightError(f"tensor {name!r}: {key} has rows of shape {list(tensor.shape[1:])}, "
                                     f"{keys[0]} of {list(shape)}")
        perms = out.permutations
        configs = dict(out.policy.tokens)
        average: set[str] = set()
        sources: dict[str, TokenEmbedding] = {}
        base_key = keys[0] if self.has_base else None
        for token, token_id in out.vocab.items():
            if token in configs:
                continue
            present = [perms[k][token_id] >= 0 for k in keys]
            if sum(present) == 1:
                sources[token] = TokenEmbedding(model=keys[present.index(True)])
            elif sum(present) == 0:
                sources[token] = TokenEmbedding(zero=True)
            elif base_key is not None and perms[base_key][token_id] >= 0:
                sources[token] = TokenEmbedding(model=base_key)
            else:
                average.add(token)
        defaults: dict[str, torch.Tensor] = {}
        for token, token_id in out.vocab.items():
            spec = configs.get(token) or sources.get(token)
            forced = token in configs and configs[token].force
            if not forced and all(perms[k][token_id] >= 0 for k in keys):
                continue
            if token in average:
                row = torch.zeros(shape, dtype=dtype)
                count = 0
                for k in keys:
                    if perms[k][token_id] >= 0:
                        row = row + tensors[k][perms[k][token_id]]
                        count += 1
                row /= count
            elif spec is not None:
                row = self._row(spec, token, token_id, tensors, shape, dtype)
            else:
                continue
            defaults[token] = row
        result: dict[str, torch.Tensor] = {}
        n = len(out.vocab)
        forced = [token_id for token, token_id in out.vocab.items() if token in configs and configs[token].force]
        for key in keys:
            index = torch.tensor([perms[key][token_id] for token_id in range(n)], dtype=torch.long)
            index[forced] = -1
            rows = torch.zeros((out.size, *shape), dtype=dtype)
            has = index >= 0
            rows[:n][has] = tensors[key][index[has]]  # its own row wherever it has the token
            for token, row in defaults.items():
                token_id = out.vocab[token]
                if not has[token_id]:
                    rows[token_id] = row
            if out.size > n:  # pad_to_multiple_of: the mean of the real rows
                rows[n:] = torch.mean(rows[:n], dim=0)
            result[key] = rows
        return result

    def _row(self, spec: TokenEmbedding, token: str, token_id: int, tensors: Mapping[str, torch.Tensor],
             shape: Any, dtype: torch.dtype) -> torch.Tensor:
        import torch

        if spec.zero:
            return torch.zeros(shape, dtype=dtype)
        assert spec.model is not None
        key = str(_model_named(spec.model, self.models, f"tokens.{token}: source").path)
        if spec.token_id is not None:
            return tensors[key][spec.token_id]
        if spec.token is not None:
            return tensors[key][self.output.original_vocabs[key][spec.token]]
        return tensors[key][self.output.permutations[key][token_id]]


@dataclass(frozen=True, eq=False)
class VocabularyView(Checkpoint):
    """A checkpoint seen on the output vocabulary: same ``path``, vocabulary tensors re-indexed."""

    inner: Checkpoint | None = None
    output: OutputVocabulary | None = None
    permuter: _Permuter | None = None

    @property
    def folder(self) -> Path:
        assert self.inner is not None
        return self.inner.folder

    @property
    def label(self) -> str:
        assert self.inner is not None
        return self.inner.label

    def read(self, name: str, *, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None) -> torch.Tensor:
        assert self.inner is not None and self.permuter is not None
        if not is_vocabulary_tensor(name):
            return self.inner.read(name, device=device, dtype=dtype)
        tensor = self.permuter.read(str(self.path), name, dtype or self.inner.dtypes[name])
        return tensor.to(device=device)

    def offset_source(self, name: str) -> Checkpoint | None:
        """A tensor off the vocabulary is the inner checkpoint's as stored: the stream plan reads
        it by file offsets (no mapped pages); the re-indexed ones are computed here."""
        assert self.inner is not None
        return None if is_vocabulary_tensor(name) else self.inner.offset_source(name)

    def release(self) -> None:
        """The inner checkpoint's shards: the lean engine releases each model once read, and a
        view that kept them open would keep every file's mapped pages in the process."""
        assert self.inner is not None
        self.inner.release()

    def vocabulary(self) -> dict[str, int]:
        assert self.output is not None
        return dict(self.output.vocab)

    def output_tokenizer(self) -> Any:
        """The output tokenizer (transformers); what the merged model is scored with."""
        assert self.output is not None
        return self.output.tokenizer

    def write_tokenizer(self, folder: Path) -> None:
        """The output tokenizer, as mergekit writes it (transformers' ``save_pretrained``)."""
        assert self.output is not None
        self.output.tokenizer.save_pretrained(str(folder), safe_serialization=True)


def _view(model: Checkpoint, output: OutputVocabulary, permuter: _Permuter) -> VocabularyView:
    shapes = {name: ((output.size, *shape[1:]) if is_vocabulary_tensor(name) else shape)
              for name, shape in model.shapes.items()}
    config = {**model.config, "vocab_size": output.size}
    return VocabularyView(model.path, config, shapes, dict(model.dtype_codes), model.layout, {},
                          inner=model, output=output, permuter=permuter)
