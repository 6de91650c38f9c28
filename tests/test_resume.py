"""Resuming a study: after a driver killed mid-trial (SIGKILL) and after Ctrl-C (SIGINT).

The driver runs as the real ``search`` CLI in a subprocess. The kill happens inside a
user scorer at a fixed call, so it lands mid-trial at the same point every time. A study
killed and resumed ends with the trials (genes and values, by search position) and the
final recipe of one never interrupted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from optuna.trial import TrialState

from search import ranking
from search.config import load_study
from search.driver import run_study
from search.records import EXAMPLE_ROWS_ATTR, trial_rows
from search.samplers import POSITION
from tests.checkpoints import TinyFamily
from tests.processes import ctrl_c_works
from tests.studies import open_running_study, stored_study, write_study
from tests.test_driver import search_trials

REPO = Path(__file__).resolve().parents[1]


def count_call_and_kill_at() -> None:
    """Counts this call in $KILL_COUNTER_FILE (across processes); SIGKILLs the process at call $KILL_AT_CALL."""
    counter = os.environ.get("KILL_COUNTER_FILE")
    if counter:
        path = Path(counter)
        calls = int(path.read_text()) + 1 if path.exists() else 1
        path.write_text(str(calls))
        if calls == int(os.environ["KILL_AT_CALL"]):
            os.kill(os.getpid(), signal.SIGKILL)


def killing_scorer(model: torch.nn.Module, batch: object, examples: Sequence[object]) -> list[float]:
    """Scores by the first head weight; SIGKILLs its own process at call $KILL_AT_CALL."""
    count_call_and_kill_at()
    return [float(model.lm_head.weight[0, 0])] * len(examples)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "search.cli", *args], cwd=REPO, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})},
        preexec_fn=ctrl_c_works,
    )


def test_killed_driver_fails_running_trials_and_reruns_them(tmp_path: Path, llama_family: TinyFamily) -> None:
    path = write_study(tmp_path, llama_family, trials=8, sampler="cmaes", population=4,
                       metric="tests.test_resume:killing_scorer")
    # 4 baselines x 2 tasks = 8 calls; each search trial makes 2: call 11 is the second
    # search trial's first task, while the last 2 trials of generation 0 wait RUNNING.
    proc = cli("start", str(path), "--quiet",
               env={"KILL_COUNTER_FILE": str(tmp_path / "calls"), "KILL_AT_CALL": "11"})
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    before = {t.number: t for t in stored_study(path).get_trials()}
    running = [t for t in before.values() if t.state == TrialState.RUNNING]
    finished = [t for t in before.values() if t.state == TrialState.COMPLETE]
    assert len(running) == 3 and all(t.user_attrs["kind"] == "search" for t in running)
    assert sum(t.user_attrs.get("kind") == "search" for t in finished) == 1

    result = run_study(load_study(path), quiet=True)
    assert result.done == 8 and not result.interrupted
    after = {t.number: t for t in stored_study(path).get_trials()}
    for trial in finished:  # no finished trial lost or changed
        assert after[trial.number].state == TrialState.COMPLETE
        assert after[trial.number].values == trial.values
        assert after[trial.number].params == trial.params
    for trial in running:  # failed with the reason, and re-run with the same genes
        assert after[trial.number].state == TrialState.FAIL
        assert after[trial.number].user_attrs["failure"] == ranking.DRIVER_STOPPED
        reruns = [t for t in after.values() if t.user_attrs.get("rerun_of") == trial.number]
        assert len(reruns) == 1 and reruns[0].params == trial.params
        assert reruns[0].state == TrialState.COMPLETE
        # It rejoined the CMA generation it was asked in.
        assert reruns[0].system_attrs["cma:generation"] == trial.system_attrs["cma:generation"]
    searched = [t for t in after.values() if t.user_attrs.get("kind") == "search"]
    assert sum(ranking.counts_toward_budget(t) for t in searched) == 8
    assert not [t for t in after.values() if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert len(ranking.baseline_trials(after.values())) == 4  # baselines not scored twice
    # per-row results survive the kill: every scored trial, before and after, keeps one value
    # per row per task whose mean is its stored score (search.records)
    attrs = stored_study(path).user_attrs
    for trial in [*finished, *(t for t in after.values() if ranking.is_scored(t))]:
        rows = trial_rows(trial, attrs, "search")
        assert rows is not None and set(rows) == set(trial.user_attrs["scores_search"]), trial.number
        for task, values in rows.items():
            assert len(values) == attrs[EXAMPLE_ROWS_ATTR]["search"][task]["n"]
            assert float(np.mean(values)) == pytest.approx(trial.user_attrs["scores_search"][task], rel=1e-12)


def test_sigint_stops_cleanly_and_leaves_a_resumable_study(tmp_path: Path, llama_family: TinyFamily) -> None:
    path = write_study(tmp_path, llama_family, trials=400, sampler="tpe")
    proc = cli("start", str(path))
    config = load_study(path)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        time.sleep(0.5)
        study = open_running_study(config)
        if study is None:
            continue
        if sum(t.state == TrialState.COMPLETE for t in search_trials(study)) >= 3:
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert f"resume with: search start {path}" in err
    study = stored_study(path)
    done = sum(ranking.counts_toward_budget(t) for t in search_trials(study))
    assert 3 <= done < 400
    # The trial in flight was finished, not abandoned.
    assert not [t for t in study.get_trials() if t.state == TrialState.RUNNING]
    assert study.user_attrs.get("final_trial") is None

    result = run_study(load_study(path, trials=done + 2), quiet=True)
    assert result.done == done + 2 and result.finalized is not None
    study = stored_study(path)
    assert sum(ranking.counts_toward_budget(t) for t in search_trials(study)) == done + 2


def by_position(path: Path) -> dict[int, tuple[dict, list[float] | None, TrialState]]:
    """The study's search, position by position: genes, told values, state (lost runs left out)."""
    return {
        t.user_attrs[POSITION]: (t.params, t.values, t.state)
        for t in search_trials(stored_study(path)) if ranking.counts_toward_budget(t)
    }


def final_recipe(path: Path) -> dict:
    study = stored_study(path)
    return study.get_trials()[study.user_attrs["final_trial"]].user_attrs["recipe"]


BASELINE_CALLS = 8  # 4 baselines x 2 tasks; search trial k then makes calls 9 + 2k and 10 + 2k


@pytest.mark.parametrize(("sampler", "trials", "kill_at"), [
    # generation 1 (positions 4-7) lost whole; then position 9, mid-generation 2
    ("cmaes", 12, (BASELINE_CALLS + 2 * 4 + 1, 4 * 2 + 2 * 1 + 1)),
    # during a random startup trial (position 3); then position 11, drawn by TPE itself
    ("tpe", 12, (BASELINE_CALLS + 2 * 3 + 1, 8 * 2 + 1)),
    # (random search, whose draws depend on the position alone, is the simple case of these two)
])
def test_a_killed_and_resumed_study_ends_like_an_uninterrupted_one(
    tmp_path: Path, llama_family: TinyFamily, sampler: str, trials: int, kill_at: tuple[int, ...]
) -> None:
    metric = "tests.test_resume:killing_scorer"
    population = 4 if sampler == "cmaes" else None
    paths = {}
    for name in ("plain", "killed"):
        (tmp_path / name).mkdir()
        paths[name] = write_study(tmp_path / name, llama_family, trials=trials, sampler=sampler,
                                  population=population, metric=metric, seed=2)
    run_study(load_study(paths["plain"]), quiet=True)
    expected = by_position(paths["plain"])
    assert sorted(expected) == list(range(trials))

    calls = 0
    for after in kill_at:  # each kill counts calls from the previous one
        calls += after
        proc = cli("start", str(paths["killed"]), "--quiet",
                   env={"KILL_COUNTER_FILE": str(tmp_path / "calls"), "KILL_AT_CALL": str(calls)})
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == -signal.SIGKILL, err
    result = run_study(load_study(paths["killed"]), quiet=True)
    assert result.done == trials and result.finalized is not None

    lost = [t for t in search_trials(stored_study(paths["killed"]))
            if t.user_attrs.get("failure") == ranking.DRIVER_STOPPED]
    assert len(lost) >= len(kill_at)  # the kills landed mid-search
    assert by_position(paths["killed"]) == expected
    assert final_recipe(paths["killed"]) == final_recipe(paths["plain"])


@pytest.mark.ray
def test_parallel_draws_do_not_depend_on_which_trial_finishes_first(
    tmp_path: Path, llama_family: TinyFamily
) -> None:
    """TPE on a Ray pool of 2 workers (4 trials in flight, told as they finish) draws what a
    run with one trial at a time draws when it has the same lag: each candidate sees the
    trials before its horizon finished, whatever finished first."""
    from dataclasses import replace

    from search.plan import open_plan_study, plan_study, worker_setup
    from search.positions import LAG_ATTR
    from search.ray_pool import RayPool

    paths = {}
    for name in ("ray", "inline"):
        (tmp_path / name).mkdir()
        paths[name] = write_study(tmp_path / name, llama_family, trials=12, sampler="tpe", seed=5)
    config = load_study(paths["ray"])
    pool = RayPool(worker_setup(config), replace(config.execution, backend="ray", workers=2, cpus_per_worker=1))
    try:
        lag = pool.free_slots() - 1
        run_study(config, quiet=True, pool=pool, finalize_after=False)
    finally:
        pool.close()
    assert lag == 3 and stored_study(paths["ray"]).user_attrs[LAG_ATTR] == lag
    workers = {t.user_attrs["worker"] for t in search_trials(stored_study(paths["ray"]))}
    assert len(workers) == 2  # both workers ran trials

    inline = load_study(paths["inline"])
    open_plan_study(plan_study(inline)).set_user_attr(LAG_ATTR, lag)
    run_study(inline, quiet=True, finalize_after=False)
    assert by_position(paths["ray"]) == by_position(paths["inline"])
