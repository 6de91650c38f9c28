"""Baseline recipes every study scores first: each source alone, the uniform average, and
the study's method with untuned defaults.

The source-alone scores are the references of ``max_regression`` gates; all baselines
appear next to the search trials in status, report and dashboard. A source alone is a
linear merge with weight 1 on that source and 0 elsewhere (with ``normalize`` the
divisor is 1, so the result is the source's tensors exactly).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from genome.spec import GenomeSpec
from merges.methods.registry import EQUAL, METHODS, REQUIRED
from merges.recipe import Recipe

SOURCE_PREFIX = "source:"
UNIFORM = "uniform_linear"


@dataclass(frozen=True)
class Baseline:
    name: str
    recipe: Recipe


def source_baseline_name(label: str) -> str:
    return f"{SOURCE_PREFIX}{label}"


def baseline_recipes(
    spec: GenomeSpec,
    *,
    base: str,
    sources: Sequence[str],
    labels: Sequence[str],
    n_layers: int,
    seed: int,
) -> list[Baseline]:
    """The baselines of a study, in the order they are stored."""
    n = len(sources)
    out = [
        Baseline(
            source_baseline_name(label),
            Recipe.uniform(
                "linear", base, sources, n_layers,
                tensor_params={"weight": [1.0 if j == i else 0.0 for j in range(n)]},
                global_params={"normalize": True}, seed=seed,
            ),
        )
        for i, label in enumerate(labels)
    ]
    out.append(
        Baseline(
            UNIFORM,
            Recipe.uniform(
                "linear", base, sources, n_layers,
                tensor_params={"weight": [1.0 / n] * n}, global_params={"normalize": True},
                seed=seed,
            ),
        )
    )
    if spec.method != "linear" and not METHODS[spec.method].uses_layer_slices:  # linear: = uniform
        out.append(Baseline(f"default_{spec.method}", default_recipe(spec, base, sources, n_layers, seed)))
    return out


def default_recipe(
    spec: GenomeSpec, base: str, sources: Sequence[str], n_layers: int, seed: int
) -> Recipe:
    """The study's method untuned: each parameter the genome searches, and each one mergekit
    requires, at the catalogue's untuned value (equal weights; density .5, lambda 1, t .5: what
    mergekit's examples try first); every other parameter at the method's default."""
    n = len(sources)
    searched = spec.bounds()
    tensor_params: dict[str, list[float]] = {}
    global_params: dict[str, float | bool] = {}
    for param in METHODS[spec.method].params:
        if param.name not in searched and param.default is not REQUIRED:
            continue
        value = param.untuned
        if value is None:
            raise ValueError(f"catalogue: {spec.method}.{param.name} has no untuned value")
        if param.per_source:
            tensor_params[param.name] = [1.0 / n] * n if value == EQUAL else [float(value)] * n
        else:
            global_params[param.name] = value if isinstance(value, bool) else float(value)
    return Recipe.uniform(
        spec.method, base, sources, n_layers, tensor_params=tensor_params,
        global_params=global_params, seed=seed,
    )
