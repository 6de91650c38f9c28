"""Replay multi-fidelity schedules over full-fidelity studies' stored per-row values (cheap screening).

A full-fidelity study stores every search trial's value on every search row (system attr
``rows_search``, ``search.records``). This script replays candidate schedules over those
trials in the same order, with the driver's own decision (``search.staged.StudyStages.decide``)
and the inline pool's order of results: a CMA-ES generation is queued whole, each stage's
result decided in turn, a promoted trial's next stage first (``search.pool.InlinePool``: depth
first), the next generation asked once every member was told. It counts the search rows each
trial would have been scored on and whether the trial the full run chose (its final trial)
and its finalists would have been stopped.

An approximation: in a real staged run the sampler is told the stopped trials' estimates, so
after the first generation it proposes other trials than the full run did. The replay keeps
the full run's trials; it screens schedules (examples scored, and whether the good trials
survive), and ``benchmarks/fidelity.py`` measures the chosen one for real.

    python benchmarks/fidelity_replay.py --runs DIR [--seeds 0 1 2] [--run-missing]
        [--candidate FIRST_STAGE,GROWTH,CONFIDENCE,RULE[,PROMOTE] ...]

``--run-missing`` first runs the study (default: the demo) at full fidelity for each seed
missing under ``DIR`` (``DIR/full-<seed>``, kept for later replays). One JSON line per
(candidate, seed) on stderr; the last line on stdout is one JSON object, per candidate: the
example ratio (full / replayed, summed over seeds), the seeds whose final trial would have
been stopped, and the finalists kept.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import deque
from dataclasses import replace
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from fitness.fidelity import FidelityConfig, study_row_order
from search import ranking, storage
from search.config import StudyConfig, load_study
from search.driver import run_study
from search.plan import StudyPlan, plan_study
from search.positions import popsize
from search.records import EXAMPLE_ROWS_ATTR, ROWS_SEARCH_ATTR, prefix_rows_attr, trial_rows
from search.samplers import POSITION
from search.staged import StudyStages, stages_of

ROOT = Path(__file__).resolve().parents[1]
DEMO_STUDY = ROOT / "studies" / "logistics" / "study.toml"
DEFAULT_CANDIDATES = ("30,2,0.9,test", "30,2,0.9,rank", "30,3,0.9,rank", "60,2,0.9,rank", "60,3,0.9,rank")


def full_run(base: StudyConfig, runs: Path, seed: int) -> StudyConfig:
    """The full-fidelity study of ``seed`` under ``runs`` (its config; run it with ``run_study``)."""
    output = runs / f"full-{seed}"
    return replace(base, seed=seed, output=output, storage=f"sqlite:///{output / 'study.db'}", fidelity=None)


def load_full_run(base: StudyConfig, runs: Path, seed: int, *, run_missing: bool = False
                  ) -> tuple[optuna.Study, StudyPlan]:
    """The stored full-fidelity study of ``seed`` under ``runs`` and its plan (run first if
    ``run_missing``; else SystemExit when it is not there)."""
    config = full_run(base, runs, seed)
    if not (config.output / "study.db").exists():
        if not run_missing:
            raise SystemExit(f"{config.output}: no full-fidelity run (benchmarks/fidelity_replay.py --run-missing)")
        run_study(config, quiet=True)
    return storage.load_existing_study(config.name, config.storage), plan_study(config)


def replay_stages(study: optuna.Study, fidelity: FidelityConfig, seed: int) -> StudyStages:
    """``fidelity``'s stages over the study's search rows, in the order a staged study of ``seed`` uses."""
    task_rows = {task: int(record["n"]) for task, record in study.user_attrs[EXAMPLE_ROWS_ATTR]["search"].items()}
    return stages_of(fidelity, study_row_order(task_rows, seed), task_rows)


def held_at_stages(stages: StudyStages) -> list[dict[str, int]]:
    """Per stage, the rows of each task a trial holds after it (the prefix of the study's order)."""
    return [{task: sum(1 for t, _ in stages.order[:size] if t == task) for task in stages.task_rows}
            for size in stages.sizes]


def replay(study: optuna.Study, plan: StudyPlan, fidelity: FidelityConfig, per_generation: int) -> dict[str, object]:
    """Replay ``fidelity`` over the study's search trials (see the module): rows scored and who stops."""
    seed = plan.config.seed
    trials = study.get_trials(deepcopy=False)
    stages = replay_stages(study, fidelity, seed)
    task_rows = stages.task_rows
    searched = sorted((t for t in trials if ranking.kind(t) == ranking.KIND_SEARCH and t.state == TrialState.COMPLETE),
                      key=lambda t: t.user_attrs[POSITION])
    told: list[FrozenTrial] = [t for t in trials if ranking.kind(t) != ranking.KIND_SEARCH]  # baselines
    held_at = held_at_stages(stages)
    examples, stopped_at = 0, {}
    for start in range(0, len(searched), per_generation):
        queue = deque((trial, 0) for trial in searched[start:start + per_generation])
        while queue:
            trial, stage = queue.popleft()
            full = trial_rows(trial, {})
            if full is None:
                raise SystemExit(f"trial {trial.number} has no per-row search values (rows_search)")
            if stage == len(stages.sizes) - 1:
                told.append(trial)
                examples += stages.total
                continue
            rows = {task: values[:held_at[stage][task]] for task, values in stages.in_study_order(full).items()}
            decision = stages.decide(rows, told, plan, seed=seed + int(trial.user_attrs[POSITION]))
            if decision.stopped:
                told.append(optuna.trial.create_trial(
                    state=TrialState.PRUNED, user_attrs={"kind": ranking.KIND_SEARCH, POSITION: trial.user_attrs[POSITION]},
                    system_attrs={ROWS_SEARCH_ATTR: prefix_rows_attr({t: v.tolist() for t, v in rows.items()}, task_rows)}))
                examples += stages.sizes[stage]
                stopped_at[trial.number] = stage + 1
            else:
                queue.appendleft((trial, stage + 1))  # the inline pool runs it next (depth first)
    final = ranking.final_number(study.user_attrs)
    finalists = [t.number for t in ranking.ranked(ranking.search_trials(trials), plan.directions)][:plan.config.top_k]
    return {
        "seed": seed, "trials": len(searched), "stages": list(stages.sizes),
        "examples_full": len(searched) * stages.total, "examples_replay": examples,
        "stopped": len(stopped_at),
        "final": final, "final_stopped_at": stopped_at.get(final) if final is not None else None,
        "finalists_kept": sum(n not in stopped_at for n in finalists), "finalists": len(finalists),
    }


def parse_candidate(text: str) -> FidelityConfig:
    """``FIRST_STAGE,GROWTH,CONFIDENCE,RULE[,PROMOTE]``."""
    first, growth, confidence, rule, *promote = text.split(",")
    return FidelityConfig(first_stage=int(first), growth=float(growth), confidence=float(confidence), rule=rule,
                          promote=float(promote[0]) if promote else None)


def name(fidelity: FidelityConfig) -> str:
    text = f"{fidelity.first_stage},{fidelity.growth:g},{fidelity.confidence:g},{fidelity.rule}"
    return text if fidelity.promote is None else f"{text},{fidelity.promote:g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, default=DEMO_STUDY)
    parser.add_argument("--runs", type=Path, required=True, help="folder of the full-fidelity runs (full-<seed>)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--run-missing", action="store_true", help="run the full-fidelity studies not yet there")
    parser.add_argument("--candidate", action="append", default=None,
                        help="FIRST_STAGE,GROWTH,CONFIDENCE,RULE[,PROMOTE] (repeatable; default: a small grid)")
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base = load_study(args.study)
    candidates = [parse_candidate(text) for text in (args.candidate or DEFAULT_CANDIDATES)]
    plans: dict[int, tuple[optuna.Study, StudyPlan]] = {}
    for seed in args.seeds:
        plans[seed] = load_full_run(base, args.runs, seed, run_missing=args.run_missing)
    per_generation = popsize(next(iter(plans.values()))[1]) if base.sampler == "cmaes" else 1
    summary: dict[str, object] = {}
    for fidelity in candidates:
        rows = []
        for study, plan in plans.values():
            row = replay(study, plan, fidelity, per_generation)
            rows.append(row)
            print(json.dumps({"candidate": name(fidelity), **row}), file=sys.stderr, flush=True)
        full = sum(int(r["examples_full"]) for r in rows)  # type: ignore[call-overload]
        replayed = sum(int(r["examples_replay"]) for r in rows)  # type: ignore[call-overload]
        summary[name(fidelity)] = {
            "example_ratio": round(full / replayed, 3),
            "final_stopped": [r["seed"] for r in rows if r["final_stopped_at"] is not None],
            "finalists_kept": f"{sum(int(r['finalists_kept']) for r in rows)} of "  # type: ignore[call-overload]
                              f"{sum(int(r['finalists']) for r in rows)}",  # type: ignore[call-overload]
            "stopped_mean": float(np.mean([int(r["stopped"]) for r in rows])),  # type: ignore[call-overload]
        }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
