"""Recipe ⇄ mergekit YAML, exactly.

Export writes one ``slices:`` entry per recipe layer group. Each source's ``parameters``
hold a scalar when every role of the group has the same value, else a list of
``{filter: <substring>, value: ...}`` entries ending in a catch-all; the filters come
from :func:`role_filters`, which are checked against every tensor of the layout by
simulating mergekit's first-match rule before anything is written.

Import reads the ``models:`` and ``slices:`` forms and resolves every parameter the way
mergekit 0.1.5 does (source > slice > top level; filters by substring, first match;
gradients interpolated per layer with mergekit's own formula; tensors outside the
layers take the first slice's values for the embeddings and the last slice's for the
final norm and head, both at ``t = 0``; a slice's own ``base_model`` is the base of that slice's
tensors, ``Recipe.group_bases``, the embeddings taking the first slice's and the head the last's).
Whatever the engine cannot reproduce exactly
raises :class:`UnsupportedConfigError` with the reason; nothing is approximated. What
mergekit accepts but ignores (a parameter its method does not declare, such as ``weight``
on ``slerp``) is accepted and named in an :class:`IgnoredConfigWarning`.

The few recipe facts that change no tensor and have no mergekit key (the seed of DARE /
DELLA masks, passthrough sources no slice uses, the layer-slice form of a passthrough that
keeps one model's layers in place) are written as one ``# mergesearch: {json}`` comment
line, so that ``recipe_from_mergekit(recipe_to_mergekit(r, layout)) == r`` for every recipe.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from merges.checkpoint import Checkpoint, open_checkpoint
from merges.errors import MergeError, UnsupportedConfigError
from merges.layout import Layout
from merges.lora import LORA_SEPARATOR, lora_reference, split_reference
from merges.methods.registry import METHODS, MethodSpec, validate_recipe
from merges.recipe import ROLES, LayerSlice, Recipe, Scalar
from merges.tokenizer_union import UNION, TokenEmbedding, TokenizerPolicy

CATCH_ALL_ROLE = "norm"
"""The role of tensors no filter matches (in-layer norms)."""

DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16", "float64")

class IgnoredConfigWarning(UserWarning):
    """A mergekit config entry that mergekit 0.1.5 accepts and ignores (so does the import)."""

# Facts of a recipe that change no tensor and that mergekit has no key for (the DARE seed,
# passthrough sources no slice uses, the layer-slice form of an in-place passthrough) ride
# in one JSON comment line, so that import inverts export exactly.
_HINT_PREFIX = "# mergesearch: "
_HINT_LINE = re.compile(r"^# mergesearch: (\{.*\})[ \t]*$", re.MULTILINE)


# -- role filters: architecture knowledge as data ----------------------------------


@dataclass(frozen=True)
class _FilterFamily:
    """Substring filters that pick each role out of one architecture family's tensor names.

    Order matters (mergekit takes the first match); unmatched tensors are in-layer norms.
    Filters are chosen to match mergekit's canonical names and the checkpoint's alike.
    """

    layer_prefixes: tuple[str, ...]
    filters: tuple[tuple[str, str], ...]


_FILTER_FAMILIES: tuple[_FilterFamily, ...] = (
    _FilterFamily(  # Llama, Mistral, Qwen2, Gemma
        ("model.layers.", "layers."),
        (
            ("self_attn", "attention"),
            ("mlp", "mlp"),
            ("block_sparse_moe", "mlp"),
            ("embed_tokens", "embed"),
            ("model.rotary_emb", "embed"),
            ("lm_head", "head"),
            ("model.norm", "head"),
        ),
    ),
    _FilterFamily(  # GPT-2
        ("transformer.h.", "h."),
        (
            ("ln_cross_attn", "norm"),
            ("attn", "attention"),
            ("crossattention", "attention"),
            ("mlp", "mlp"),
            ("wte", "embed"),
            ("wpe", "embed"),
            ("ln_f", "head"),
            ("lm_head", "head"),
        ),
    ),
    _FilterFamily(  # GPT-NeoX
        ("gpt_neox.layers.",),
        (
            ("attention", "attention"),
            ("mlp", "mlp"),
            ("embed_in", "embed"),
            ("gpt_neox.rotary_emb", "embed"),
            ("final_layer_norm", "head"),
            ("embed_out", "head"),
            ("lm_head", "head"),
        ),
    ),
    _FilterFamily(  # BERT
        ("bert.encoder.layer.", "encoder.layer."),
        (
            ("embeddings", "embed"),
            ("attention.output.LayerNorm", "norm"),
            ("attention", "attention"),
            ("intermediate", "mlp"),
            ("output.LayerNorm", "norm"),
            ("output.dense", "mlp"),
            ("pooler", "head"),
            ("cls.", "head"),
        ),
    ),
)


def role_filters(layout: Layout) -> list[tuple[str, str]]:
    """``(substring filter, role)`` pairs that, by mergekit's first-match rule with a
    catch-all for ``norm``, give every tensor of ``layout`` its own role.

    Only filters that match some tensor of the layout are kept. Raises
    ``UnsupportedConfigError`` naming the first tensor they would give the wrong role.
    """
    family = next((f for f in _FILTER_FAMILIES if layout.layer_prefix in f.layer_prefixes), None)
    if family is None:
        raise UnsupportedConfigError(
            f"no mergekit role filters for layer prefix {layout.layer_prefix!r} "
            f"(known: {sorted(p for f in _FILTER_FAMILIES for p in f.layer_prefixes)})"
        )
    names = layout.names
    filters = [(sub, role) for sub, role in family.filters if any(sub in name for name in names)]
    for info in layout.tensors:
        matched = next(((sub, role) for sub, role in filters if sub in info.name), None)
        got = matched[1] if matched else CATCH_ALL_ROLE
        if got != info.role:
            via = f"filter {matched[0]!r}" if matched else "the catch-all"
            raise UnsupportedConfigError(
                f"tensor {info.name!r} has role {info.role!r} but {via} would give it {got!r}; "
                "mergekit filters cannot express this layout's roles"
            )
    return filters


# -- the method table, seen from mergekit ------------------------------------------


def _method(name: str, where: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise UnsupportedConfigError(
            f"{where}: merge_method {name!r} is not one the engine implements (known: {sorted(METHODS)})"
        ) from None


# -- export ------------------------------------------------------------------------


# libyaml's emitter writes the same text 3-10x faster (the driver writes one recipe per trial).
_SafeDumper: type[yaml.SafeDumper] = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class _FlowDumper(_SafeDumper):  # type: ignore[valid-type,misc]
    """Plain YAML; short lists of numbers (layer ranges) in flow style like mergekit writes."""


def _represent_list(dumper: yaml.SafeDumper, data: list[object]) -> yaml.SequenceNode:
    flow = bool(data) and all(isinstance(e, int | float) and not isinstance(e, bool) for e in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


class _FilterEntry(dict[str, object]):
    """One ``{filter: ..., value: ...}`` entry, written on one line."""


def _represent_entry(dumper: yaml.SafeDumper, data: _FilterEntry) -> yaml.MappingNode:
    return dumper.represent_mapping("tag:yaml.org,2002:map", data, flow_style=True)


_FlowDumper.add_representer(list, _represent_list)
_FlowDumper.add_representer(_FilterEntry, _represent_entry)


def _check_path(path: str, what: str) -> None:
    # mergekit parses "a+b" as a LoRA (what a LoRA source is: merges.lora) and "a@rev" as a revision.
    try:
        model, adapter = split_reference(path)
    except MergeError as exc:
        raise UnsupportedConfigError(f"{what} {exc}") from None
    if "@" in path or (adapter is None and LORA_SEPARATOR in model):
        raise UnsupportedConfigError(
            f"{what} path {path!r} contains '+' or '@', which mergekit reads as a LoRA or a revision"
        )


def _scalar_out(value: Scalar) -> float | bool:
    if isinstance(value, bool | int):  # an int: an integer parameter (``_typed``)
        return value
    value = float(value)
    if not math.isfinite(value):
        raise UnsupportedConfigError(f"value {value!r} is not finite; mergekit YAML cannot hold it")
    return value


def _setting(values: Sequence[Scalar], filters: Sequence[tuple[str, str]]) -> float | bool | list[_FilterEntry]:
    """One role-indexed row as a mergekit setting: a scalar, or filters plus a catch-all."""
    by_role = dict(zip(ROLES, (_scalar_out(v) for v in values), strict=True))
    first = by_role[ROLES[0]]
    if all(v == first and type(v) is type(first) for v in by_role.values()):
        return first
    entries = [_FilterEntry(filter=sub, value=by_role[role]) for sub, role in filters]
    entries.append(_FilterEntry(value=by_role[CATCH_ALL_ROLE]))
    return entries


def _verify_setting(setting: float | bool | list[_FilterEntry], values: Sequence[Scalar], layout: Layout,
                    where: str) -> None:
    """Simulate mergekit on every tensor of the layout; the role's value must come out."""
    if not isinstance(setting, list):
        return
    conditions = tuple(_Condition(entry.get("filter"), entry["value"]) for entry in setting)
    for info in layout.tensors:
        want = _scalar_out(values[ROLES.index(info.role)])
        got = _evaluate(conditions, info.name, 0.0, _Validator(type(want), where), where)
        if got != want:
            raise UnsupportedConfigError(
                f"{where}: mergekit would give tensor {info.name!r} ({info.role}) {got!r}, not {want!r}"
            )


def recipe_to_mergekit(recipe: Recipe, layout: Layout, *, header: str = "",
                       tokenizer: TokenizerPolicy | None = None, names: Mapping[str, str] | None = None) -> str:
    """The mergekit 0.1.5 ``slices:`` config that rebuilds ``recipe`` exactly.

    ``layout`` is the base checkpoint's layer map (for the role filters). ``header`` is
    written as ``#`` comment lines at the top. ``tokenizer``: the vocabulary policy
    (``merges.tokenizer_union``; None: the base's tokenizer), its model paths written
    through ``names`` (what ``rename_models`` was given).
    """
    try:
        _validate(recipe)
    except MergeError as exc:
        raise UnsupportedConfigError(f"recipe cannot be exported: {exc}") from exc
    spec = _method(recipe.method, "recipe")
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    if spec.random_exact:
        lines += [
            f"# {recipe.method} samples some quantiles at random; `mergekit-yaml --random-seed "
            f"{recipe.seed}` draws the engine's samples, bit for bit.",
        ]
    elif spec.random:
        lines += [
            f"# {recipe.method} drops entries at random; the engine seeds its masks per tensor.",
            f"# `mergekit-yaml --random-seed {recipe.seed}` reproduces them in distribution,",
            "# not bit for bit.",
        ]
    hints = _hints_of(recipe, layout)
    if hints:
        lines.append(_HINT_PREFIX + json.dumps(hints, sort_keys=True))

    config: dict[str, object] = {"merge_method": recipe.method}
    if recipe.base is not None:
        _check_path(recipe.base, "base_model")
        config["base_model"] = recipe.base
    if recipe.dtype not in DTYPES:
        raise UnsupportedConfigError(f"recipe dtype {recipe.dtype!r} is not one of {DTYPES}")
    config["dtype"] = recipe.dtype
    if recipe.out_dtype is not None:
        if recipe.out_dtype not in DTYPES:
            raise UnsupportedConfigError(f"recipe out_dtype {recipe.out_dtype!r} is not one of {DTYPES}")
        config["out_dtype"] = recipe.out_dtype
    if tokenizer is not None:
        config["tokenizer"] = _tokenizer_yaml(tokenizer, names or {})
    elif recipe.base is not None:
        config["tokenizer_source"] = "base"

    if recipe.layer_slices:
        config["slices"] = _passthrough_slices(recipe)
    else:
        config.update(_layer_group_slices(recipe, spec, layout))
    body = yaml.dump(config, Dumper=_FlowDumper, sort_keys=False, default_flow_style=False, width=100)
    return "\n".join([*lines, body.rstrip(), ""]) if lines else body


def rename_models(recipe: Recipe, names: Mapping[str, str]) -> Recipe:
    """``recipe`` with every model path (base, sources, layer slices) replaced by ``names[path]``.

    What an export writes instead of this machine's folders: a path relative to where
    ``mergekit-yaml`` will run (mergekit 0.1.5 resolves a relative model path against the
    current folder, ``ModelReference.local_path``), an absolute path, or a Hugging Face Hub
    id (any name that is not an existing folder there is downloaded from the Hub).
    """
    models = [*([recipe.base] if recipe.base is not None else []), *recipe.sources,
              *recipe.group_bases, *(piece.model for piece in recipe.layer_slices)]
    missing = [m for m in dict.fromkeys(models) if m not in names]
    if missing:
        raise UnsupportedConfigError(f"recipe model(s) {missing} have no name to export them as")
    taken: dict[str, str] = {}
    for model in dict.fromkeys(models):
        name = names[model]
        if not name.strip():
            raise UnsupportedConfigError(f"model {model!r}: the name to export it as is empty")
        _check_path(name, f"model {model!r} exported as")
        if taken.setdefault(name, model) != model:
            # mergekit would read one model where the recipe has two.
            raise UnsupportedConfigError(f"models {taken[name]!r} and {model!r} would both be exported as {name!r}")
    return dataclasses.replace(
        recipe,
        base=None if recipe.base is None else names[recipe.base],
        sources=tuple(names[s] for s in recipe.sources),
        group_bases=tuple(names[b] for b in recipe.group_bases),
        layer_slices=tuple(dataclasses.replace(p, model=names[p.model]) for p in recipe.layer_slices),
    )


def _hints_of(recipe: Recipe, layout: Layout) -> dict[str, object]:
    hints: dict[str, object] = {}
    if METHODS[recipe.method].random or recipe.seed != 0:
        hints["seed"] = recipe.seed
    if recipe.layer_slices:
        pieces = recipe.layer_slices
        if recipe.sources != tuple(dict.fromkeys(p.model for p in pieces)):
            hints["sources"] = list(recipe.sources)
        in_place = (len({p.model for p in pieces}) == 1 and pieces[0].start == 0
                    and all(a.end == b.start for a, b in zip(pieces, pieces[1:], strict=False))
                    and pieces[-1].end == layout.n_layers)
        if in_place:
            hints["layer_slices"] = True
    return hints


def _read_hints(text: str, where: str) -> dict[str, object]:
    found = _HINT_LINE.findall(text)
    if not found:
        return {}
    try:
        hints = json.loads(found[-1])  # the exporter writes it after any header
    except json.JSONDecodeError as exc:
        raise UnsupportedConfigError(f"{where}: malformed '{_HINT_PREFIX.strip()}' comment: {exc}") from exc
    return hints if isinstance(hints, dict) else {}


def _passthrough_slices(recipe: Recipe) -> list[dict[str, object]]:
    if recipe.tensor_params or recipe.global_params:
        raise UnsupportedConfigError(
            "passthrough recipe: parameters other than each layer slice's scale cannot be exported "
            f"(got {sorted([*recipe.tensor_params, *recipe.global_params])})"
        )
    expected, start = [], 0
    for piece in recipe.layer_slices:
        expected.append((start, start + piece.end - piece.start))
        start += piece.end - piece.start
    if tuple(expected) != recipe.groups:
        raise UnsupportedConfigError(
            f"passthrough recipe: groups {list(recipe.groups)} are not the output layers of its "
            f"layer_slices {expected}"
        )
    slices: list[dict[str, object]] = []
    for piece in recipe.layer_slices:
        _check_path(piece.model, "layer slice model")
        source: dict[str, object] = {"model": piece.model, "layer_range": [piece.start, piece.end]}
        if piece.scale != 1.0:
            source["parameters"] = {"scale": _scalar_out(piece.scale)}
        slices.append({"sources": [source]})
    return slices


def _typed(spec: MethodSpec, name: str, table: tuple[tuple[Scalar, ...], ...]
           ) -> tuple[tuple[Scalar, ...], ...]:
    """An integer parameter's values as ints (mergekit validates ``max_iter: 10.0`` as an error)."""
    if spec.param(name).kind is not int:
        return table
    for row in table:
        for value in row:
            if isinstance(value, bool) or float(value) != int(value):
                raise UnsupportedConfigError(f"{spec.name}: {name} must be an integer, got {value!r}")
    return tuple(tuple(int(v) for v in row) for row in table)


def _layer_group_slices(recipe: Recipe, spec: MethodSpec, layout: Layout) -> dict[str, object]:
    if recipe.n_layers != layout.n_layers:
        raise UnsupportedConfigError(
            f"recipe groups cover {recipe.n_layers} layers but the base has {layout.n_layers}"
        )
    # A base listed among a base method's sources merges as the base (mergekit and the
    # engine ignore its per-source values); it is written once, last, as mergekit adds it.
    # With per-group bases each slice names its own (``base_model``) and lists it so.
    with_base = spec.takes_base and recipe.base is not None
    if spec.needs_base and recipe.base is None:
        raise UnsupportedConfigError(f"{recipe.method} needs a base model")
    if recipe.group_bases and not spec.takes_base:
        raise UnsupportedConfigError(f"{recipe.method} takes no base; per-group bases mean nothing to it")
    for group in range(len(recipe.groups)):
        group_base = recipe.base_of_group(group) if with_base else None
        inputs = [s for s in recipe.sources if s != group_base] + ([group_base] if group_base else [])
        for path in inputs:
            _check_path(path, "source")
        duplicates = sorted({p for p in inputs if inputs.count(p) > 1})
        if duplicates:
            raise UnsupportedConfigError(f"model(s) {duplicates} appear twice among the merge inputs")

    filters = role_filters(layout)
    top_level: dict[str, object] = {}
    per_group_globals: list[str] = []
    global_params = {name: _typed(spec, name, table) for name, table in recipe.global_params.items()}
    for name, table in global_params.items():
        cells = {(type(v), v) for row in table for v in row}
        if len(cells) == 1:
            top_level[name] = _scalar_out(table[0][0])
        else:
            per_group_globals.append(name)

    slices: list[dict[str, object]] = []
    for group, (start, end) in enumerate(recipe.groups):
        group_base = recipe.base_of_group(group) if with_base else None
        sources: list[dict[str, object]] = []
        for model in (s for s in recipe.sources if s != group_base):
            index = recipe.sources.index(model)
            params: dict[str, object] = {}
            for name, table in recipe.tensor_params.items():
                values = [cell[index] for cell in table[group]]
                params[name] = _setting(values, filters)
                _verify_setting(params[name], values, layout, f"slice {group}, {model}, {name}")
            source: dict[str, object] = {"model": model, "layer_range": [start, end]}
            if params:
                source["parameters"] = params
            sources.append(source)
        if group_base is not None:
            sources.append({"model": group_base, "layer_range": [start, end]})
        entry: dict[str, object] = {"base_model": group_base} if recipe.group_bases else {}
        entry["sources"] = sources
        if per_group_globals:
            slice_params: dict[str, object] = {}
            for name in per_group_globals:
                row = global_params[name][group]
                slice_params[name] = _setting(row, filters)
                _verify_setting(slice_params[name], row, layout, f"slice {group}, {name}")
            entry["parameters"] = slice_params
        slices.append(entry)
    out: dict[str, object] = {}
    if top_level:
        out["parameters"] = top_level
    out["slices"] = slices
    return out


# -- import: mergekit's parameter semantics ----------------------------------------


RawScalar = bool | int | float | str  # a YAML scalar, before the parameter's type applies
Gradient = tuple[RawScalar, ...]  # interpolated across the layers of a slice


@dataclass(frozen=True)
class _Condition:
    """``{filter: ..., value: ...}``; no filter (or ``*``) matches every tensor."""

    filter: str | None
    value: RawScalar | Gradient


Setting = RawScalar | Gradient | tuple[_Condition, ...]  # mergekit's ParameterSetting
Parameters = Mapping[str, Setting]


@dataclass(frozen=True)
class _Source:
    model: str
    layer_range: tuple[int, int]
    parameters: Parameters


@dataclass(frozen=True)
class _Slice:
    sources: tuple[_Source, ...]
    parameters: Parameters
    where: str
    base: str | None = None  # the model its tensors merge against (None: the method takes no base)


def _is_scalar(value: object) -> bool:
    return isinstance(value, bool | int | float | str)


def _evaluate(setting: Setting, tensor_name: str, t: float, validate: _Validator, where: str) -> Scalar | None:
    """mergekit.config.evaluate_setting, for one tensor at gradient position ``t``."""
    if isinstance(setting, bool | int | float | str):
        return validate(setting)
    if not setting:
        return None
    conditions = [e for e in setting if isinstance(e, _Condition)]
    if not conditions:
        values = [validate(e) for e in setting if not isinstance(e, _Condition)]
        if not all(isinstance(v, float) for v in values):  # booleans select, numbers interpolate
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return validate((1 - frac) * float(values[i0]) + frac * float(values[i1]))
    for cond in conditions:
        if cond.filter is None or cond.filter == "*" or (tensor_name and cond.filter in tensor_name):
            return _evaluate(cond.value, tensor_name, t, validate, where)
    return None


class _Validator:
    """Coerces a YAML scalar to a parameter's type the way mergekit's pydantic does."""

    def __init__(self, kind: type, where: str) -> None:
        self.kind = kind
        self.where = where

    def __call__(self, value: object) -> Scalar:
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            if isinstance(value, str) and value.lower() in _BOOL_WORDS:
                return _BOOL_WORDS[value.lower()]
            raise UnsupportedConfigError(f"{self.where}: expected true/false, got {value!r}")
        if isinstance(value, bool):
            raise UnsupportedConfigError(f"{self.where}: expected a number, got {value!r}")
        if isinstance(value, int | float):
            if self.kind is int and value != int(value):
                raise UnsupportedConfigError(f"{self.where}: expected an integer, got {value!r}")
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads 1e-3 (no dot) as a string; pydantic parses it
            except ValueError:
                pass
        raise UnsupportedConfigError(f"{self.where}: expected a number, got {value!r}")


_BOOL_WORDS = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False,
               "1": True, "0": False, "t": True, "f": False, "y": True, "n": False}


def _has_gradient(setting: Setting) -> bool:
    if not isinstance(setting, tuple):
        return False
    values = [c.value for c in setting if isinstance(c, _Condition)]
    return any(isinstance(v, tuple) and len(v) > 1 for v in values) or (not values and len(setting) > 1)


def _parse_setting(raw: object, where: str) -> Setting:
    """YAML value -> scalar, gradient tuple, or tuple of _Condition (mergekit's ParameterSetting)."""
    if isinstance(raw, Mapping):
        return (_condition(raw, where),)
    if isinstance(raw, list):
        if all(_is_scalar(e) for e in raw):
            return tuple(raw)
        if all(isinstance(e, Mapping) for e in raw):
            return tuple(_condition(e, where) for e in raw)
        raise UnsupportedConfigError(f"{where}: a list mixes filter entries and plain values")
    if isinstance(raw, bool | int | float | str):
        return raw
    raise UnsupportedConfigError(f"{where}: unexpected parameter value {raw!r}")


def _condition(raw: Mapping[str, object], where: str) -> _Condition:
    extra = set(raw) - {"filter", "value"}
    if extra or "value" not in raw:
        raise UnsupportedConfigError(f"{where}: a filter entry needs 'value' (and optional 'filter'), got {dict(raw)}")
    value = raw["value"]
    if not (_is_scalar(value) or (isinstance(value, list) and all(_is_scalar(e) for e in value))):
        raise UnsupportedConfigError(f"{where}: filter entry value must be a scalar or a gradient list")
    filt = raw.get("filter")
    if filt is not None and not isinstance(filt, str):
        raise UnsupportedConfigError(f"{where}: filter must be a string, got {filt!r}")
    return _Condition(filt, tuple(value) if isinstance(value, list) else value)


# -- import ------------------------------------------------------------------------

_TOP_KEYS = frozenset({
    "merge_method", "base_model", "dtype", "out_dtype", "tokenizer_source", "tokenizer",
    "chat_template", "parameters", "models", "slices", "modules",
})


@dataclass(frozen=True)
class _Parameter:
    """One parameter of a method as mergekit resolves it."""

    name: str
    per_source: bool  # resolved once per input model (weight, density...) vs shared (lambda...)
    kind: type  # float, int or bool
    default: Scalar | None  # None: required


def _parameters_of(spec: MethodSpec) -> dict[str, _Parameter]:
    return {p.name: _Parameter(p.name, p.per_source, p.kind, p.default) for p in spec.params}


def _read_source(source: str | Path) -> tuple[str, str]:
    """(text, name for messages)."""
    is_file = isinstance(source, Path) or (
        "\n" not in source and (source.strip().endswith((".yaml", ".yml")) or Path(source).is_file())
    )
    if not is_file:
        return str(source), "<mergekit yaml>"
    path = Path(source).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UnsupportedConfigError(f"{path}: cannot read mergekit config: {exc.strerror}") from exc
    return text, str(path)


def _read_mapping(source: str | Path) -> tuple[Mapping[str, object], str]:
    """The config's top-level mapping and its name for messages."""
    text, where = _read_source(source)
    return _parse_mapping(text, where), where


def _parse_mapping(text: str, where: str) -> Mapping[str, object]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UnsupportedConfigError(f"{where}: not valid YAML: {exc}") from exc
    if not isinstance(data, Mapping):
        raise UnsupportedConfigError(f"{where}: expected a mapping at the top level")
    return data


def recipe_from_mergekit(
    source: str | Path,
    *,
    base_dir: Path | None = None,
    layout: Layout | None = None,
    allow_pickle: bool = False,
) -> Recipe:
    """The recipe a mergekit 0.1.5 config describes, or ``UnsupportedConfigError`` with the reason.

    ``source`` is a YAML file path or the YAML text. Relative model paths resolve as
    mergekit 0.1.5 resolves them (``ModelReference.local_path``: the path as written, so
    against the folder it runs in, not the YAML's) against ``base_dir``: the folder
    ``mergekit-yaml`` would run in (default: the current folder). ``layout``
    is the base's layer map; by default it is read from the base checkpoint (or the first
    model's), as are the tensor dtypes when the config sets no ``dtype``; ``allow_pickle``
    lets those reads open pickle weights.
    """
    text, where = _read_source(source)
    data = _parse_mapping(text, where)
    root = (base_dir or Path.cwd()).expanduser().absolute()
    unknown = sorted(set(map(str, data)) - _TOP_KEYS)
    if unknown:
        raise UnsupportedConfigError(f"{where}: unknown top-level key(s) {unknown}")
    if data.get("modules") is not None:
        raise UnsupportedConfigError(f"{where}: modules: per-module configs are not supported by the engine")
    # chat_template changes no tensor: mergekit_chat_template resolves it for the saved tokenizer
    _tokenizer_policy(data, where, root)  # refuses a malformed tokenizer section

    method = data.get("merge_method")
    if not isinstance(method, str):
        raise UnsupportedConfigError(f"{where}: merge_method is missing")
    spec = _method(method, where)
    base = _model_path(data["base_model"], f"{where}: base_model", root) if data.get("base_model") else None
    tokenizer = data.get("tokenizer")
    asks_base = tokenizer.get("source", UNION) == "base" if isinstance(tokenizer, Mapping) else False
    if base is None and (data.get("tokenizer_source") == "base" or asks_base):
        raise UnsupportedConfigError(f"{where}: the base tokenizer is asked for but no base_model is set")
    dtype = _dtype(data.get("dtype"), f"{where}: dtype")
    out_dtype = _dtype(data.get("out_dtype"), f"{where}: out_dtype")
    top = _parameters(data.get("parameters"), f"{where}: parameters")

    if (data.get("models") is None) == (data.get("slices") is None):
        raise UnsupportedConfigError(f"{where}: needs exactly one of 'models' or 'slices'")
    first_model = base
    if data.get("models") is not None:
        models = _model_list(data["models"], where, root)
        first_model = first_model or models[0][0]
    else:
        slices, base = _slice_list(data["slices"], where, root, base, method, spec)
        first_model = first_model or base or slices[0].sources[0].model

    checkpoint_layout, opened = _checkpoint_facts(first_model, layout, dtype is None, allow_pickle, where)
    if data.get("models") is not None:
        slices = [_models_as_slice(models, base, checkpoint_layout.n_layers, method, spec, where)]
    if dtype is None:
        referenced = {s.model for sl in slices for s in sl.sources} | ({base} if base else set())
        dtype = _implied_dtype(referenced, opened, allow_pickle, where)

    hints = _read_hints(text, where)
    seed = hints.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise UnsupportedConfigError(f"{where}: seed in the '{_HINT_PREFIX.strip()}' comment must be an integer")
    if method == "passthrough" and (hints.get("layer_slices") is True or not _in_place(slices, checkpoint_layout)):
        recipe = _passthrough_recipe(slices, top, base, checkpoint_layout, where)
        listed = hints.get("sources")
        if isinstance(listed, list) and all(isinstance(p, str) for p in listed):
            paths = tuple(_model_path(p, f"{where}: sources comment", root) for p in listed)
            if set(recipe.sources) <= set(paths):  # a stale comment is ignored
                recipe = dataclasses.replace(recipe, sources=paths)
    else:
        recipe = _layer_group_recipe(method, slices, top, base, checkpoint_layout, spec, where)
    recipe = dataclasses.replace(recipe, dtype=dtype, out_dtype=out_dtype, seed=seed)
    try:
        _validate(recipe)
    except MergeError as exc:
        raise UnsupportedConfigError(f"{where}: {exc}") from exc
    return recipe


def _validate(recipe: Recipe) -> None:
    """``validate_recipe``; with per-group bases, as each engine over one of them merges it."""
    for base in dict.fromkeys(recipe.group_bases) or [None]:
        validate_recipe(recipe if base is None else recipe.against(base))


def tokenizer_from_mergekit(source: str | Path, *, base_dir: Path | None = None) -> TokenizerPolicy | None:
    """The vocabulary policy of a mergekit config (``merges.tokenizer_union``); None: no tokenizer keys.

    mergekit 0.1.5 rebuilds the vocabulary whenever ``tokenizer_source`` or ``tokenizer`` is
    set, ``base`` included (the output has ``len(tokenizer)`` rows and a re-saved tokenizer);
    without either it copies the base's tokenizer files. Paths resolve as in
    :func:`recipe_from_mergekit`.
    """
    data, where = _read_mapping(source)
    root = (base_dir or Path.cwd()).expanduser().absolute()
    return _tokenizer_policy(data, where, root)


def mergekit_chat_template(source: str | Path, recipe: Recipe) -> str | None:
    """The chat template mergekit 0.1.5 writes into the merged tokenizer for this config, or None.

    As ``mergekit.merge._set_chat_template``: ``auto`` is the most common template among
    the models' tokenizers (the base first, then the sources; none: no template), a
    short name is one of mergekit's bundled templates (``chatml``, ``llama3``, ...),
    anything else is the template text itself. mergekit sets it on the tokenizer it saves
    (the one ``tokenizer_source`` builds, else the base's, reloaded and saved again rather
    than copied: ``_copy_tokenizer``). ``recipe`` is the config's :func:`recipe_from_mergekit`.
    """
    data, where = _read_mapping(source)
    template = data.get("chat_template")
    if template is None:
        return None
    if not isinstance(template, str) or not template:
        raise UnsupportedConfigError(f"{where}: chat_template: expected a name or a template, got {template!r}")
    if template == "auto":
        from collections import Counter

        found = []
        for model in dict.fromkeys(m for m in (recipe.base, *recipe.sources) if m is not None):
            config = Path(model) / "tokenizer_config.json"
            jinja = Path(model) / "chat_template.jinja"
            value = jinja.read_text(encoding="utf-8") if jinja.is_file() else (
                json.loads(config.read_text(encoding="utf-8")).get("chat_template") if config.is_file() else None)
            if isinstance(value, dict):
                value = value.get("default")
            if value:
                found.append(value.strip())
        return Counter(found).most_common(1)[0][0] if found else None
    if len(template) < 256 and "\n" not in template and "{" not in template:
        from importlib.resources import files

        bundled = files("mergekit._data.chat_templates").joinpath(f"{template}.jinja")
        if bundled.is_file():
            return bundled.read_text(encoding="utf-8")
    if len(template) < 20 or "{" not in template:
        raise UnsupportedConfigError(f"{where}: chat_template {template!r} is neither one of mergekit's "
                                     "named templates nor a template (mergekit refuses it too)")
    return template


def _tokenizer_policy(data: Mapping[str, object], where: str, root: Path) -> TokenizerPolicy | None:
    source = data.get("tokenizer_source")
    tokenizer = data.get("tokenizer")
    if source is not None and tokenizer is not None:
        raise UnsupportedConfigError(f"{where}: both tokenizer_source and tokenizer are set")
    if source is not None:
        return TokenizerPolicy(_tokenizer_source(source, f"{where}: tokenizer_source", root))
    if tokenizer is None:
        return None
    if not isinstance(tokenizer, Mapping):
        raise UnsupportedConfigError(f"{where}: tokenizer: expected a mapping")
    unknown = sorted(set(map(str, tokenizer)) - {"source", "tokens", "pad_to_multiple_of"})
    if unknown:
        raise UnsupportedConfigError(f"{where}: tokenizer: unknown key(s) {unknown}")
    policy_source = _tokenizer_source(tokenizer.get("source", UNION), f"{where}: tokenizer.source", root)
    pad = tokenizer.get("pad_to_multiple_of")
    if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad <= 0):
        raise UnsupportedConfigError(f"{where}: tokenizer.pad_to_multiple_of: expected a positive integer, got {pad!r}")
    raw_tokens = tokenizer.get("tokens") or {}
    if not isinstance(raw_tokens, Mapping):
        raise UnsupportedConfigError(f"{where}: tokenizer.tokens: expected a mapping of token -> {{source, force}}")
    tokens = tuple((str(token), _token_embedding(spec, f"{where}: tokenizer.tokens.{token}", root))
                   for token, spec in raw_tokens.items())
    return TokenizerPolicy(policy_source, tokens, pad)


def _tokenizer_source(raw: object, where: str, root: Path) -> str:
    if raw in (UNION, "base"):
        return str(raw)
    return _model_path(raw, where, root)


def _token_embedding(raw: object, where: str, root: Path) -> TokenEmbedding:
    if raw is None:
        return TokenEmbedding()
    if not isinstance(raw, Mapping) or set(map(str, raw)) - {"source", "force"}:
        raise UnsupportedConfigError(f"{where}: expected {{source: ..., force: ...}}, got {raw!r}")
    force = raw.get("force", False)
    if not isinstance(force, bool):
        raise UnsupportedConfigError(f"{where}.force: expected true/false, got {force!r}")
    source = raw.get("source")
    if source is None:
        return TokenEmbedding(force=force)
    if isinstance(source, str):
        return TokenEmbedding(model=_model_path(source, f"{where}.source", root), force=force)
    if isinstance(source, Mapping) and source.get("kind") == "zero" and set(source) == {"kind"}:
        return TokenEmbedding(zero=True, force=force)
    if isinstance(source, Mapping) and source.get("kind") == "model_token":
        token, token_id = source.get("token"), source.get("token_id")
        if (token is None) == (token_id is None) or set(source) - {"kind", "model", "token", "token_id"}:
            raise UnsupportedConfigError(f"{where}.source: model_token needs model and one of token / token_id")
        if token_id is not None and (not isinstance(token_id, int) or isinstance(token_id, bool)):
            raise UnsupportedConfigError(f"{where}.source.token_id: expected an integer, got {token_id!r}")
        return TokenEmbedding(model=_model_path(source.get("model"), f"{where}.source.model", root),
                              token=None if token is None else str(token), token_id=token_id, force=force)
    raise UnsupportedConfigError(f"{where}.source: expected a model, {{kind: zero}} or {{kind: model_token, ...}}")


def _tokenizer_yaml(policy: TokenizerPolicy, names: Mapping[str, str]) -> dict[str, object]:
    """``tokenizer:`` as mergekit reads it; model paths through ``names`` (as exported)."""
    def model(path: str) -> str:
        return names.get(path, path)

    out: dict[str, object] = {"source": policy.source if policy.source in (UNION, "base") else model(policy.source)}
    if policy.tokens:
        tokens: dict[str, object] = {}
        for token, spec in policy.tokens:
            entry: dict[str, object] = {}
            if spec.zero:
                entry["source"] = {"kind": "zero"}
            elif spec.model is not None and (spec.token is not None or spec.token_id is not None):
                ref = {"kind": "model_token", "model": model(spec.model)}
                ref.update({"token": spec.token} if spec.token is not None else {"token_id": spec.token_id})
                entry["source"] = ref
            elif spec.model is not None:
                entry["source"] = model(spec.model)
            if spec.force:
                entry["force"] = True
            tokens[token] = entry
        out["tokens"] = tokens
    if policy.pad_to_multiple_of is not None:
        out["pad_to_multiple_of"] = policy.pad_to_multiple_of
    return out


def _model_path(raw: object, where: str, root: Path) -> str:
    if isinstance(raw, Mapping):
        raise UnsupportedConfigError(f"{where}: model references with LoRA/revision fields are not supported")
    if not isinstance(raw, str) or not raw:
        raise UnsupportedConfigError(f"{where}: expected a model path, got {raw!r}")
    if LORA_SEPARATOR in raw:  # mergekit's model+lora: a LoRA source (merges.lora), each half a folder
        parts = raw.split(LORA_SEPARATOR)
        if len(parts) != 2 or not all(parts):
            raise UnsupportedConfigError(f"{where}: {raw!r}: expected MODEL+LORA, a model with a LoRA adapter (mergekit allows one '+')")
        return lora_reference(*(_model_path(part, where, root) for part in parts))
    if "@" in raw:
        raise UnsupportedConfigError(f"{where}: {raw!r} names a revision (model@rev); not supported")
    # as written, like mergekit (no ``~`` expansion: mergekit takes "~/m" for a Hub id);
    # a name that is no folder there is a Hub id to mergekit: opening it fails, naming it
    path = Path(raw)
    return str(path) if path.is_absolute() else str(Path(root, path))


def _dtype(raw: object, where: str) -> str | None:
    if raw is None:
        return None
    name = str(raw).removeprefix("torch.")
    if name not in DTYPES:
        raise UnsupportedConfigError(f"{where}: {raw!r} is not one of {DTYPES}")
    return name


def _parameters(raw: object, where: str) -> dict[str, Setting]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise UnsupportedConfigError(f"{where}: expected a mapping of parameters")
    return {str(k): _parse_setting(v, f"{where}.{k}") for k, v in raw.items()}


def _model_list(raw: object, where: str, root: Path) -> list[tuple[str, Parameters]]:
    if not isinstance(raw, list) or not raw:
        raise UnsupportedConfigError(f"{where}: models: expected a non-empty list")
    out = []
    for i, entry in enumerate(raw):
        here = f"{where}: models[{i}]"
        if not isinstance(entry, Mapping) or "model" not in entry or set(entry) - {"model", "parameters"}:
            raise UnsupportedConfigError(f"{here}: expected {{model, parameters}}")
        out.append((_model_path(entry["model"], here, root), _parameters(entry.get("parameters"), f"{here}.parameters")))
    return out


def _slice_list(raw: object, where: str, root: Path, base: str | None, method: str,
                spec: MethodSpec) -> tuple[list[_Slice], str | None]:
    """The slices, each with the base it merges against, and the recipe's base (``_slices_base``)."""
    if not isinstance(raw, list) or not raw:
        raise UnsupportedConfigError(f"{where}: slices: expected a non-empty list")
    out = []
    slice_bases: list[tuple[str, str | None]] = []  # (where, its own base_model)
    for i, entry in enumerate(raw):
        here = f"{where}: slices[{i}]"
        if not isinstance(entry, Mapping) or "sources" not in entry:
            raise UnsupportedConfigError(f"{here}: expected a mapping with 'sources'")
        extra = sorted(set(entry) - {"sources", "parameters", "base_model", "residual_weight"})
        if extra:
            raise UnsupportedConfigError(f"{here}: unknown key(s) {extra}")
        if entry.get("residual_weight") is not None:
            raise UnsupportedConfigError(f"{here}: residual_weight is not supported")
        slice_base = entry.get("base_model")
        if slice_base is not None:
            slice_bases.append((here, _model_path(slice_base, f"{here}.base_model", root)))
        else:
            slice_bases.append((here, None))
        if not isinstance(entry["sources"], list) or not entry["sources"]:
            raise UnsupportedConfigError(f"{here}: sources: expected a non-empty list")
        sources = []
        for j, src in enumerate(entry["sources"]):
            there = f"{here}.sources[{j}]"
            if not isinstance(src, Mapping) or set(src) - {"model", "layer_range", "parameters"} or "model" not in src:
                raise UnsupportedConfigError(f"{there}: expected {{model, layer_range, parameters}}")
            lr = src.get("layer_range")
            if not (isinstance(lr, list) and len(lr) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in lr)
                    and 0 <= lr[0] < lr[1]):
                raise UnsupportedConfigError(f"{there}: layer_range must be [start, end] with 0 <= start < end, got {lr!r}")
            sources.append(_Source(_model_path(src["model"], there, root), (lr[0], lr[1]),
                                   _parameters(src.get("parameters"), f"{there}.parameters")))
        out.append(_Slice(tuple(sources), _parameters(entry.get("parameters"), f"{here}.parameters"), here))
    recipe_base, effective = _slices_base(slice_bases, base, method, spec, where)
    return [dataclasses.replace(sl, base=b) for sl, b in zip(out, effective, strict=True)], recipe_base


def _slices_base(slice_bases: Sequence[tuple[str, str | None]], base: str | None, method: str,
                 spec: MethodSpec, where: str) -> tuple[str | None, tuple[str | None, ...]]:
    """The recipe's base and each slice's own. mergekit 0.1.5 merges each slice's layers
    against the slice's ``base_model``, else the top-level one (``ConfigReader.base_model``), the
    embeddings with the first slice's and the head with the last's; it takes the output config,
    tokenizer and copied files from the top-level one (``Recipe.base``; without one, mergekit
    takes any referenced model, here the first slice's base)."""
    if not spec.takes_base:  # linear, karcher, passthrough: mergekit ignores any base
        for here, slice_base in slice_bases:
            if slice_base is not None and slice_base != base:
                _warn(f"{here}: base_model {slice_base!r} is ignored, as mergekit ignores a base for {method}")
        return base, tuple(None for _ in slice_bases)
    effective = tuple(slice_base or base for _, slice_base in slice_bases)
    if None in effective and any(b is not None for b in effective):
        here = slice_bases[effective.index(None)][0]
        raise UnsupportedConfigError(
            f"{here}: no base_model, while other slices merge {method} against one; the engine "
            "merges every slice with a base or none (set base_model on every slice or at the top level)"
        )
    return base or effective[0], effective


def _models_as_slice(models: list[tuple[str, Parameters]], base: str | None, n_layers: int,
                     method: str, spec: MethodSpec, where: str) -> _Slice:
    """mergekit's normalize_config: one slice over all layers, the base appended when absent."""
    sources = [_Source(model, (0, n_layers), params) for model, params in models]
    if base is not None and base not in (m for m, _ in models):
        if not spec.takes_base:
            raise UnsupportedConfigError(
                f"{where}: {method} with base_model {base!r} not among models: mergekit would add the "
                "base as an input without parameters"
            )
        sources.append(_Source(base, (0, n_layers), {}))
    return _Slice(tuple(sources), {}, f"{where}: models", base if spec.takes_base else None)


def _checkpoint_facts(model: str | None, layout: Layout | None, need_dtypes: bool, allow_pickle: bool,
                      where: str) -> tuple[Layout, dict[str, Checkpoint]]:
    if layout is not None and not need_dtypes:
        return layout, {}
    if model is None:
        raise UnsupportedConfigError(f"{where}: no model to read the layer map from")
    checkpoint = open_checkpoint(model, allow_pickle=allow_pickle)
    return layout or checkpoint.layout, {model: checkpoint}


def _implied_dtype(models: set[str], opened: dict[str, Checkpoint], allow_pickle: bool, where: str) -> str:
    """With no ``dtype`` mergekit computes in the stored dtype; exact only when all are float32."""
    import torch  # here, not at the top: writing a config (export, the dashboard) needs no torch

    for model in sorted(models):
        checkpoint = opened.get(model) or open_checkpoint(model, allow_pickle=allow_pickle)
        odd = next((n for n, d in checkpoint.dtypes.items() if d.is_floating_point and d != torch.float32), None)
        if odd is not None:
            raise UnsupportedConfigError(
                f"{where}: no dtype is set and {model} stores {odd!r} as {checkpoint.dtypes[odd]}; "
                "set dtype explicitly"
            )
    return "float32"


Probes = dict[str, list[tuple[str, float]]]  # role -> (tensor name, gradient position t)


def _probes(layout: Layout, layers: Sequence[tuple[int, int | None, float]], first: bool, last: bool) -> Probes:
    """The tensors whose parameters one layer group decides, per role, each with its ``t``.

    ``layers`` holds (layer of the base layout, name of that layer in the input model or
    None for the same, t). Embeddings count only in the first group and the final norm /
    head only in the last, both at ``t = 0`` (mergekit plans them with the first/last
    slice's reader at t = 0). A role no tensor of the group has is probed on the first
    tensor of that role anywhere (its value then changes no tensor but must round-trip).
    """
    probes: Probes = {role: [] for role in ROLES}
    for layer, input_layer, t in layers:
        for info in layout.layer_tensors(layer):
            name = info.name if input_layer is None else layout.rename_layer(info.name, input_layer)
            probes[info.role].append((name, t))
    for info in layout.tensors:
        if info.layer is None and ((info.role == "embed" and first) or (info.role == "head" and last)):
            probes[info.role].append((info.name, 0.0))
    for role, found in probes.items():
        if not found:
            probes[role] = [(next((i.name for i in layout.tensors if i.role == role), ""), 0.0)]
    return probes


def _resolve(param: _Parameter, chain: Sequence[Parameters], tensor: str, t: float,
             where: str) -> Scalar | None:
    """mergekit.parameter_resolver.resolve_parameter: first scope whose setting gives a value."""
    validate = _Validator(param.kind, f"{where}: {param.name}")
    for scope in chain:
        if param.name in scope:
            value = _evaluate(scope[param.name], tensor, t, validate, where)
            if value is not None:
                return value
    return param.default


def _role_value(param: _Parameter, chain: Sequence[Parameters], role: str,
                probes: list[tuple[str, float]], where: str) -> Scalar:
    values = [(name, _resolve(param, chain, name, t, where)) for name, t in probes]
    first_name, first = values[0]
    for name, value in values[1:]:
        if value != first or type(value) is not type(first):
            raise UnsupportedConfigError(
                f"{where}: {param.name} is {first!r} for {first_name!r} but {value!r} for {name!r}, both "
                f"{role} tensors of one layer group; the engine sets one value per layer group and "
                "role, so a filter must select whole roles"
            )
    if first is None:
        raise UnsupportedConfigError(f"{where}: missing required parameter {param.name!r} (tensor {first_name!r})")
    return first


def _check_parameter_names(slices: Sequence[_Slice], top: Parameters, method: str,
                           params: Mapping[str, _Parameter], where: str) -> None:
    scopes: list[tuple[str, Parameters, bool]] = [(f"{where}: parameters", top, False)]
    for sl in slices:
        scopes.append((f"{sl.where}.parameters", sl.parameters, False))
        scopes += [(f"{sl.where} ({s.model}).parameters", s.parameters, True) for s in sl.sources]
    # mergekit 0.1.5 resolves only the parameters its method declares, and a shared one
    # only from slice and top-level parameters: anything else changes nothing there, so it
    # is accepted here too (it is not in the recipe), with a warning naming it
    for here, scope, is_source in scopes:
        for name in scope:
            if name not in params:
                _warn(f"{here}: {name!r} is not a parameter of {method} (known: {sorted(params)}); "
                      "ignored, as mergekit ignores it")
            elif is_source and not params[name].per_source:
                _warn(f"{here}: {name!r} is shared by all models and a source's parameters do not "
                      "set it; ignored, as mergekit ignores it (put it in the slice's or the "
                      "top-level parameters)")


def _warn(message: str) -> None:
    warnings.warn(message, IgnoredConfigWarning, stacklevel=2)


def _layer_group_recipe(method: str, slices: Sequence[_Slice], top: Parameters, base: str | None,
                        layout: Layout, spec: MethodSpec, where: str) -> Recipe:
    params = _parameters_of(spec)
    _check_parameter_names(slices, top, method, params, where)
    first_models: list[str] | None = None
    inputs_of: list[tuple[str, ...]] = []  # per slice: the models merged against its base, in order
    start = 0
    for sl in slices:
        length = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
        ranges = sorted({s.layer_range for s in sl.sources})
        if ranges != [(start, start + length)]:
            raise UnsupportedConfigError(
                f"{sl.where}: sources use layer ranges {ranges} for output layers "
                f"[{start}, {start + length}); {method} merges layer i of every model into layer i, "
                "so every source of a slice must use the slice's own output range"
            )
        models = [s.model for s in sl.sources]
        if len(set(models)) != len(models):
            raise UnsupportedConfigError(f"{sl.where}: a model is listed twice ({models})")
        if sl.base is not None and sl.base not in models:
            raise UnsupportedConfigError(
                f"{sl.where}: the base model must be listed as a source of every slice "
                f"({method} uses {sl.base}; mergekit refuses the slice otherwise)"
            )
        first_models = first_models or models
        inputs_of.append(tuple(m for m in models if m != sl.base))
        if set(models) != set(first_models):
            raise UnsupportedConfigError(
                f"{sl.where}: models {models} differ from the first slice's {first_models}; "
                "every layer group must merge the same models in the same order"
            )
        start += length
    if start != layout.n_layers:
        raise UnsupportedConfigError(f"{where}: slices give {start} layers but the base has {layout.n_layers}")
    assert first_models is not None
    # The recipe's sources: every model some slice merges (a slice's own base is one of them
    # where another slice merges it), in the first slice's order, which every slice must keep.
    order = tuple(m for m in first_models if any(m in inputs for inputs in inputs_of))
    for sl, inputs in zip(slices, inputs_of, strict=True):
        if tuple(m for m in order if m != sl.base) != inputs:
            raise UnsupportedConfigError(
                f"{sl.where}: models {list(inputs)} are merged in another order than the first "
                f"slice's {[m for m in order if m != sl.base]}; every layer group must merge the "
                "same models in the same order"
            )

    def mentioned(param: _Parameter) -> bool:
        scopes = [top, *(sl.parameters for sl in slices)]
        if param.per_source:
            scopes += [s.parameters for sl in slices for s in sl.sources if s.model in order and s.model != sl.base]
        return any(param.name in scope for scope in scopes)

    used = [p for p in params.values() if mentioned(p)]
    missing = [p.name for p in params.values() if p.default is None and not mentioned(p)]
    if missing:
        raise UnsupportedConfigError(f"{where}: missing required parameter(s) {missing} for {method}")

    # (slice, its first layer, the layers of this group)
    plan: list[tuple[_Slice, int, int, range]] = []
    for sl in slices:
        lo, hi = sl.sources[0].layer_range
        chain = [top, sl.parameters, *(s.parameters for s in sl.sources)]
        if any(_has_gradient(v) for scope in chain for v in scope.values()):
            plan += [(sl, lo, hi, range(layer, layer + 1)) for layer in range(lo, hi)]
        else:
            plan.append((sl, lo, hi, range(lo, hi)))

    groups = tuple((r.start, r.stop) for _, _, _, r in plan)
    tensor_rows: dict[str, list[tuple[tuple[float, ...], ...]]] = {p.name: [] for p in used if p.per_source}
    global_rows: dict[str, list[tuple[Scalar, ...]]] = {p.name: [] for p in used if not p.per_source}
    for index, (sl, lo, hi, layers) in enumerate(plan):
        ts = [(layer, None, (layer - lo) / (hi - lo - 1) if hi - lo > 1 else 1.0) for layer in layers]
        probes = _probes(layout, ts, index == 0, index == len(plan) - 1)
        here = f"{sl.where} layers [{layers.start}, {layers.stop})"
        for param in used:
            if param.per_source:
                cells = []
                for role in ROLES:
                    cell = []
                    for model in order:
                        if model == sl.base:  # merged as this group's base: its values change nothing
                            cell.append(float(param.default or 0.0))
                            continue
                        chain = [s.parameters for s in sl.sources if s.model == model] + [sl.parameters, top]
                        cell.append(float(_role_value(param, chain, role, probes[role], f"{here} ({model})")))
                    cells.append(tuple(cell))
                tensor_rows[param.name].append(tuple(cells))
            else:
                chain = [sl.parameters, top]
                global_rows[param.name].append(
                    tuple(_role_value(param, chain, role, probes[role], here) for role in ROLES)
                )
    group_bases = tuple(sl.base for sl, _, _, _ in plan)
    return Recipe(
        method, base, order, groups,
        tensor_params={k: tuple(v) for k, v in tensor_rows.items()},
        global_params={k: tuple(v) for k, v in global_rows.items()},
        group_bases=group_bases if any(b is not None and b != base for b in group_bases) else (),  # type: ignore[arg-type]
    )


def _passthrough_recipe(slices: Sequence[_Slice], top: Parameters, base: str | None,
                        layout: Layout, where: str) -> Recipe:
    scale = _Parameter("scale", True, float, 1.0)
    _check_parameter_names(slices, top, "passthrough", {"scale": scale}, where)
    pieces: list[LayerSlice] = []
    for index, sl in enumerate(slices):
        if len(sl.sources) != 1:
            raise UnsupportedConfigError(f"{sl.where}: passthrough takes exactly one source per slice")
        source = sl.sources[0]
        lo, hi = source.layer_range
        # Per-source parameters match the input model's names: base layer 0 renamed to lo + i.
        layers = [(0, lo + i, i / (hi - lo - 1) if hi - lo > 1 else 1.0) for i in range(hi - lo)]
        probes = _probes(layout, layers, index == 0, index == len(slices) - 1)
        chain = [source.parameters, sl.parameters, top]
        values = {float(_role_value(scale, chain, role, probes[role], sl.where)) for role in ROLES
                  if index in (0, len(slices) - 1) or role not in ("embed", "head")}
        if len(values) > 1:
            raise UnsupportedConfigError(
                f"{sl.where}: scale differs between roles ({sorted(values)}); the engine applies one "
                "scale per layer slice"
            )
        pieces.append(LayerSlice(source.model, lo, hi, values.pop()))
    groups, start = [], 0
    for piece in pieces:
        groups.append((start, start + piece.end - piece.start))
        start += piece.end - piece.start
    sources = tuple(dict.fromkeys(p.model for p in pieces))
    return Recipe("passthrough", base, sources, tuple(groups), layer_slices=tuple(pieces))


def _in_place(slices: Sequence[_Slice], layout: Layout) -> bool:
    """One model's layers, each kept where it is: a passthrough the layer-group form describes."""
    models = {s.model for sl in slices for s in sl.sources}
    start = 0
    for sl in slices:
        if len(sl.sources) != 1 or sl.sources[0].layer_range[0] != start:
            return False
        start = sl.sources[0].layer_range[1]
    return len(models) == 1 and start == layout.n_layers
