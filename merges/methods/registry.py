"""The method catalogue: the one place that knows each merge method (mergekit 0.1.5 semantics).

Each entry of ``METHODS`` says what a method takes (per-source tensor parameters and
global ones, their kinds, mergekit's defaults, the range a value must lie in and the
natural range a search tries), how many sources it needs and whether it needs the base,
whether it draws random masks, and which module plans its work for one tensor
(``planner``: a module of this package with a ``plan(context)`` function, imported by the
engine only). Read from mergekit's own registry (``merge_methods/registry.py`` and the
methods' signatures): ``weight`` has no default (required) for linear and the task-vector
family; ``ties`` and ``della`` normalise by default, ``dare_*`` and ``della*`` rescale by
default, ``slerp`` requires ``t``.

The genome derives its genes, the mergekit exporter / importer its parameter names, the
baselines their untuned values from here. Adding a method is one module (its math and
its planner) plus one line in ``METHODS``. No torch here: writing a mergekit config
(``search export``, the dashboard) and parsing a study file read this catalogue.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from merges.errors import RecipeError
from merges.recipe import Recipe

REQUIRED = None  # a parameter default that means "the recipe must give it"
EQUAL = "equal"  # an untuned value: 1 / number of sources (weights)

Scalar = float | bool

# mergekit's BasePolicy, as far as the engine needs it
REQUIRED_BASE, OPTIONAL_BASE, IGNORED = "required", "optional", "ignored"


@dataclass(frozen=True)
class Param:
    """One parameter of a method.

    ``per_source``: one value per input model (``Recipe.tensor_params``), else one shared
    value (``Recipe.global_params``). ``kind``: float, int or bool. ``default``: mergekit's
    (``REQUIRED``: the recipe must give it). ``limits``: the values that make sense
    (inclusive; None: unbounded). ``search``: the natural range a search tries (None: not a
    gene, only fixable). ``untuned``: the value a user tries first (a baseline's; ``EQUAL``
    for equal weights).
    """

    name: str
    per_source: bool
    kind: type = float
    default: Scalar | None = REQUIRED
    limits: tuple[float | None, float | None] = (None, None)
    search: tuple[float, float] | None = None
    untuned: Scalar | str | None = None


def _source(name: str, default: Scalar | None = REQUIRED, **kw: object) -> Param:
    return Param(name, True, float, default, **kw)  # type: ignore[arg-type]


def _global(name: str, default: Scalar | None = REQUIRED, kind: type | None = None,
            **kw: object) -> Param:
    kind = kind or (bool if isinstance(default, bool) else float)
    return Param(name, False, kind, default, **kw)  # type: ignore[arg-type]


UNIT = (0.0, 1.0)
WEIGHT = _source("weight", search=UNIT, untuned=EQUAL)
DENSITY = _source("density", 1.0, limits=UNIT, search=UNIT, untuned=0.5)
T = _global("t", limits=UNIT, search=UNIT, untuned=0.5)
LAMBDA = _global("lambda", 1.0, search=(0.0, 2.0), untuned=1.0)
INT8_MASK = _global("int8_mask", False)
RAM_EPSILON = _global("epsilon", 1e-5, limits=(0.0, None))


@dataclass(frozen=True)
class TaskVectorFamily:
    """How one task-vector method sparsifies and combines (mergekit's registry entry)."""

    consensus: bool
    sparsification: str | None
    default_normalize: bool
    default_rescale: bool


@dataclass(frozen=True)
class MethodSpec:
    """One method: parameters, input contract, random draws, and its planner module."""

    name: str
    params: tuple[Param, ...]
    planner: str  # module under merges.methods with ``plan(context) -> Plan``
    base: str = IGNORED  # REQUIRED_BASE, OPTIONAL_BASE (used when the recipe has one) or IGNORED
    min_sources: int = 1  # non-base sources
    max_sources: int | None = None
    uses_layer_slices: bool = False
    random: bool = False  # draws random masks (seeded per tensor; mergekit reproduces in distribution)
    random_exact: bool = False  # its draws are mergekit's under ``mergekit-yaml --random-seed``
    family: TaskVectorFamily | None = None  # the task-vector family's variant
    # mergekit's kernel promotes float16 / bfloat16 inputs to a float32 result and writes that
    # (arcee_fusion's float mask, ramplus_tl's float32 scale): the engine's result dtype then
    float32_result: bool = False

    @property
    def needs_base(self) -> bool:
        return self.base == REQUIRED_BASE

    @property
    def takes_base(self) -> bool:
        """The base, when given, is an input of its own (mergekit lists it in every slice)."""
        return self.base != IGNORED

    @property
    def tensor_params(self) -> dict[str, float | None]:
        """Per-source parameters -> default (``REQUIRED``: none)."""
        return {p.name: p.default for p in self.params if p.per_source}  # type: ignore[misc]

    @property
    def global_params(self) -> dict[str, Scalar | None]:
        """Shared parameters -> default (``REQUIRED``: none)."""
        return {p.name: p.default for p in self.params if not p.per_source}

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def tensor_default(self, name: str) -> float | None:
        return self.tensor_params[name]

    def global_default(self, name: str) -> Scalar | None:
        return self.global_params[name]


def _task_vector(name: str, family: TaskVectorFamily) -> MethodSpec:
    # task_arithmetic takes a density (mergekit lists it) but drops nothing: not a gene
    params = [WEIGHT, DENSITY if family.sparsification else _source("density", 1.0, limits=UNIT)]
    if family.sparsification == "magnitude_outliers":
        params.append(_source("gamma", 0.01))
    if family.sparsification == "della_magprune":
        params.append(_source("epsilon", 0.15))
    params += [INT8_MASK, _global("normalize", family.default_normalize),
               _global("rescale", family.default_rescale), LAMBDA]
    return MethodSpec(name, tuple(params), "task_arithmetic", base=REQUIRED_BASE,
                      random=family.sparsification in ("random", "della_magprune"), family=family)


def _methods(*specs: MethodSpec) -> dict[str, MethodSpec]:
    return {spec.name: spec for spec in specs}


METHODS: dict[str, MethodSpec] = _methods(
    MethodSpec("linear", (WEIGHT, _global("normalize", True)), "linear"),
    _task_vector("task_arithmetic", TaskVectorFamily(False, None, False, False)),
    _task_vector("ties", TaskVectorFamily(True, "magnitude", True, False)),
    _task_vector("dare_ties", TaskVectorFamily(True, "random", False, True)),
    _task_vector("dare_linear", TaskVectorFamily(False, "random", False, True)),
    _task_vector("breadcrumbs", TaskVectorFamily(False, "magnitude_outliers", False, False)),
    _task_vector("breadcrumbs_ties", TaskVectorFamily(True, "magnitude_outliers", False, False)),
    _task_vector("della", TaskVectorFamily(True, "della_magprune", True, True)),
    _task_vector("della_linear", TaskVectorFamily(False, "della_magprune", False, True)),
    MethodSpec("slerp", (T,), "slerp", base=REQUIRED_BASE, max_sources=1),
    MethodSpec("model_stock", (_global("filter_wise", False),), "model_stock", base=REQUIRED_BASE,
               min_sources=2),
    MethodSpec("passthrough", (_source("scale", 1.0),), "passthrough", uses_layer_slices=True),
    MethodSpec("nearswap", (_global("t", limits=(0.0, None), search=(0.0, 0.01), untuned=0.001),),
               "nearswap", base=REQUIRED_BASE, max_sources=1),
    MethodSpec("nuslerp", (WEIGHT, _global("nuslerp_row_wise", False),
                           _global("nuslerp_flatten", True)),
               "nuslerp", base=OPTIONAL_BASE, min_sources=2, max_sources=2),
    MethodSpec("multislerp", (WEIGHT, _global("normalize_weights", True), _global("eps", 1e-8)),
               "multislerp", base=OPTIONAL_BASE),
    MethodSpec("sce", (INT8_MASK, _global("select_topk", 1.0, limits=UNIT, search=UNIT,
                                          untuned=0.5)),
               "sce", base=REQUIRED_BASE),
    MethodSpec("karcher", (_global("max_iter", 10, kind=int, limits=(0.0, None)),
                           _global("tol", 1e-5, limits=(0.0, None))), "karcher"),
    MethodSpec("arcee_fusion", (), "arcee_fusion", base=REQUIRED_BASE, max_sources=1, random=True,
               random_exact=True, float32_result=True),
    MethodSpec("ram", (RAM_EPSILON,), "ram", base=REQUIRED_BASE),
    MethodSpec("ramplus_tl", (_global("r", 0.1, limits=(0.0, None), search=UNIT, untuned=0.1),
                              _global("alpha", 0.2, limits=(0.0, None), search=UNIT, untuned=0.2),
                              RAM_EPSILON), "ram", base=REQUIRED_BASE, float32_result=True),
)

FAMILY: dict[str, TaskVectorFamily] = {
    name: spec.family for name, spec in METHODS.items() if spec.family is not None
}


def non_base_sources(recipe: Recipe) -> tuple[int, ...]:
    """Indices of ``recipe.sources`` that are not the base (mergekit ignores a listed base)."""
    return _non_base(recipe.base, recipe.sources)


@lru_cache(maxsize=64)  # resolving paths costs file system calls; recipes repeat them
def _non_base(base: str | None, sources: tuple[str, ...]) -> tuple[int, ...]:
    if base is None:
        return tuple(range(len(sources)))
    resolved = Path(base).resolve()
    return tuple(i for i, s in enumerate(sources) if Path(s).resolve() != resolved)


def validate_recipe(recipe: Recipe) -> None:
    """Raise ``RecipeError`` naming the method or parameter if ``recipe`` cannot be merged."""
    spec = METHODS.get(recipe.method)
    if spec is None:
        raise RecipeError(f"unknown merge method {recipe.method!r}; known methods: "
                          f"{', '.join(sorted(METHODS))}")
    for name in recipe.tensor_params:
        if name not in spec.tensor_params:
            known = ", ".join(spec.tensor_params) or "none"
            raise RecipeError(f"method {spec.name!r} has no per-source parameter {name!r} "
                              f"(it takes: {known})")
    for name in recipe.global_params:
        if name not in spec.global_params:
            known = ", ".join(spec.global_params) or "none"
            raise RecipeError(f"method {spec.name!r} has no global parameter {name!r} "
                              f"(it takes: {known})")
    for name, default in spec.tensor_params.items():
        if default is REQUIRED and name not in recipe.tensor_params:
            raise RecipeError(f"method {spec.name!r} needs per-source parameter {name!r}")
    for name, default in spec.global_params.items():
        if default is REQUIRED and name not in recipe.global_params:
            raise RecipeError(f"method {spec.name!r} needs global parameter {name!r}")
    for param in spec.params:
        table = recipe.global_params.get(param.name) if param.kind is int else None
        bad = [v for row in table or () for v in row if isinstance(v, bool) or v != int(v)]
        if bad:
            raise RecipeError(f"method {spec.name!r}: {param.name} must be an integer, got {bad[0]!r}")
    if spec.needs_base and recipe.base is None:
        raise RecipeError(f"method {spec.name!r} needs a base model")
    if recipe.layer_slices and not spec.uses_layer_slices:
        raise RecipeError(f"method {spec.name!r} does not take layer slices (passthrough does)")
    if spec.uses_layer_slices:
        n_out = sum(s.end - s.start for s in recipe.layer_slices)
        if recipe.layer_slices and n_out != recipe.n_layers:
            raise RecipeError(f"passthrough: layer slices stack {n_out} layers but the recipe's "
                              f"groups cover {recipe.n_layers}")
        if not recipe.layer_slices and len(recipe.sources) != 1:
            raise RecipeError("passthrough without layer slices takes exactly one source, "
                              f"got {len(recipe.sources)}")
        return
    # a method that ignores the base (linear, karcher) takes a listed base as one more model
    count = len(non_base_sources(recipe) if spec.takes_base else recipe.sources)
    if count < spec.min_sources or (spec.max_sources is not None and count > spec.max_sources):
        wanted = (f"exactly {spec.min_sources}" if spec.max_sources == spec.min_sources
                  else f"at least {spec.min_sources}")
        raise RecipeError(f"method {spec.name!r} needs {wanted} source(s) besides the base, "
                          f"got {count}")
