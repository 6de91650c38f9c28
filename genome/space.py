"""Genes as Optuna distributions, and ``decode`` / ``encode`` between parameters and recipes.

Gene names are stable and readable: ``g0.weight.shipping``, ``g1.attention.density.refunds``,
``embed.weight.catalog``, ``lambda``, ``g2.t``, ``layer3.source``, ``layer3.index``.

How genes fill a ``Recipe``'s ``[group][role]`` tables: without ``per_role`` one gene per
group fills every role row of that group; with ``per_role`` the ``attention``, ``mlp`` and
``norm`` genes fill their rows and the ``norm`` gene also fills ``embed`` and ``head`` (it
is the catch-all, like an unfiltered mergekit value); with ``embed_head`` the ``embed`` and
``head`` genes fill those rows of every group. Only group 0's ``embed`` row and the last
group's ``head`` row reach tensors, so ``encode`` reads and checks just the cells that do,
layer by layer: a recipe with other layer groups (a one-group baseline in a per-layer
genome) encodes as long as each tensor gets a value the genome can give it.

``decode`` and ``encode`` are exact inverses on the genes' grid: ``encode(decode(p)) == p``
for on-grid ``p`` and ``decode(encode(r)) == r`` for recipes the genome can express.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from genome.errors import GenomeError
from genome.spec import BASE_CHOICE, Bounds, GenomeSpec
from merges.errors import RecipeError
from merges.recipe import ROLES, LayerSlice, Recipe

if TYPE_CHECKING:  # optuna is imported where distributions are built: `search status` reads configs without it
    from optuna.distributions import BaseDistribution

Params = Mapping[str, float | int | str]
Sources = Sequence[str] | Mapping[str, str]
"""Source labels in order, or labels -> checkpoint paths (the paths go into the recipe)."""

_LAYER_ROLES = ("attention", "mlp", "norm")


def gene_space(spec: GenomeSpec, *, sources: Sources, n_layers: int) -> dict[str, BaseDistribution]:
    """Every gene of ``spec`` with its Optuna distribution, in a stable order."""
    from optuna.distributions import FloatDistribution

    labels = check_sources(spec, sources)
    _check_layers(n_layers)
    if spec.frankenmerge is not None:
        return dict(_franken_genes(spec, labels, n_layers))
    space: dict[str, BaseDistribution] = {}
    for gene in _numeric_genes(spec, labels, n_layers):
        b = gene.bounds
        space[gene.name] = FloatDistribution(b.low, b.high, step=b.step)
    return space


def gene_names(spec: GenomeSpec, *, sources: Sources, n_layers: int) -> tuple[str, ...]:
    return tuple(gene_space(spec, sources=sources, n_layers=n_layers))


def is_numeric(spec: GenomeSpec) -> bool:
    """False when the genome has categorical genes (CMA-ES samples those at random)."""
    return spec.frankenmerge is None


def layer_groups(spec: GenomeSpec, n_layers: int) -> tuple[tuple[int, int], ...]:
    """Half-open layer ranges of the gene groups."""
    _check_layers(n_layers)
    size = spec.layer_granularity or n_layers
    return tuple((start, min(start + size, n_layers)) for start in range(0, n_layers, size))


def decode(
    spec: GenomeSpec,
    params: Params,
    *,
    base: str,
    sources: Sources,
    n_layers: int,
    seed: int,
    dtype: str = "float32",
) -> Recipe:
    """The recipe a parameter set describes; float genes are snapped to their grid."""
    labels = check_sources(spec, sources)
    paths = _paths(sources)
    space = gene_space(spec, sources=sources, n_layers=n_layers)
    unknown = sorted(set(params) - set(space))
    if unknown:
        raise GenomeError(f"params: unknown gene {unknown[0]!r} (this genome has {len(space)} genes)")
    for name in space:
        if name not in params:
            raise GenomeError(f"params: missing gene {name!r}")
    try:
        if spec.frankenmerge is not None:
            return _decode_franken(spec, params, space, base, labels, paths, n_layers, seed, dtype)
        return _decode_numeric(spec, params, base, labels, paths, n_layers, seed, dtype)
    except RecipeError as exc:
        raise GenomeError(f"params do not form a valid recipe: {exc}") from exc


def encode(
    spec: GenomeSpec, recipe: Recipe, *, sources: Sources, n_layers: int | None = None, snap: bool = False,
) -> dict[str, float | int | str]:
    """The parameters that decode to ``recipe``; ``GenomeError`` if the genome cannot express it.

    ``n_layers`` (the checkpoints' layer count) matters only for frankenmerges, where the
    recipe's own layer count may differ; it is inferred from the recipe when omitted.
    ``snap``: a value inside a gene's bounds but off its grid (``step``) is moved to the
    nearest grid point (by at most half a step) instead of refused; the parameters then
    decode to that snapped recipe (a recipe written by hand rarely sits on the grid).
    """
    labels = check_sources(spec, sources)
    paths = _paths(sources)
    if recipe.method != spec.method:
        raise GenomeError(f"recipe.method: {recipe.method!r}, but the genome searches {spec.method!r}")
    if spec.frankenmerge is not None:
        params = _encode_franken(spec, recipe, labels, paths)
    else:
        if tuple(recipe.sources) != paths:
            raise GenomeError(
                f"recipe.sources: expected {list(paths)} in this order, got {list(recipe.sources)}"
            )
        if recipe.layer_slices:
            raise GenomeError(f"recipe.layer_slices: only passthrough recipes have them, not {spec.method!r}")
        params = _encode_numeric(spec, recipe, labels, snap=snap)
    if n_layers is None:
        n_layers = _n_layers(spec, recipe)
    # The decoded recipe must reach every tensor the same way the given one does.
    decoded = decode(
        spec, params, base=recipe.base or "", sources=sources, n_layers=n_layers,
        seed=recipe.seed, dtype=recipe.dtype,
    )
    _check_same_effect(spec, recipe, decoded, _snap_tolerance(spec) if snap else {})
    return params


# -- numeric genomes ------------------------------------------------------------------


@dataclass(frozen=True)
class _Gene:
    name: str
    param: str  # Recipe parameter: weight, density, lambda, t, or another of the catalogue's
    owner: str  # the row owner: "g0", "g0.attention", "embed", "head", or "" (global)
    source: int | None  # index into sources for per-source parameters
    bounds: Bounds


def _owner(spec: GenomeSpec, group: int, role: str) -> str:
    """Which gene prefix fills the ``[group][role]`` cell."""
    if spec.embed_head and role in ("embed", "head"):
        return role
    if spec.per_role:
        return f"g{group}.{role if role in _LAYER_ROLES else 'norm'}"
    return f"g{group}"


def _owners(spec: GenomeSpec, n_groups: int) -> list[str]:
    owners = ["embed"] if spec.embed_head else []
    for group in range(n_groups):
        owners += [f"g{group}.{role}" for role in _LAYER_ROLES] if spec.per_role else [f"g{group}"]
    return owners + (["head"] if spec.embed_head else [])


def _numeric_genes(spec: GenomeSpec, labels: tuple[str, ...], n_layers: int) -> Iterator[_Gene]:
    searched = spec.bounds()
    per_source = [name for name in searched if name in spec.genes.source_params]
    # one gene per cell owner for shared parameters (t, select_topk...); lambda is one gene
    shared = [name for name in searched if name not in per_source and name != "lambda"]
    for owner in _owners(spec, len(layer_groups(spec, n_layers))):
        for param in per_source:
            for index, label in enumerate(labels):
                yield _Gene(f"{owner}.{param}.{label}", param, owner, index, searched[param])
        for param in shared:
            yield _Gene(f"{owner}.{param}", param, owner, None, searched[param])
    if "lambda" in searched:
        yield _Gene("lambda", "lambda", "", None, searched["lambda"])


def _float_gene(params: Params, gene: _Gene) -> float:
    value = params[gene.name]
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise GenomeError(f"params.{gene.name}: expected a number, got {value!r}")
    if not _within(gene.bounds, float(value)):
        raise GenomeError(f"params.{gene.name}: {value!r} is outside {gene.bounds.describe()}")
    return gene.bounds.snap(float(value))


def _within(bounds: Bounds, value: float) -> bool:
    tol = 1e-9 * max(1.0, abs(bounds.low), abs(bounds.high))
    return bounds.low - tol <= value <= bounds.high + tol


def _decode_numeric(
    spec: GenomeSpec,
    params: Params,
    base: str,
    labels: tuple[str, ...],
    paths: tuple[str, ...],
    n_layers: int,
    seed: int,
    dtype: str,
) -> Recipe:
    groups = layer_groups(spec, n_layers)
    genes = list(_numeric_genes(spec, labels, n_layers))
    per_source: dict[tuple[str, str], list[float]] = {}  # (param, owner) -> value per source
    shared: dict[tuple[str, str], float] = {}  # (param, owner) -> value
    for gene in genes:
        value = _float_gene(params, gene)
        if gene.source is None:
            shared[(gene.param, gene.owner)] = value
        else:
            per_source.setdefault((gene.param, gene.owner), [0.0] * len(labels))[gene.source] = value

    def owner(group: int, role: str) -> str:
        return _owner(spec, group, role)

    tensor_params: dict[str, tuple[tuple[tuple[float, ...], ...], ...]] = {}
    global_params: dict[str, tuple[tuple[float | bool, ...], ...]] = {}
    for param in {p for p, _ in per_source}:
        tensor_params[param] = tuple(
            tuple(tuple(per_source[(param, owner(g, role))]) for role in ROLES) for g in range(len(groups))
        )
    for param in {p for p, _ in shared}:
        global_params[param] = tuple(
            tuple(shared[(param, "" if param == "lambda" else owner(g, role))] for role in ROLES)
            for g in range(len(groups))
        )
    for name, value in spec.fixed.items():
        if name in spec.genes.source_params:
            cell = tuple(float(value) for _ in labels)
            tensor_params[name] = tuple(tuple(cell for _ in ROLES) for _ in groups)
        else:
            scalar: float | bool = value if isinstance(value, bool) else float(value)
            global_params[name] = tuple(tuple(scalar for _ in ROLES) for _ in groups)
    return Recipe(
        method=spec.method, base=base, sources=paths, groups=groups,
        tensor_params=dict(sorted(tensor_params.items())), global_params=dict(sorted(global_params.items())),
        dtype=dtype, seed=seed,
    )


def _encode_numeric(
    spec: GenomeSpec, recipe: Recipe, labels: tuple[str, ...], *, snap: bool = False
) -> dict[str, float | int | str]:
    groups = layer_groups(spec, recipe.n_layers)
    params: dict[str, float | int | str] = {}
    for gene in _numeric_genes(spec, labels, recipe.n_layers):
        group, role = _gene_cell(spec, gene.owner, groups, recipe)
        table = recipe.tensor_params if gene.source is not None else recipe.global_params
        if gene.param not in table:
            raise GenomeError(f"recipe: has no {gene.param!r}, which the genome searches ({gene.name})")
        cell = table[gene.param][group][ROLES.index(role)]
        value = cell[gene.source] if gene.source is not None else cell
        inside = _within(gene.bounds, float(value)) if snap else gene.bounds.contains(float(value))
        if isinstance(value, bool) or not inside:
            raise GenomeError(
                f"recipe: {gene.param} {value!r} for gene {gene.name} is not in genome.{gene.param} "
                f"{gene.bounds.describe()}"
            )
        params[gene.name] = gene.bounds.snap(float(value))
    return params


def _gene_cell(
    spec: GenomeSpec, owner: str, groups: Sequence[tuple[int, int]], recipe: Recipe
) -> tuple[int, str]:
    """A ``[group][role]`` cell of ``recipe`` that reaches tensors ``owner``'s genes fill.

    The recipe's own groups may differ from the genome's (a one-group baseline in a
    per-layer genome): a genome group is read at its first layer.
    """
    if owner in ("", "embed"):
        return 0, "embed" if owner else "attention"
    if owner == "head":
        return len(recipe.groups) - 1, "head"
    group, _, role = owner[1:].partition(".")
    return recipe.group_of_layer(groups[int(group)][0]), role or "attention"


def _effective_cells(recipe: Recipe) -> Iterator[tuple[str, int, str]]:
    """What reaches tensors: (where, group, role) for the embeddings, each layer's roles, the head."""
    yield "embeddings", 0, "embed"
    for layer in range(recipe.n_layers):
        group = recipe.group_of_layer(layer)
        for role in _LAYER_ROLES:
            yield f"layer {layer}", group, role
    yield "head", len(recipe.groups) - 1, "head"


def _snap_tolerance(spec: GenomeSpec) -> dict[str, float]:
    """How far snapping may move each gridded parameter: half a step (and float rounding)."""
    return {name: b.step / 2 * (1 + 1e-9) for name, b in spec.bounds().items() if b.step is not None}


def _check_same_effect(spec: GenomeSpec, given: Recipe, decoded: Recipe,
                       tolerance: Mapping[str, float] | None = None) -> None:
    """Every tensor must get the same values from ``decoded`` as from ``given`` (within
    ``tolerance[param]`` where snapping to the grid moved them)."""
    if spec.frankenmerge is not None:
        if _expand(given) != _expand(decoded) or any(s.scale != 1.0 for s in given.layer_slices):
            raise GenomeError("recipe.layer_slices: not expressible by this genome (scale must be 1)")
        return
    for kind, mine, theirs in (
        ("tensor", given.tensor_params, decoded.tensor_params),
        ("global", given.global_params, decoded.global_params),
    ):
        for name in sorted(set(mine) | set(theirs)):
            if name not in theirs:
                raise GenomeError(
                    f"recipe: sets {kind} parameter {name!r}, which the genome neither searches nor "
                    f"fixes (add genome.fixed.{name})"
                )
            if name not in mine:
                raise GenomeError(f"recipe: has no {kind} parameter {name!r}, which the genome sets")
            for (where, group, role), (_, other, _) in zip(
                _effective_cells(given), _effective_cells(decoded), strict=True
            ):
                a, b = mine[name][group][ROLES.index(role)], theirs[name][other][ROLES.index(role)]
                if not _close(a, b, (tolerance or {}).get(name, 0.0)):
                    raise GenomeError(
                        f"recipe: {name} of the {role} tensors of {where} is {a!r}; the genome can only "
                        f"give {b!r} there (layer groups {[list(g) for g in decoded.groups]})"
                    )


def _close(a: object, b: object, tolerance: float = 0.0) -> bool:
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_close(x, y, tolerance) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=max(1e-12, tolerance))
    return False


# -- frankenmerges --------------------------------------------------------------------


def _franken_choices(spec: GenomeSpec, labels: tuple[str, ...]) -> tuple[str, ...]:
    assert spec.frankenmerge is not None
    choices = (BASE_CHOICE, *labels) if spec.frankenmerge.include_base else labels
    if len(choices) < 2:
        raise GenomeError(
            "genome.frankenmerge: needs at least two checkpoints to choose from (set include_base = true)"
        )
    return choices


def _franken_genes(
    spec: GenomeSpec, labels: tuple[str, ...], n_layers: int
) -> Iterator[tuple[str, BaseDistribution]]:
    from optuna.distributions import CategoricalDistribution, IntDistribution

    franken = spec.frankenmerge
    assert franken is not None
    choices = _franken_choices(spec, labels)
    out = franken.output_layers(n_layers)
    if franken.pick == "same_index" and out > n_layers:
        raise GenomeError(
            f"genome.frankenmerge.layers: {out} output layers with pick = \"same_index\" need "
            f"{out} layers, the checkpoints have {n_layers} (use pick = \"any_index\")"
        )
    start, end = franken.index_range(n_layers)
    for layer in range(out):
        yield f"layer{layer}.source", CategoricalDistribution(choices)
        if franken.pick == "any_index":
            yield f"layer{layer}.index", IntDistribution(start, end - 1)


def _decode_franken(
    spec: GenomeSpec,
    params: Params,
    space: Mapping[str, BaseDistribution],
    base: str,
    labels: tuple[str, ...],
    paths: tuple[str, ...],
    n_layers: int,
    seed: int,
    dtype: str,
) -> Recipe:
    from optuna.distributions import CategoricalDistribution, IntDistribution

    franken = spec.frankenmerge
    assert franken is not None
    model_of = dict(zip(labels, paths, strict=True)) | {BASE_CHOICE: base}
    picks: list[tuple[str, int]] = []  # (checkpoint path, layer index) per output layer
    for layer in range(franken.output_layers(n_layers)):
        name = f"layer{layer}.source"
        choice = params[name]
        dist = space[name]
        assert isinstance(dist, CategoricalDistribution)
        if choice not in dist.choices:
            raise GenomeError(f"params.{name}: {choice!r} is not one of {list(dist.choices)}")
        index = layer
        if franken.pick == "any_index":
            name = f"layer{layer}.index"
            index_dist = space[name]
            raw = params[name]
            assert isinstance(index_dist, IntDistribution)
            if isinstance(raw, bool) or not isinstance(raw, int | float) or raw != int(raw):
                raise GenomeError(f"params.{name}: expected an integer, got {raw!r}")
            index = int(raw)
            if not index_dist.low <= index <= index_dist.high:
                raise GenomeError(f"params.{name}: {index} is outside [{index_dist.low}, {index_dist.high}]")
        picks.append((model_of[str(choice)], index))
    slices = _collapse(picks)
    groups: list[tuple[int, int]] = []
    for s in slices:
        start = groups[-1][1] if groups else 0
        groups.append((start, start + s.end - s.start))
    return Recipe(
        method=spec.method, base=base, sources=paths, groups=tuple(groups), layer_slices=slices,
        dtype=dtype, seed=seed,
    )


def _collapse(picks: Sequence[tuple[str, int]]) -> tuple[LayerSlice, ...]:
    """Consecutive layers of one checkpoint become one slice."""
    slices: list[LayerSlice] = []
    for model, index in picks:
        last = slices[-1] if slices else None
        if last is not None and last.model == model and last.end == index:
            slices[-1] = LayerSlice(model, last.start, index + 1)
        else:
            slices.append(LayerSlice(model, index, index + 1))
    return tuple(slices)


def _expand(recipe: Recipe) -> list[tuple[str, int]]:
    return [(s.model, i) for s in recipe.layer_slices for i in range(s.start, s.end)]


def _encode_franken(
    spec: GenomeSpec, recipe: Recipe, labels: tuple[str, ...], paths: tuple[str, ...]
) -> dict[str, float | int | str]:
    franken = spec.frankenmerge
    assert franken is not None
    choices = _franken_choices(spec, labels)
    label_of = dict(zip(paths, labels, strict=True))
    if BASE_CHOICE in choices and recipe.base is not None:
        label_of.setdefault(recipe.base, BASE_CHOICE)
    if not recipe.layer_slices:
        raise GenomeError("recipe.layer_slices: a passthrough recipe needs layer slices")
    params: dict[str, float | int | str] = {}
    for layer, (model, index) in enumerate(_expand(recipe)):
        if model not in label_of:
            raise GenomeError(
                f"recipe.layer_slices: output layer {layer} comes from {model!r}, which is not one of "
                f"the genome's choices ({', '.join(choices)})"
            )
        params[f"layer{layer}.source"] = label_of[model]
        if franken.pick == "any_index":
            params[f"layer{layer}.index"] = index
        elif index != layer:
            raise GenomeError(
                f"recipe.layer_slices: output layer {layer} takes layer {index}; with pick = \"same_index\" "
                f"it must take layer {layer}"
            )
    return params


def _n_layers(spec: GenomeSpec, recipe: Recipe) -> int:
    """The checkpoints' layer count a recipe implies (for frankenmerges: what the genome assumes)."""
    franken = spec.frankenmerge
    if franken is None:
        return recipe.n_layers
    out = len(_expand(recipe))
    if franken.output_layers(out) != out:
        raise GenomeError(
            f"recipe.layer_slices: {out} output layers, the genome makes {franken.layers}"
        )
    # The layer count bounds the choices only; take it from the genome when it says.
    if franken.layer_range is not None:
        return max(franken.layer_range[1], out)
    return max(out, max((i + 1 for _, i in _expand(recipe)), default=out))


# -- helpers --------------------------------------------------------------------------


def check_sources(spec: GenomeSpec, sources: Sources) -> tuple[str, ...]:
    """The source labels, checked against the method (how many sources) and gene naming."""
    labels = tuple(sources)
    if not labels:
        raise GenomeError("models.sources: need at least one source")
    genes = spec.genes
    if len(labels) < genes.min_sources or (genes.max_sources is not None and len(labels) > genes.max_sources):
        want = (
            f"exactly {genes.min_sources}" if genes.min_sources == genes.max_sources
            else f"at least {genes.min_sources}"
        )
        raise GenomeError(
            f"models.sources: method {spec.method!r} takes {want} source(s) besides the base, got {len(labels)}"
        )
    for label in labels:
        if not label or "." in label or label != label.strip():
            raise GenomeError(f"models.sources: label {label!r} cannot be part of a gene name (no dots, no spaces)")
    if len(set(labels)) != len(labels):
        raise GenomeError(f"models.sources: duplicate labels in {list(labels)}")
    if spec.frankenmerge is not None and spec.frankenmerge.include_base and BASE_CHOICE in labels:
        raise GenomeError(f"models.sources: label {BASE_CHOICE!r} is reserved for the base in frankenmerges")
    return labels


def _paths(sources: Sources) -> tuple[str, ...]:
    if isinstance(sources, Mapping):
        return tuple(str(path) for path in sources.values())
    return tuple(sources)


def _check_layers(n_layers: int) -> None:
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise GenomeError(f"n_layers: expected an integer >= 1, got {n_layers!r}")
