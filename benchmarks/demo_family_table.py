"""Held-out exact match of the demo family: models, default merges, and a coarse-grid best.

Usage::

    python benchmarks/demo_family_table.py [--root FAMILY_DIR] [--no-grid]

Verifies the demo family (the shipped one, or a build in ``--root``) against its
manifest, then scores on every task's held-out slice
(greedy exact match, teacher-forced, via :func:`fitness.scoring.score_slice`):

* the base and each specialist,
* ``uniform_linear``: linear, weight 1/3 each,
* ``task_arithmetic``: weight 1 each, lambda 1,
* ``ties``: density 0.5, weight 1/3 each (the untuned default),
* ``grid_best``: the best of a coarse grid chosen on the *search* slices (by the
  weakest task, then the sum), then scored on held-out: TIES with a weight per source
  (0.5 or 1), one density for all (0.3, 0.5, 0.8) and lambda (1, 1.5, 2): 72 recipes.

Prints one table (one column per task and the minimum) and ends with one JSON line::

    {"rows": {"base": {"shipping": ..., "min": ...}, ...}, "grid": {...}}
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fitness.scoring import score_slice  # noqa: E402
from fitness.slices import EncodedSlice, load_task  # noqa: E402
from fitness.spec import TaskSpec  # noqa: E402
from merges.checkpoint import open_checkpoint  # noqa: E402
from merges.engine import MergeEngine  # noqa: E402
from merges.recipe import Recipe  # noqa: E402
from studies.demo_family import TASKS, DemoFamily, shipped_family, verify_family  # noqa: E402

Scores = dict[str, float]  # task -> held-out exact match

# Coarse grid (TIES): a weight per source, one density for all sources, lambda.
GRID_WEIGHTS = (0.5, 1.0)
GRID_DENSITIES = (0.3, 0.5, 0.8)
GRID_LAMBDAS = (1.0, 1.5, 2.0)


@dataclass(frozen=True)
class Slices:
    search: dict[str, EncodedSlice]
    heldout: dict[str, EncodedSlice]


def family_root(root: Path | None) -> DemoFamily:
    """The build in ``--root``, else the shipped family; every file checked against its manifest."""
    return shipped_family() if root is None else verify_family(root)


def load_slices(family: DemoFamily) -> Slices:
    tokenizer = AutoTokenizer.from_pretrained(family.base)
    search, heldout = {}, {}
    for task in TASKS:
        spec = TaskSpec(task, family.data(task, "search"), family.data(task, "heldout"))
        data = load_task(spec, tokenizer)
        search[task], heldout[task] = data.search, data.heldout
    return Slices(search, heldout)


def score(model: PreTrainedModel, slices: dict[str, EncodedSlice]) -> Scores:
    return {task: score_slice(model, slices[task]) for task in TASKS}


def default_recipes(family: DemoFamily, n_layers: int) -> dict[str, Recipe]:
    base, sources = str(family.base), [str(family.sources[t]) for t in TASKS]
    n = len(sources)
    return {
        "uniform_linear": Recipe.uniform("linear", None, sources, n_layers, {"weight": [1 / n] * n}),
        "task_arithmetic": Recipe.uniform("task_arithmetic", base, sources, n_layers,
                                          {"weight": [1.0] * n}, {"lambda": 1.0}),
        "ties": Recipe.uniform("ties", base, sources, n_layers,
                               {"weight": [1 / n] * n, "density": [0.5] * n}),
    }


def grid_recipes(family: DemoFamily, n_layers: int) -> list[Recipe]:
    base, sources = str(family.base), [str(family.sources[t]) for t in TASKS]
    return [
        Recipe.uniform("ties", base, sources, n_layers,
                       {"weight": list(weights), "density": [density] * len(sources)}, {"lambda": lam})
        for weights in itertools.product(GRID_WEIGHTS, repeat=len(sources))
        for density, lam in itertools.product(GRID_DENSITIES, GRID_LAMBDAS)
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=None, help="a demo-family build (default: the shipped one)")
    parser.add_argument("--no-grid", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    family = family_root(args.root)
    slices = load_slices(family)
    rows: dict[str, Scores] = {}
    for name, folder in (("base", family.base), *family.sources.items()):
        rows[name] = score(AutoModelForCausalLM.from_pretrained(folder).eval(), slices.heldout)

    engine = MergeEngine(open_checkpoint(family.base), [open_checkpoint(family.sources[t]) for t in TASKS],
                         device="cpu", threads=args.threads)
    model = engine.new_model()
    n_layers = model.config.num_hidden_layers
    for name, recipe in default_recipes(family, n_layers).items():
        engine.merge_into(model, recipe)
        rows[name] = score(model, slices.heldout)

    grid: dict[str, object] = {}
    if not args.no_grid:
        started = time.perf_counter()
        candidates = grid_recipes(family, n_layers)
        best: tuple[float, float, Recipe] | None = None
        for recipe in candidates:
            engine.merge_into(model, recipe)
            found = score(model, slices.search)
            key = (min(found.values()), sum(found.values()))
            if best is None or key > best[:2]:
                best = (*key, recipe)
        assert best is not None
        engine.merge_into(model, best[2])
        rows["grid_best"] = score(model, slices.heldout)
        grid = {
            "candidates": len(candidates),
            "seconds": round(time.perf_counter() - started, 1),
            "search_min": best[0],
            "recipe": best[2].to_dict(),
        }

    print(f"{'model / recipe':<18}" + "".join(f"{t:>10}" for t in TASKS) + f"{'min':>8}")
    for name, scores in rows.items():
        scores["min"] = min(scores[t] for t in TASKS)
        print(f"{name:<18}" + "".join(f"{scores[t]:>10.3f}" for t in TASKS) + f"{scores['min']:>8.3f}")
    print(json.dumps({"rows": rows, "grid": grid}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
