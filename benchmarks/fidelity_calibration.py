"""How often a stage's stopping test stops a trial, by how far it truly is from the incumbent.

Over stored full-fidelity studies (``benchmarks/fidelity_replay.py --run-missing`` makes them),
every search trial A is put through a schedule's stages against each of the ``--incumbents``
best trials B, with the driver's paired test (``fitness.fidelity.decide``, rule test, no gates)
on A's rows so far and B's rows. The truth is the two trials' objective on every search row
(their stored values): A is "no worse" when it is at least B's. Per stage, printed and in the
JSON line:

* ``per_test``: of the no-worse pairs still running at the stage, the share its test stops:
  what ``confidence`` bounds (by ``1 - confidence``);
* ``stopped_by``: of the no-worse pairs, the share stopped at this stage or before, stages in
  order as the driver runs them (a stopped pair is not tested again): the wrong stops a trial
  meets over the whole schedule;
* ``power_by``: the same for pairs where A is worse by more than ``--worse`` (default 0.05):
  the cost the schedule saves.

    python benchmarks/fidelity_calibration.py --runs DIR [--seeds 0 1 2 3 4]
        [--candidate FIRST_STAGE,GROWTH,CONFIDENCE,test] [--incumbents 10] [--worse 0.05]

Single-objective studies (``mean``, ``min``). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository's benchmarks

from benchmarks.fidelity import RECOMMENDED  # noqa: E402
from benchmarks.fidelity_replay import (  # noqa: E402
    DEMO_STUDY,
    held_at_stages,
    load_full_run,
    name,
    parse_candidate,
    replay_stages,
)
from fitness.fidelity import RULE_TEST, FidelityConfig, decide  # noqa: E402
from search import ranking  # noqa: E402
from search.config import load_study  # noqa: E402
from search.records import trial_rows  # noqa: E402

TaskRows = Mapping[str, np.ndarray]
StopsAt = Callable[[TaskRows, TaskRows, int], bool]  # (A's rows so far, B's rows, seed) -> stopped


def stop_counts(rows: Mapping[int, TaskRows], values: Mapping[int, float], held_at: Sequence[Mapping[str, int]],
                incumbents: Sequence[int], stops: StopsAt, worse: float) -> dict[str, list[int]]:
    """Per stage, over the pairs (A, B in ``incumbents``, A != B): ``tested`` no-worse pairs still
    running (one stopped at an earlier stage is not tested again) and ``stopped`` those stopped there;
    ``worse_stop``: pairs worse by more than ``worse`` stopped there. ``pairs`` / ``worse``: how many
    pairs of each kind. ``held_at``: the rows per task a trial holds at each stage's end (the last,
    every row, excluded)."""
    stages = len(held_at)
    counts = {key: [0] * stages for key in ("tested", "stopped", "worse_stop")}
    counts["pairs"], counts["worse"] = [0], [0]
    for b in incumbents:
        for a, a_rows in rows.items():
            if a == b:
                continue
            gap = values[a] - values[b]
            if gap < -worse:
                kind = "worse"
            elif gap >= 0:
                kind = "pairs"
            else:
                continue
            counts[kind][0] += 1
            running = True
            for stage, held in enumerate(held_at):
                if not running:
                    break
                stopped = stops({task: v[:held[task]] for task, v in a_rows.items()}, rows[b], a)
                if kind == "pairs":
                    counts["tested"][stage] += 1
                    counts["stopped"][stage] += stopped
                elif stopped:
                    counts["worse_stop"][stage] += 1
                running = not stopped
    return counts


def rates(counts: Mapping[str, Sequence[int]]) -> dict[str, list[float]]:
    """``per_test``, ``stopped_by`` and ``power_by`` per stage (see the module)."""
    pairs, worse = max(counts["pairs"][0], 1), max(counts["worse"][0], 1)
    per_test = [s / t if t else 0.0 for s, t in zip(counts["stopped"], counts["tested"], strict=True)]
    return {
        "per_test": [round(v, 4) for v in per_test],
        "stopped_by": [round(float(v) / pairs, 4) for v in np.cumsum(counts["stopped"])],
        "power_by": [round(float(v) / worse, 4) for v in np.cumsum(counts["worse_stop"])],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, default=DEMO_STUDY)
    parser.add_argument("--runs", type=Path, required=True, help="folder of the full-fidelity runs (full-<seed>)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--candidate", type=parse_candidate, default=None,
                        help="FIRST_STAGE,GROWTH,CONFIDENCE,test (default: the recommended schedule)")
    parser.add_argument("--incumbents", type=int, default=10, help="the best trials each trial is compared with")
    parser.add_argument("--worse", type=float, default=0.05, help="power: pairs worse by more than this")
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    fidelity: FidelityConfig = args.candidate or RECOMMENDED
    if fidelity.rule != RULE_TEST:
        raise SystemExit(f"--candidate {name(fidelity)}: only rule test is calibrated (rank ranks peers, not a test)")
    base = load_study(args.study)
    if base.objective not in ("mean", "min"):
        raise SystemExit(f"{args.study}: objective {base.objective!r}: only single-objective studies (mean, min)")
    weights = {t.name: t.weight for t in base.tasks}
    total: dict[str, list[int]] = {}
    for seed in args.seeds:
        study, plan = load_full_run(base, args.runs, seed)
        stages = replay_stages(study, fidelity, seed)
        searched = [t for t in study.get_trials(deepcopy=False)
                    if ranking.kind(t) == ranking.KIND_SEARCH and t.state == TrialState.COMPLETE]
        rows: dict[int, TaskRows] = {}
        for trial in searched:
            full = trial_rows(trial, {})
            if full is None:
                raise SystemExit(f"seed {seed}: trial {trial.number} has no per-row search values (rows_search)")
            rows[trial.number] = stages.in_study_order(full)
        values = {t.number: ranking.score(t, plan.directions) for t in searched}
        incumbents = sorted(values, key=lambda n: (-values[n], n))[:args.incumbents]
        held_at = held_at_stages(stages)[:-1]  # the last stage holds every row: nothing to decide

        def stops(a_rows: TaskRows, b_rows: TaskRows, a: int, seed: int = seed,
                  directions: Mapping[str, bool] = plan.task_higher) -> bool:
            return decide(dict(a_rows), [b_rows], [], objective=base.objective, directions=directions,
                          config=fidelity, weights=weights, seed=seed * 100_000 + a).stopped

        counts = stop_counts(rows, values, held_at, incumbents, stops, args.worse)
        print(json.dumps({"seed": seed, "stages": list(stages.sizes), **rates(counts)}), file=sys.stderr, flush=True)
        for key, value in counts.items():
            total[key] = [x + y for x, y in zip(total.get(key, [0] * len(value)), value, strict=True)]
    summary = {"candidate": name(fidelity), "seeds": args.seeds, "stages": list(stages.sizes),
               "pairs_no_worse": total["pairs"][0], "pairs_worse": total["worse"][0], **rates(total)}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
