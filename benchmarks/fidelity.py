"""Multi-fidelity scoring against full fidelity: examples scored, wall time, final held-out objective.

For each seed, the study (default: the demo study, ``studies/logistics/study.toml``) is run
three ways with the real driver (``search.driver.run_study``: baselines, search, finalize),
each in its own temporary output folder:

1. **full**: every search trial scored on every search row (``study.fidelity`` removed);
2. **multi**: the same trial budget scored in stages (``--first-stage``, ``--growth``,
   ``--confidence``, ``--rule``, ``--promote``; by default the study's own ``study.fidelity``,
   else :data:`RECOMMENDED`);
3. **multi at equal wall time**: the multi study continued (the driver resumes it with a larger
   budget and finalizes again; its first trials are exactly run 2's) one whole CMA-ES generation
   at a time, on one worker pool, while the full run's search-loop wall time is more than half
   a generation's (the last one's loop time) away: its loop time ends as near the full run's
   as whole generations allow; ``loop_s_equal_wall`` is the loop time it took
   (``equal_wall_ratio``: that over the full run's). Projecting the budget from run 2's time
   per trial instead gave 77-105% of the full run's time: later trials are stopped sooner.

Examples scored: the search rows held by the search trials (a stopped trial holds the rows it
was scored on); the baselines and the finalists' held-out re-scoring are the same in both
runs and not counted. ``example_ratio`` = examples_full / examples_multi and ``wall_ratio`` =
full / multi search-loop wall time, both means over seeds (how many times fewer / faster).
``heldout_min_*``: the final trial's held-out objective (the study's objective: for the demo,
the weakest task), per seed (null when no finalist passed the gates).

The last line is one JSON object::

    python benchmarks/fidelity.py [--study STUDY] [--seeds 5] [--first-seed 0] [--trials N]
        [--first-stage 60] [--growth 3] [--confidence 0.95] [--rule test|rank] [--promote SHARE]
    python benchmarks/fidelity.py --combine OUT...

``--combine`` runs nothing: it reads the last line of each earlier run's output (one schedule,
no seed twice) and prints one line over all their seeds: the example ratio of the summed
examples, the held-out mean difference with its standard error over seeds, and the seeds better
(and equal) at equal wall time.

``benchmarks/fidelity_replay.py`` screens schedules first, cheaply, over stored full runs.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import optuna

from fitness.fidelity import RULE_RANK, RULES, FidelityConfig
from fitness.objective import objective_values
from search import ranking, storage
from search.config import StudyConfig, load_study
from search.driver import RunResult, run_study
from search.plan import plan_study, worker_setup
from search.pool import make_pool
from search.positions import popsize
from search.staged import FIDELITY_ATTR

ROOT = Path(__file__).resolve().parents[1]
DEMO_STUDY = ROOT / "studies" / "logistics" / "study.toml"
RECOMMENDED = FidelityConfig(first_stage=10, growth=2.0, confidence=0.8)
"""The schedule the README recommends for the demo (rule test; "Multi-fidelity scoring, measured")."""


def examples_scored(study: optuna.Study) -> int:
    """Search rows held by the study's search trials (every row, or a stopped trial's prefix)."""
    total = 0
    rows_per_task = study.user_attrs["example_rows"]["search"]
    full = sum(int(task["n"]) for task in rows_per_task.values())
    for trial in study.get_trials(deepcopy=False):
        if not ranking.counts_toward_budget(trial) or trial.state.name == "FAIL":
            continue
        record = trial.user_attrs.get(FIDELITY_ATTR)
        total += sum(record["rows"].values()) if isinstance(record, dict) else full
    return total


def heldout_objective(study: optuna.Study, config: StudyConfig) -> float | None:
    """The final trial's held-out objective (first objective), None when there is no final trial."""
    final = ranking.final_number(study.user_attrs)
    record = None if final is None else storage.heldout_record(study.user_attrs, final)
    if record is None:
        return None
    return objective_values(record.scores, config.tasks, config.objective)[0]


def another_generation(target_s: float, loop_s: float, generation_s: float) -> bool:
    """Whether one more generation (``generation_s`` long) ends nearer ``target_s`` than stopping at ``loop_s``."""
    return target_s - loop_s > generation_s / 2


def continue_to_equal_wall(config: StudyConfig, trials: int, loop_s: float, target_s: float,
                           per_generation: int) -> tuple[optuna.Study, int, float]:
    """Continue the finished ``trials``-trial study a generation at a time to ``target_s`` of loop time.

    A generation more is run while the time left exceeds half the last generation's (the first
    estimate: ``loop_s`` per generation of the first run), then the study is finalized. One pool
    serves every call (the sources stay loaded); only the search loops' time counts. Returns the
    study, its budget and its total loop time.
    """
    pool = make_pool(worker_setup(config), config.execution)
    try:
        budget, generation_s = trials, loop_s * per_generation / trials
        while another_generation(target_s, loop_s, generation_s):
            budget += per_generation
            generation_s = run_to(config, budget, pool=pool, finalize_after=False).timings.wall_s
            loop_s += generation_s
        if budget > trials:
            run_to(config, budget, pool=pool)  # finalize at the new budget
    finally:
        pool.close()
    return storage.load_existing_study(config.name, config.storage), budget, loop_s


def run_to(config: StudyConfig, trials: int, **driver: object) -> RunResult:
    """``run_study`` to ``trials`` (``driver``: its keyword arguments); SystemExit when it stops short."""
    result = run_study(replace(config, trials=trials), quiet=True, **driver)  # type: ignore[arg-type]
    if result.done != trials:
        raise SystemExit(f"{config.output}: stopped at {result.done} of {trials} trials")
    return result


def combine(summaries: Sequence[tuple[str, Mapping[str, object]]]) -> dict[str, object]:
    """One summary over several runs' summaries (``(name, summary)``; see the module)."""
    if not summaries:
        raise SystemExit("--combine: no run given")
    schedule = summaries[0][1].get("fidelity")
    seeds: list[int] = []
    full: list[float] = []
    multi: list[float] = []
    equal: list[float] = []
    examples_full = examples_multi = 0.0
    known = True
    for name, summary in summaries:
        if summary.get("fidelity") != schedule:
            raise SystemExit(f"{name}: schedule {summary.get('fidelity')} differs from {summaries[0][0]}'s {schedule}")
        if "heldout_min_multi_equal_wall" not in summary:
            raise SystemExit(f"{name}: run with --no-equal-wall (no equal-wall figures to combine)")
        if "seed_list" not in summary:
            known = False  # a run from before runs printed their seeds
        own = [int(s) for s in summary.get("seed_list", [])]  # type: ignore[attr-defined]
        twice = sorted(set(own) & set(seeds))
        if twice:
            raise SystemExit(f"{name}: seed {twice[0]} is in an earlier run too")
        seeds += own
        count = int(summary["seeds"])  # type: ignore[call-overload]
        examples_full += float(summary["examples_full"]) * count  # type: ignore[arg-type]
        examples_multi += float(summary["examples_multi"]) * count  # type: ignore[arg-type]
        full += list(summary["heldout_min_full"])  # type: ignore[call-overload]
        multi += list(summary["heldout_min_multi"])  # type: ignore[call-overload]
        equal += list(summary["heldout_min_multi_equal_wall"])  # type: ignore[call-overload]
    if any(v is None for v in [*full, *multi, *equal]):
        raise SystemExit("--combine: a run has a seed without a final trial (held-out null)")
    differences = [m - f for m, f in zip(multi, full, strict=True)]
    n = len(differences)
    return {
        "seeds": n, **({"seed_list": seeds} if known else {}), "fidelity": schedule,
        "example_ratio": round(examples_full / examples_multi, 3),
        "heldout_mean_full": round(statistics.fmean(full), 4), "heldout_mean_multi": round(statistics.fmean(multi), 4),
        "heldout_mean_difference": round(statistics.fmean(differences), 4),
        "heldout_difference_se": round(statistics.stdev(differences) / math.sqrt(n), 4) if n > 1 else None,
        "heldout_mean_multi_equal_wall": round(statistics.fmean(equal), 4),
        "better_at_equal_wall": sum(e > f for e, f in zip(equal, full, strict=True)),
        "equal_at_equal_wall": sum(e == f for e, f in zip(equal, full, strict=True)),
    }


def last_line(path: Path) -> dict[str, object]:
    """The summary a run printed last (its output file)."""
    lines = path.read_text(encoding="utf-8").strip().splitlines()
    try:
        return dict(json.loads(lines[-1]))
    except (IndexError, ValueError) as error:
        raise SystemExit(f"{path}: its last line is not a run's JSON summary ({error})") from None


def run(config: StudyConfig, trials: int) -> tuple[optuna.Study, float, float]:
    """Run (or continue) the study to ``trials``; the study, its search-loop wall and whole wall."""
    start = time.perf_counter()
    result = run_to(config, trials)
    wall = time.perf_counter() - start
    return storage.load_existing_study(config.name, config.storage), result.timings.wall_s, wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, default=DEMO_STUDY)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--trials", type=int, default=None, help="trial budget (default: the study's)")
    parser.add_argument("--first-stage", type=int, default=None)
    parser.add_argument("--growth", type=float, default=None)
    parser.add_argument("--confidence", type=float, default=None)
    parser.add_argument("--rule", choices=RULES, default=None)
    parser.add_argument("--promote", type=float, default=None, help="rule rank: the share promoted (1/growth)")
    parser.add_argument("--no-equal-wall", action="store_true", help="skip run 3 (multi at equal wall time)")
    parser.add_argument("--combine", type=Path, nargs="+", default=None,
                        help="run nothing: one summary over these earlier runs' outputs")
    args = parser.parse_args(argv)
    if args.combine:
        print(json.dumps(combine([(str(path), last_line(path)) for path in args.combine])))
        return 0
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base = load_study(args.study)
    own = base.fidelity or RECOMMENDED
    rule = args.rule or own.rule
    fidelity = FidelityConfig(first_stage=args.first_stage or own.first_stage, growth=args.growth or own.growth,
                              confidence=args.confidence or own.confidence, rule=rule,
                              promote=args.promote or (own.promote if rule == own.rule else None))
    trials = args.trials if args.trials is not None else base.trials
    per_generation = popsize(plan_study(base)) if base.sampler == "cmaes" else 1
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="fidelity-bench-") as tmp:
        for seed in seeds:
            def variant(name: str, fid: FidelityConfig | None, seed: int = seed) -> StudyConfig:
                output = Path(tmp) / f"{name}-{seed}"
                return replace(base, seed=seed, output=output, storage=f"sqlite:///{output / 'study.db'}",
                               fidelity=fid)

            full, full_loop, full_wall = run(variant("full", None), trials)
            multi_config = variant("multi", fidelity)
            multi, multi_loop, multi_wall = run(multi_config, trials)
            row: dict[str, object] = {
                "seed": seed, "trials": trials,
                "examples_full": examples_scored(full), "examples_multi": examples_scored(multi),
                "loop_s_full": round(full_loop, 2), "loop_s_multi": round(multi_loop, 2),
                "wall_s_full": round(full_wall, 2), "wall_s_multi": round(multi_wall, 2),
                "stopped": sum(t.state.name == "PRUNED" for t in multi.get_trials(deepcopy=False)),
                "heldout_full": heldout_objective(full, base), "heldout_multi": heldout_objective(multi, base),
            }
            if not args.no_equal_wall:
                equal, budget, equal_loop = continue_to_equal_wall(multi_config, trials, multi_loop, full_loop,
                                                                   per_generation)
                row.update(trials_equal_wall=budget, loop_s_equal_wall=round(equal_loop, 2),
                           heldout_multi_equal_wall=heldout_objective(equal, base))
                row["equal_wall_ratio"] = round(float(row["loop_s_equal_wall"]) / full_loop, 3)  # type: ignore[arg-type]
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)

    def mean(key: str) -> float:
        return sum(float(r[key]) for r in rows) / len(rows)  # type: ignore[arg-type]

    summary: dict[str, object] = {
        "examples_full": mean("examples_full"),
        "examples_multi": mean("examples_multi"),
        "example_ratio": round(mean("examples_full") / mean("examples_multi"), 3),
        "wall_ratio": round(mean("loop_s_full") / mean("loop_s_multi"), 3),
        "heldout_min_full": [r["heldout_full"] for r in rows],
        "heldout_min_multi": [r["heldout_multi"] for r in rows],
        "seeds": len(rows),
        "seed_list": seeds,
    }
    if not args.no_equal_wall:
        summary["heldout_min_multi_equal_wall"] = [r["heldout_multi_equal_wall"] for r in rows]
        summary["trials_equal_wall"] = [r["trials_equal_wall"] for r in rows]
        summary["equal_wall_ratio"] = [r["equal_wall_ratio"] for r in rows]
    summary["fidelity"] = {"first_stage": fidelity.first_stage, "growth": fidelity.growth,
                           "confidence": fidelity.confidence, "rule": fidelity.rule,
                           "promote": float(fidelity.promoted_share) if fidelity.rule == RULE_RANK else None}
    full_scores = [r["heldout_full"] for r in rows]
    multi_scores = [r["heldout_multi"] for r in rows]
    if all(isinstance(v, float) and math.isfinite(v) for v in [*full_scores, *multi_scores]):
        summary["heldout_mean_difference"] = round(
            sum(multi_scores) / len(rows) - sum(full_scores) / len(rows), 4)  # type: ignore[arg-type]
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
