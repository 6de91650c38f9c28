"""Which merge methods exist and which parameters each takes, with mergekit 0.1.5's defaults.

Read from mergekit's own registry (``merge_methods/registry.py`` and the methods' specs):
``weight`` has no default (required) for linear and the task-vector family; ``ties`` and
``della`` normalise by default, ``dare_*`` and ``della*`` rescale by default, ``slerp``
requires ``t``. ``FAMILY`` says how each task-vector method sparsifies and combines.
No torch here: writing a mergekit config (``search export``, the dashboard) reads this registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from merges.errors import RecipeError
from merges.recipe import Recipe

REQUIRED = None  # a parameter default that means "the recipe must give it"


@dataclass(frozen=True)
class TaskVectorFamily:
    """How one task-vector method sparsifies and combines (mergekit's registry entry)."""

    consensus: bool
    sparsification: str | None
    default_normalize: bool
    default_rescale: bool


FAMILY: dict[str, TaskVectorFamily] = {
    "task_arithmetic": TaskVectorFamily(False, None, False, False),
    "ties": TaskVectorFamily(True, "magnitude", True, False),
    "dare_ties": TaskVectorFamily(True, "random", False, True),
    "dare_linear": TaskVectorFamily(False, "random", False, True),
    "breadcrumbs": TaskVectorFamily(False, "magnitude_outliers", False, False),
    "breadcrumbs_ties": TaskVectorFamily(True, "magnitude_outliers", False, False),
    "della": TaskVectorFamily(True, "della_magprune", True, True),
    "della_linear": TaskVectorFamily(False, "della_magprune", False, True),
}


@dataclass(frozen=True)
class MethodSpec:
    """Parameters of one method. ``None`` as a default marks a required parameter."""

    name: str
    tensor_params: dict[str, float | None] = field(default_factory=dict)  # one value per source
    global_params: dict[str, float | bool | None] = field(default_factory=dict)
    needs_base: bool = False
    min_sources: int = 1  # non-base sources
    max_sources: int | None = None
    uses_layer_slices: bool = False

    def tensor_default(self, name: str) -> float | None:
        return self.tensor_params[name]

    def global_default(self, name: str) -> float | bool | None:
        return self.global_params[name]


def _task_vector_spec(name: str) -> MethodSpec:
    family = FAMILY[name]
    tensor: dict[str, float | None] = {"weight": REQUIRED, "density": 1.0}
    if family.sparsification == "magnitude_outliers":
        tensor["gamma"] = 0.01
    if family.sparsification == "della_magprune":
        tensor["epsilon"] = 0.15
    return MethodSpec(
        name,
        tensor_params=tensor,
        global_params={"int8_mask": False, "normalize": family.default_normalize,
                       "rescale": family.default_rescale, "lambda": 1.0},
        needs_base=True,
    )


METHODS: dict[str, MethodSpec] = {
    "linear": MethodSpec("linear", {"weight": REQUIRED}, {"normalize": True}),
    **{name: _task_vector_spec(name) for name in FAMILY},
    "slerp": MethodSpec("slerp", {}, {"t": REQUIRED}, needs_base=True, min_sources=1,
                        max_sources=1),
    "model_stock": MethodSpec("model_stock", {}, {"filter_wise": False}, needs_base=True,
                              min_sources=2),
    "passthrough": MethodSpec("passthrough", {"scale": 1.0}, {}, max_sources=None,
                              uses_layer_slices=True),
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
    count = len(non_base_sources(recipe))
    if count < spec.min_sources or (spec.max_sources is not None and count > spec.max_sources):
        wanted = (f"exactly {spec.min_sources}" if spec.max_sources == spec.min_sources
                  else f"at least {spec.min_sources}")
        raise RecipeError(f"method {spec.name!r} needs {wanted} source(s) besides the base, "
                          f"got {count}")
