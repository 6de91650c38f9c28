"""Search quality (issue 15's target): the chosen recipe's score on rows no choice looked at.

For each seed, ``search start`` runs the study (default: the demo, ``studies/logistics/study.toml``)
three times, each in its own output folder under a temp dir:

* ``default_b``  — the study's own sampler with budget B (``--trials B``; default: the study's ``trials``),
* ``default_2b`` — the same sampler with budget 2B,
* ``random_b``   — random search (``--sampler random``) with budget B,

with ``--seed`` set to the seed (0, 1, ...). Each run ends with finalize, which chooses the
final recipe (search scores, then held-out) and only then scores it on the test split
(``search.test_split``). The figure is that test score: the objective in its own units
(``per_task`` studies: the mean of the direction-signed task scores). A study without a test
split is refused (its held-out score is what chose the recipe).

The last line is one JSON object::

    {"default_b": [...], "default_2b": [...], "random_b": [...], "heldout_default_b": [...], ...,
     "study": "...", "trials_b": 48, "seeds": 5}

    python benchmarks/search_quality.py [--study PATH] [--seeds 5] [--trials B] [--keep DIR]

Every run is a separate ``python -m search.cli start`` process (nothing shared between runs).
Issue 15's target: default beats random at equal budget in >= 4 of 5 seeds, and 2B's mean
test score is >= 0.02 above B's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO_STUDY = ROOT / "studies" / "logistics" / "study.toml"
ARMS = ("default_b", "default_2b", "random_b")


def arm_arguments(arm: str, budget: int) -> list[str]:
    """The ``search start`` overrides of one arm."""
    if arm == "default_b":
        return ["--trials", str(budget)]
    if arm == "default_2b":
        return ["--trials", str(2 * budget)]
    return ["--trials", str(budget), "--sampler", "random"]


def final_scores(study_file: Path, out: Path) -> tuple[float, float]:
    """The final trial's (test, held-out) objective, read from the finished study."""
    import optuna

    from fitness.objective import objective_values
    from search import ranking
    from search.config import load_study
    from search.records import heldout_record
    from search.test_split import read_test_record, read_test_state

    config = load_study(study_file, out=out)
    study = optuna.load_study(study_name=config.name, storage=config.storage)
    attrs = study.user_attrs
    final = attrs.get(ranking.FINAL_TRIAL_ATTR)
    state = read_test_state(attrs)
    test = None if not isinstance(final, int) else read_test_record(attrs, final)
    held = None if not isinstance(final, int) else heldout_record(attrs, final)
    if test is None or held is None or state is None or state.get("trial") != final:
        raise SystemExit(f"{out}: no final trial scored on the test split (final trial: {final}, "
                         f"test state: {state})")

    def objective(scores: dict[str, float]) -> float:
        values = objective_values(scores, config.tasks, config.objective)
        if len(values) == 1:
            return float(values[0])
        signed = [v if d == "maximize" else -v
                  for v, d in zip(values, [d.name.lower() for d in study.directions], strict=True)]
        return sum(signed) / len(signed)

    return objective(test.scores), objective(held.scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, default=DEMO_STUDY)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--trials", type=int, default=None, help="budget B (default: the study's trials)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the studies in this folder (default: a temp dir)")
    args = parser.parse_args()

    from search.config import load_study
    from search.test_split import has_test_split

    config = load_study(args.study)
    if not has_test_split(config.tasks):
        raise SystemExit(f"{args.study}: no test split (set `test` on every task); the held-out score chose the recipe")
    budget = args.trials or config.trials
    work = args.keep or Path(tempfile.mkdtemp(prefix="search-quality-"))
    results: dict[str, list[float]] = {arm: [] for arm in ARMS}
    heldout: dict[str, list[float]] = {arm: [] for arm in ARMS}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    for seed in range(args.seeds):
        for arm in ARMS:
            out = work / arm / f"seed-{seed}"
            command = [sys.executable, "-m", "search.cli", "start", str(args.study), "--out", str(out),
                       "--seed", str(seed), "--quiet", *arm_arguments(arm, budget)]
            started = time.perf_counter()
            subprocess.run(command, check=True, env=env)
            test, held = final_scores(args.study, out)
            results[arm].append(round(test, 6))
            heldout[arm].append(round(held, 6))
            print(f"seed {seed} {arm}: test {test:.4f}, held-out {held:.4f} "
                  f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    wins = sum(d > r for d, r in zip(results["default_b"], results["random_b"], strict=True))
    summary = {
        **results,
        **{f"heldout_{arm}": values for arm, values in heldout.items()},
        "default_beats_random": wins,
        "mean_2b_minus_b": round(sum(results["default_2b"]) / args.seeds - sum(results["default_b"]) / args.seeds, 6),
        "study": str(args.study), "trials_b": budget, "seeds": args.seeds,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
