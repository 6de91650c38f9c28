"""``search status STUDY``: where a study stands, what is best, and what blocks."""

from __future__ import annotations

import argparse
import statistics

import optuna
from optuna.trial import FrozenTrial, TrialState

from search import ranking, storage
from search.commands import SUMMARIES, add_study_arguments
from search.config import load_study


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "status",
        help=SUMMARIES["status"],
        description=(
            "Summarise a study from its storage (read only; safe while `search start` runs): trials "
            "done of the budget, feasible, failed and baseline counts, throughput, the best feasible "
            "trial's scores per task with its gate margins next to the baselines, and, when no "
            "trial is feasible, which gate blocks and by how much."
        ),
    )
    add_study_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = load_study(args.study, out=args.out)
    study = storage.load_existing_study(config.name, config.storage)
    print(render_status(study, budget=config.trials))
    return 0


def render_status(study: optuna.Study, *, budget: int) -> str:
    trials = study.get_trials(deepcopy=False)
    attrs = study.user_attrs
    directions = [d.name.lower() for d in study.directions]
    tasks = [str(t) for t in attrs.get("tasks", [])]
    gate_names = [str(g) for g in attrs.get("gates", [])]
    searched = [t for t in trials if ranking.kind(t) == ranking.KIND_SEARCH]
    complete = ranking.search_trials(trials)
    baselines = ranking.baseline_trials(trials)
    failed = [t for t in searched if t.state == TrialState.FAIL]
    lines = [
        f"study {study.study_name}: sampler {attrs.get('sampler', '?')}, seed {attrs.get('seed', '?')}",
        f"trials: {sum(ranking.counts_toward_budget(t) for t in searched)}/{budget} done, "
        f"{len(complete)} complete, {sum(ranking.is_feasible(t) for t in complete)} feasible, "
        f"{len(failed)} failed, {sum(t.state == TrialState.RUNNING for t in searched)} running, "
        f"{sum(t.state == TrialState.WAITING for t in searched)} waiting; {len(baselines)} baselines",
        _throughput(complete),
    ]
    for reason, count in _failure_reasons(failed).items():
        lines.append(f"  failed x{count}: {reason}")
    best = ranking.best_feasible(complete, directions)
    final = attrs.get("final_trial")
    shown: list[tuple[str, FrozenTrial]] = []
    if isinstance(final, int):
        shown.append((f"final (trial {final})", next(t for t in trials if t.number == final)))
    if best is not None and best.number != final:
        shown.append((f"best feasible (trial {best.number})", best))
    shown += [(name, trial) for name, trial in baselines.items()]
    lines.append("")
    lines.append(_table(shown, tasks, gate_names, attrs))
    if best is None:
        blocker = ranking.what_blocks(trials, gate_names)
        lines.append("")
        lines.append(blocker.describe() if blocker else "no completed search trial yet")
    elif not isinstance(final, int):
        lines.append("")
        lines.append("not finalized: `search finalize` re-scores the top trials on held-out")
    return "\n".join(lines)


def _table(rows: list[tuple[str, FrozenTrial]], tasks: list[str], gate_names: list[str],
           attrs: dict[str, object]) -> str:
    header = f"{'':<28}" + "".join(f"{t:>12}" for t in tasks) + "  gates (margin)"
    out = [header]
    for name, trial in rows:
        if trial.state != TrialState.COMPLETE:
            out.append(f"{name:<28}  failed: {trial.user_attrs.get('failure', '?')}")
            continue
        scores = trial.user_attrs.get("scores_search", {})
        margins = trial.user_attrs.get("gate_margins", {})
        cells = "".join(f"{float(scores.get(t, float('nan'))):>12.4f}" for t in tasks)
        gates = ", ".join(
            f"{g} {'ok' if float(margins[g]) >= 0 else 'FAIL'} {float(margins[g]):+.3f}"
            for g in gate_names if g in margins
        ) or "-"
        out.append(f"{name:<28}{cells}  {gates}")
        record = storage.heldout_record(attrs, trial.number)
        if record is not None:
            cells = "".join(f"{record.scores.get(t, float('nan')):>12.4f}" for t in tasks)
            gates = ", ".join(
                f"{g} {'ok' if m >= 0 else 'FAIL'} {m:+.3f}" for g, m in record.gate_margins.items()
            ) or "-"
            out.append(f"{'  held-out':<28}{cells}  {gates}")
    return "\n".join(out)


def _throughput(complete: list[FrozenTrial]) -> str:
    stamps = [t for t in complete if t.datetime_start and t.datetime_complete]
    if len(stamps) < 2:
        return "throughput: not enough trials yet"
    first = min(t.datetime_start for t in stamps)  # type: ignore[type-var]
    last = max(t.datetime_complete for t in stamps)  # type: ignore[type-var]
    minutes = (last - first).total_seconds() / 60.0
    merge = statistics.median(float(t.user_attrs.get("timings", {}).get("merge_s", 0.0)) for t in stamps)
    score = statistics.median(float(t.user_attrs.get("timings", {}).get("score_s", 0.0)) for t in stamps)
    rate = f"{len(stamps) / minutes:.1f} trials/min" if minutes > 0 else "n/a"
    return f"throughput: {rate} (median merge {merge:.3f} s, scoring {score:.3f} s per trial)"


def _failure_reasons(failed: list[FrozenTrial]) -> dict[str, int]:
    reasons: dict[str, int] = {}
    for trial in failed:
        reason = str(trial.user_attrs.get("failure", "unknown"))
        reasons[reason] = reasons.get(reason, 0) + 1
    return reasons
