"""``search status STUDY``: where a study stands, what is best, and what blocks."""

from __future__ import annotations

import argparse
import statistics
from typing import TYPE_CHECKING

from search import gate_record, progress, ranking, sqlite_trials
from search.commands import SUMMARIES, add_study_arguments
from search.confidence import confidence_lines
from search.config import load_study
from search.lm_eval_splits import split_lines
from search.records import FIDELITY_ATTR, heldout_record, stopped_early, stopped_trial
from search.warm_start import warm_start_line

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    Trial = FrozenTrial | sqlite_trials.TrialRecord

# Nothing here imports Optuna at module level: an SQLite study is read without it
# (search.sqlite_trials, most of a second less), any other through Optuna. Trial states
# are compared by name, which both kinds of trial have.


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "status",
        help=SUMMARIES["status"],
        description=(
            "Summarise a study from its storage (read only; safe while `search start` runs): search "
            "trials done of the latest run's budget, feasible, failed and baseline counts, throughput "
            "(search trials finished in the latest run per minute since its search began), each gate's "
            "limit (as stored when the sources were scored), the best feasible "
            "trial's scores per task with its gate margins next to the baselines, and, when no "
            "trial is feasible, which gate blocks and by how much."
        ),
    )
    add_study_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = load_study(args.study, out=args.out)
    study: optuna.Study | sqlite_trials.StudyRecord | None = sqlite_trials.read_study(config.storage, config.name)
    if study is None:  # not SQLite, a schema not checked, or no such study (Optuna's error says so)
        from search import storage

        study = storage.load_existing_study(config.name, config.storage)
    print(render_status(study, budget=config.trials))
    return 0


def render_status(study: optuna.Study | sqlite_trials.StudyRecord, *, budget: int | None = None) -> str:
    """The status text, the same from either reading of a study. The budget is the latest run's
    (stored on the study); ``budget`` is shown only for a study that has none stored (one from
    before runs were recorded)."""
    trials = study.get_trials(deepcopy=False)
    attrs = study.user_attrs
    run = progress.run_record(attrs)
    if run is not None:
        budget = run.budget
    directions = [d.name.lower() for d in study.directions]
    tasks = [str(t) for t in attrs.get("tasks", [])]
    gates = gate_record.read_study_gates(attrs)
    searched = [t for t in trials if ranking.kind(t) == ranking.KIND_SEARCH]
    complete = ranking.search_trials(trials)
    baselines = ranking.baseline_trials(trials)
    failed = [t for t in searched if t.state.name == "FAIL"]
    stopped_trials = [t for t in searched if t.state.name == "PRUNED"]  # multi-fidelity: stopped early
    lines = [
        f"study {study.study_name}: sampler {attrs.get('sampler', '?')}, seed {attrs.get('seed', '?')}",
        f"search trials: {sum(ranking.counts_toward_budget(t) for t in searched)}/"
        f"{'?' if budget is None else budget} done, "
        f"{len(complete)} complete, {sum(ranking.is_feasible(t) for t in complete)} feasible, "
        f"{len(failed)} failed, {sum(t.state.name == 'RUNNING' for t in searched)} running, "
        + (f"{stopped_early(len(stopped_trials))}, " if stopped_trials else "") +
        f"{sum(t.state.name == 'WAITING' for t in searched)} waiting; {len(baselines)} baselines",
        _throughput(complete, stopped_trials, progress.throughput(searched, run)),
    ]
    stages = _stages_line(attrs.get(FIDELITY_ATTR), stopped_trials, len(complete))
    if stages:
        lines.insert(2, stages)
    for reason, count in _failure_reasons(failed).items():
        lines.append(f"  failed x{count}: {reason}")
    best = ranking.best_feasible(complete, directions)
    final = ranking.final_number(attrs)
    chosen = ranking.chosen_trial(trials, attrs, directions)
    shown: list[tuple[str, Trial]] = []
    if final is not None and chosen is not None:
        shown.append((f"final (trial {final})", chosen))
    if best is not None and best.number != final:
        shown.append((f"best feasible (trial {best.number})", best))
    shown += [(f"{name} (trial {trial.number})", trial) for name, trial in baselines.items()]
    lines.append(_gate_limits(gates))
    lines += split_lines(attrs)  # lm-eval tasks: the documents each split holds, as recorded
    chosen = shown[0][1] if isinstance(final, int) else best  # as search.annotate.chosen_trial
    warm = warm_start_line(trials, chosen, directions)
    if warm is not None:
        lines.append(warm)
    lines.append("")
    lines.append(_table(shown, tasks, attrs))
    intervals = confidence_lines(trials, attrs, directions)  # search.confidence: held-out 95% intervals
    lines += ["", *intervals] if intervals else []
    if best is None:
        blocker = ranking.what_blocks(trials, gates.names)
        lines.append("")
        lines.append(blocker.describe() if blocker else "no completed search trial yet")
    elif final is None:
        lines.append("")
        lines.append("not finalized: `search finalize` re-scores the top trials on held-out")
    return "\n".join(lines)


def _gate_limits(gates: gate_record.StudyGates) -> str:
    """The study's gates with their limits on the search slices, as stored."""
    if gates.limits is None:
        names = f" {', '.join(gates.names)}:" if gates.names else ""
        return f"gates:{names} {gates.missing}"
    if not gates.limits:
        return "gates: none"
    return "\n".join(["gates (limits on the search slices):", *(f"  {gate_record.describe_limit(g)}" for g in gates.limits)])


def _table(rows: list[tuple[str, Trial]], tasks: list[str], attrs: dict[str, object]) -> str:
    width = {t: max(12, len(t) + 2) for t in tasks}  # a column per task, never run together
    header = f"{'':<28}" + "".join(f"{t:>{width[t]}}" for t in tasks) + "  gates (margin)"
    out = [header]
    for name, trial in rows:
        if trial.state.name != "COMPLETE":
            out.append(f"{name:<28}  failed: {trial.user_attrs.get('failure', '?')}")
            continue
        scores = trial.user_attrs.get("scores_search", {})
        cells = "".join(f"{float(scores.get(t, float('nan'))):>{width[t]}.4f}" for t in tasks)
        gates = ", ".join(
            f"{g.name} {'ok' if g.passed else 'FAIL'} {g.margin:+.3f}"
            for g in gate_record.read_trial_gates(trial.user_attrs)
        ) or "-"
        out.append(f"{name:<28}{cells}  {gates}")
        record = heldout_record(attrs, trial.number)
        if record is not None:
            cells = "".join(f"{record.scores.get(t, float('nan')):>{width[t]}.4f}" for t in tasks)
            gates = ", ".join(
                f"{g} {'ok' if m >= 0 else 'FAIL'} {m:+.3f}" for g, m in record.gate_margins.items()
            ) or "-"
            out.append(f"{'  held-out':<28}{cells}  {gates}")
    return "\n".join(out)


def _throughput(complete: list[Trial], stopped: list[Trial], rate: progress.Throughput) -> str:
    """The progress line's throughput (see search.progress) and the median trial's work, over the
    complete search trials and those ``stopped`` early (a study in stages scores most trials on
    few rows: the complete ones alone would overstate a trial's cost)."""
    timed = [t.user_attrs["timings"] for t in [*complete, *stopped] if isinstance(t.user_attrs.get("timings"), dict)]
    if not timed:
        return f"throughput: {rate.describe()}"
    merge = statistics.median(float(t.get("merge_s", 0.0)) for t in timed)
    score = statistics.median(float(t.get("score_s", 0.0)) for t in timed)
    among = f" (trials stopped early among them: {len(stopped)})" if stopped else ""
    return f"throughput: {rate.describe()}; median merge {merge:.3f} s, scoring {score:.3f} s per trial{among}"


def _stages_line(study_record: object, stopped: list[Trial], complete: int) -> str | None:
    """A study in stages: each stage's rows and how many search trials stopped after it (the
    funnel a schedule is judged by); None for a study scored on every row."""
    if not isinstance(study_record, dict) or not isinstance(study_record.get("stages"), list):
        return None
    sizes = [int(size) for size in study_record["stages"]]
    after = [0] * max(len(sizes) - 1, 0)
    for trial in stopped:
        record = stopped_trial(trial)  # type: ignore[arg-type]
        if record is not None and 1 <= record.stage <= len(after):
            after[record.stage - 1] += 1
    return (f"stages: {', '.join(map(str, sizes))} search rows; stopped after each: "
            f"{', '.join(map(str, after)) or '-'}; scored on every row: {complete}")


def _failure_reasons(failed: list[Trial]) -> dict[str, int]:
    reasons: dict[str, int] = {}
    for trial in failed:
        reason = str(trial.user_attrs.get("failure", "unknown"))
        reasons[reason] = reasons.get(reason, 0) + 1
    return reasons
