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

Each finished run prints its figure at once (stderr) and, with ``--runs FILE``, appends one JSON
line ``{"seed", "arm", "sampler", "test", "heldout", "trials_b", "trials", "wall_s", "study"}`` to
FILE, so a partial run is never lost and several invocations (other seeds, other arms, a candidate
default) combine: ``--combine FILE...`` runs nothing and prints the summary of those lines (for the
same seed, arm and sampler the later line wins; one arm's runs must share a sampler).
The last line is one JSON object, per arm in seed order::

    {"seeds_run": [...], "default_b": [...], "default_2b": [...], "random_b": [...],
     "heldout_default_b": [...], ..., "sampler_default_b": ["cmaes"], ...,
     "default_beats_random": "4/5", "mean_2b_minus_b": 0.02, "mean_default_b": ..., "seeds": 5}

    python benchmarks/search_quality.py [--study PATH] [--seeds 5 | --seed-list 1,2,3,4]
        [--arms default_b,default_2b,random_b] [--default-sampler gp] [--trials B]
        [--runs runs.jsonl] [--keep DIR]
    python benchmarks/search_quality.py --combine runs.jsonl more.jsonl

``--default-sampler NAME`` runs the default arms with that sampler (a candidate default) instead
of the study's own. Every run is a separate ``python -m search.cli start`` process (nothing
shared between runs). Issue 15's target: default beats random at equal budget in >= 4 of 5
seeds, and 2B's mean test score is >= 0.02 above B's.
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


def arm_arguments(arm: str, budget: int, sampler: str) -> list[str]:
    """The ``search start`` overrides of one arm (``sampler``: the default arms' sampler)."""
    trials = 2 * budget if arm == "default_2b" else budget
    return ["--trials", str(trials), "--sampler", "random" if arm == "random_b" else sampler]


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


def read_runs(paths: list[Path]) -> list[dict]:
    """Per-run records from JSON-lines files (later lines win for the same seed, arm and sampler)."""
    runs: dict[tuple[int, str, str], dict] = {}
    for path in paths:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                run = json.loads(line)
                runs[(int(run["seed"]), str(run["arm"]), str(run["sampler"]))] = run
            except (ValueError, KeyError, TypeError) as error:
                raise SystemExit(f"{path}:{number}: not a run record ({error})") from None
    return [runs[key] for key in sorted(runs)]


def summarise(runs: list[dict]) -> dict:
    """The one-line summary: per arm, the test (and held-out) objectives in seed order."""
    seeds = sorted({run["seed"] for run in runs})
    for arm in ARMS:
        samplers = sorted({run["sampler"] for run in runs if run["arm"] == arm})
        if len(samplers) > 1:  # two candidates' runs in one summary would mix their figures
            raise SystemExit(f"arm {arm}: runs of several samplers ({', '.join(samplers)}); combine each apart")
    by = {(run["seed"], run["arm"]): run for run in runs}
    summary: dict = {"seeds_run": seeds}
    for arm in ARMS:
        summary[arm] = [by[(s, arm)]["test"] for s in seeds if (s, arm) in by]
        summary[f"seeds_{arm}"] = [s for s in seeds if (s, arm) in by]
    for arm in ARMS:
        summary[f"heldout_{arm}"] = [by[(s, arm)]["heldout"] for s in seeds if (s, arm) in by]
    for arm in ARMS:
        summary[f"sampler_{arm}"] = sorted({by[(s, arm)]["sampler"] for s in seeds if (s, arm) in by})
    paired = [s for s in seeds if (s, "default_b") in by and (s, "random_b") in by]
    summary["default_beats_random"] = f"{sum(by[(s, 'default_b')]['test'] > by[(s, 'random_b')]['test'] for s in paired)}/{len(paired)}"
    both = [s for s in seeds if (s, "default_b") in by and (s, "default_2b") in by]
    if both:
        gain = sum(by[(s, "default_2b")]["test"] - by[(s, "default_b")]["test"] for s in both) / len(both)
        summary["mean_2b_minus_b"] = round(gain, 6)
    for arm in ARMS:
        values = summary[arm]
        summary[f"mean_{arm}"] = round(sum(values) / len(values), 6) if values else None
    summary["trials_b"] = sorted({run["trials_b"] for run in runs})
    summary["study"] = sorted({run["study"] for run in runs})
    summary["seeds"] = len(seeds)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, default=DEMO_STUDY)
    parser.add_argument("--seeds", type=int, default=5, help="run seeds 0 .. N-1 (unless --seed-list)")
    parser.add_argument("--seed-list", default=None, help="comma-separated seeds to run, e.g. 1,2,3,4")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated arms to run (of {', '.join(ARMS)})")
    parser.add_argument("--default-sampler", default=None,
                        help="sampler of the default arms (a candidate default; default: the study's own)")
    parser.add_argument("--trials", type=int, default=None, help="budget B (default: the study's trials)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the studies in this folder (default: a temp dir)")
    parser.add_argument("--runs", type=Path, default=None,
                        help="append each finished run as one JSON line to this file (a partial run is never lost)")
    parser.add_argument("--combine", type=Path, nargs="+", default=None,
                        help="run nothing: print the summary of these --runs files (several invocations' runs)")
    args = parser.parse_args()

    if args.combine:
        print(json.dumps(summarise(read_runs(args.combine))))
        return

    from search.config import load_study
    from search.test_split import has_test_split

    arms = [arm.strip() for arm in args.arms.split(",") if arm.strip()]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"--arms: unknown {', '.join(unknown)} (known: {', '.join(ARMS)})")
    seeds = ([int(s) for s in args.seed_list.split(",") if s.strip()] if args.seed_list
             else list(range(args.seeds)))
    config = load_study(args.study, sampler=args.default_sampler)
    if not has_test_split(config.tasks):
        raise SystemExit(f"{args.study}: no test split (set `test` on every task); the held-out score chose the recipe")
    budget = args.trials or config.trials
    work = args.keep or Path(tempfile.mkdtemp(prefix="search-quality-"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    runs: list[dict] = []
    for seed in seeds:
        for arm in arms:
            sampler = "random" if arm == "random_b" else config.sampler
            out = work / f"{arm}-{sampler}" / f"seed-{seed}"
            command = [sys.executable, "-m", "search.cli", "start", str(args.study), "--out", str(out),
                       "--seed", str(seed), "--quiet", *arm_arguments(arm, budget, sampler)]
            started = time.perf_counter()
            subprocess.run(command, check=True, env=env)
            test, held = final_scores(args.study, out)
            wall = time.perf_counter() - started
            run = {"seed": seed, "arm": arm, "sampler": sampler, "test": round(test, 6), "heldout": round(held, 6),
                   "trials_b": budget, "trials": 2 * budget if arm == "default_2b" else budget,
                   "wall_s": round(wall, 1), "study": str(args.study)}
            runs.append(run)
            if args.runs is not None:
                with args.runs.open("a") as stream:
                    stream.write(json.dumps(run) + "\n")
            print(f"seed {seed} {arm} ({sampler}): test {test:.4f}, held-out {held:.4f} ({wall:.0f} s)",
                  file=sys.stderr, flush=True)
    print(json.dumps(summarise(runs)), flush=True)


if __name__ == "__main__":
    main()
