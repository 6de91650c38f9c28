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
from merges.recipe import Recipe

SOURCE_PREFIX = "source:"
UNIFORM = "uniform_linear"

# Untuned settings for the study's method when a gene would otherwise vary them: the
# values a user would try first (mergekit's examples: density 0.5, lambda 1, t 0.5).
_UNTUNED_DENSITY = 0.5
_UNTUNED_LAMBDA = 1.0
_UNTUNED_T = 0.5


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
    if spec.method not in ("linear", "passthrough"):
        out.append(Baseline(f"default_{spec.method}", default_recipe(spec, base, sources, n_layers, seed)))
    return out


def default_recipe(
    spec: GenomeSpec, base: str, sources: Sequence[str], n_layers: int, seed: int
) -> Recipe:
    """The study's method with equal weights and untuned parameters (method defaults otherwise)."""
    n = len(sources)
    tensor_params: dict[str, list[float]] = {"weight": [1.0 / n] * n}
    global_params: dict[str, float | bool] = {}
    if spec.density is not None:
        tensor_params["density"] = [_UNTUNED_DENSITY] * n
    if spec.lambda_ is not None:
        global_params["lambda"] = _UNTUNED_LAMBDA
    if spec.t is not None or spec.method == "slerp":
        global_params["t"] = _UNTUNED_T
        tensor_params.pop("weight")
    return Recipe.uniform(
        spec.method, base, sources, n_layers, tensor_params=tensor_params,
        global_params=global_params, seed=seed,
    )
