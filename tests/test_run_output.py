"""What ``search start`` / ``status`` / ``finalize`` tell the user, through the real CLI.

One numbering (Optuna's trial numbers, as the dashboard shows them), one budget (the latest
run's, stored on the study), one throughput (search trials finished in the latest run per
minute since its search began), ``--seed`` / ``--sampler`` on the command line, and a
``--quiet`` that prints nothing.
"""

from __future__ import annotations

import io
import logging
import re
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

from search import ranking
from search.cli import main
from search.config import load_study
from search.progress import Progress, ProgressState, RunRecord, throughput
from tests.checkpoints import TinyFamily
from tests.studies import stored_study, write_study

PROGRESS = re.compile(r"^(\d+)/(\d+) search trials done \(trial (\d+) finished\):.* ([0-9.]+) search trials/min")


def new(folder: Path) -> Path:
    folder.mkdir(parents=True)
    return folder


def test_progress_status_and_finalize_use_one_budget_one_numbering_one_throughput(
    tmp_path: Path, llama_family: TinyFamily, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_study(tmp_path, llama_family, trials=5)  # the file's budget: 5
    assert main(["start", str(path), "--trials", "3"]) == 0
    out = capsys.readouterr().out
    study = stored_study(path)
    searched = sorted((t for t in study.trials if ranking.kind(t) == ranking.KIND_SEARCH), key=lambda t: t.number)
    baselines = ranking.baseline_trials(study.trials)
    assert min(t.number for t in searched) == len(baselines)  # Optuna numbers count the baselines first

    # The progress line counts search trials against this run's budget and names trials by number.
    lines = [m.groups() for m in map(PROGRESS.match, out.splitlines()) if m]
    assert [(done, budget) for done, budget, _, _ in lines] == [("1", "3"), ("2", "3"), ("3", "3")]
    assert [int(number) for _, _, number, _ in lines] == [t.number for t in searched]
    assert out.splitlines()[0].startswith("study tiny: sampler random, seed 0, budget 3 search trials")

    # Finalize says what it re-scores: top_k finalists by number, and the baselines apart.
    finalists = [t.number for t in ranking.top_feasible(ranking.search_trials(study.trials), ["maximize"], 2)]
    assert (f"re-scoring on the held-out split: 2 finalist(s), trial(s) {finalists[0]}, {finalists[1]} "
            f"(the best feasible search trials, top_k = 2) and {len(baselines)} baseline(s)") in out

    # status: this run's budget (not the file's), and the same throughput definition.
    assert main(["status", str(path)]) == 0
    status = capsys.readouterr().out
    assert "search trials: 3/3 done" in status
    rate = throughput(study.trials, RunRecord(3, datetime.fromisoformat(study.user_attrs["run"]["started"])))
    assert rate.trials == 3
    assert f"throughput: {rate.describe()}" in status
    assert f"final (trial {study.user_attrs['final_trial']})" in status
    assert all(f"{name} (trial {t.number})" in status for name, t in baselines.items())

    # Resume with the file's budget: status shows 5, and only the 2 trials of the latest run count.
    assert main(["start", str(path)]) == 0
    out = capsys.readouterr().out
    lines = [m.groups() for m in map(PROGRESS.match, out.splitlines()) if m]
    assert [(done, budget) for done, budget, _, _ in lines] == [("4", "5"), ("5", "5")]
    assert main(["status", str(path)]) == 0
    status = capsys.readouterr().out
    assert "search trials: 5/5 done" in status and "(2 finished in " in status


def _trial(number: int, kind: str, start: datetime, minutes: float, state: TrialState = TrialState.COMPLETE,
           failure: str | None = None) -> FrozenTrial:
    attrs: dict[str, object] = {"kind": kind}
    if failure is not None:
        attrs["failure"] = failure
    return FrozenTrial(
        number=number, state=state, value=1.0 if state == TrialState.COMPLETE else None, values=None,
        datetime_start=start, datetime_complete=start + timedelta(minutes=minutes), params={},
        distributions={}, user_attrs=attrs, system_attrs={}, intermediate_values={}, trial_id=number,
    )


def test_throughput_is_the_latest_runs_search_trials_per_minute_since_its_search_began() -> None:
    began = datetime(2026, 1, 1, 12, 0)
    earlier = began - timedelta(hours=5)  # an earlier run, then hours idle: not counted
    trials = [
        _trial(0, "baseline", began - timedelta(minutes=1), 0.5),
        _trial(1, "search", earlier, 1.0),
        _trial(2, "search", began + timedelta(minutes=0.5), 0.5),
        _trial(3, "search", began + timedelta(minutes=1), 1.0, TrialState.FAIL, failure="scorer raised"),
        _trial(4, "search", began + timedelta(minutes=1), 3.0, TrialState.FAIL, failure=ranking.DRIVER_STOPPED),
        _trial(5, "search", began + timedelta(minutes=2), 2.0),
        _trial(6, "search", began + timedelta(minutes=2), 1.0, TrialState.PRUNED),  # stopped early: counted
    ]
    rate = throughput(trials, RunRecord(budget=10, started=began))
    assert (rate.trials, rate.minutes, rate.per_min) == (4, 4.0, 1.0)  # trials 2, 3, 5, 6; the last ends at 4 min
    assert throughput(trials[:2], RunRecord(10, began)).describe() == "no search trial finished in the latest run yet"
    # A study from before runs were recorded: every finished search trial from the first start.
    old = throughput(trials, None)
    assert old.trials == 5 and old.minutes == pytest.approx(5 * 60 + 4.0)


def test_quiet_start_prints_nothing_not_even_optunas_log(
    tmp_path: Path, llama_family: TinyFamily, caplog: pytest.LogCaptureFixture
) -> None:
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.INFO)
    try:
        # The control: without --quiet, Optuna logs the study's creation ([I ...] on a terminal).
        loud = write_study(new(tmp_path / "loud"), llama_family, trials=1)
        with caplog.at_level(logging.INFO, logger="optuna"):
            assert main(["start", str(loud)]) == 0
        assert any("A new study created" in r.getMessage() for r in caplog.records)
    finally:
        optuna.logging.set_verbosity(level)
    # What a user's terminal gets: a fresh process, its real stdout and stderr.
    quiet = write_study(new(tmp_path / "quiet"), llama_family, trials=1)
    done = subprocess.run([sys.executable, "-m", "search.cli", "start", str(quiet), "--quiet"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (done.stdout, done.stderr) == ("", "")
    assert isinstance(stored_study(quiet).user_attrs.get("final_trial"), int)  # it did run


def test_seed_and_sampler_on_the_command_line_run_a_variant_of_one_study_file(
    tmp_path: Path, llama_family: TinyFamily, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_study(new(tmp_path / "file"), llama_family, trials=2, sampler="cmaes", population=4, seed=0)
    variant = tmp_path / "random-seed3"
    # random uses no population: the file's `population = 4` does not stand in the way.
    assert main(["start", str(path), "--sampler", "random", "--seed", "3", "--out", str(variant), "--quiet"]) == 0
    study = stored_study(path, out=variant)
    assert (study.user_attrs["sampler"], study.user_attrs["seed"]) == ("random", 3)
    # The same trials as a study file that says sampler = "random", seed = 3.
    reference = write_study(new(tmp_path / "ref"), llama_family, trials=2, sampler="random", seed=3)
    assert main(["start", str(reference), "--quiet"]) == 0

    def genes(s: optuna.Study) -> list[dict[str, object]]:
        return [t.params for t in sorted(ranking.search_trials(s.trials), key=lambda t: t.number)]

    assert genes(study) == genes(stored_study(reference)) and len(genes(study)) == 2
    assert main(["status", str(path), "--out", str(variant)]) == 0
    assert "sampler random, seed 3" in capsys.readouterr().out
    # population applies to the samplers that use one
    assert load_study(path, sampler="tpe").population is None
    assert load_study(path, sampler="nsga2").population == 4
    assert load_study(path, seed=7).seed == 7 and load_study(path).seed == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sampler", "cmaes"], "error: --sampler cmaes: cmaes is single-objective; objective 'per_task' needs one of"),
        (["--seed", "-1"], "error: --seed: expected an integer >= 0, got -1"),
    ],
)
def test_bad_overrides_are_one_line_errors(tmp_path: Path, llama_family: TinyFamily,
                                           capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    path = write_study(tmp_path, llama_family, trials=2, sampler="nsga2", objective="per_task")
    assert main(["start", str(path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_the_terminal_bar_shows_our_throughput_and_not_tqdms_own_rate() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    progress = Progress(48, stream=screen, already_done=40)
    progress.update(ProgressState(done=41, budget=48, feasible=30, failed=1, last_trial=45, best_trial=44,
                                  best_objective=0.5, best_scores={"alpha": 0.5}, per_min=67.5))
    progress.close()
    text = screen.getvalue()
    assert "41/48 search trials" in text and "best trial 44 0.5000 (alpha 0.500) 67.5 search trials/min" in text
    assert "trial/s" not in text and "s/trial" not in text  # one throughput figure, ours
    assert "stopped early" not in text  # no stages: nothing said of them


def test_the_progress_line_counts_trials_stopped_early() -> None:
    plain = io.StringIO()
    Progress(48, stream=plain).update(ProgressState(done=42, budget=48, feasible=7, failed=0, stopped=35,
                                                    last_trial=46, per_min=49.4))
    assert "42/48 search trials done (trial 46 finished): feasible 7, stopped early 35, failed 0, " in plain.getvalue()
