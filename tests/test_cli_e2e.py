"""End to end through the real ``search`` CLI on the built-in demo family.

start -> SIGKILL mid-study -> start again -> status -> finalize -> export, then
``mergekit-yaml`` rebuilds the exported recipe and the rebuilt checkpoint must score
what the study recorded for that trial, on the search and the held-out slices.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from transformers import AutoModelForCausalLM, AutoTokenizer

from fitness.scoring import score_slice
from fitness.slices import load_task
from search import ranking, storage
from search.config import load_study
from tests.studies import open_running_study

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BUDGET = 12
POPULATION = 4


def demo_study(tmp_path: Path, root: Path) -> Path:
    """The shipped logistics study, pointed at the cached family, with a small budget."""
    text = (REPO / "studies" / "logistics" / "study.toml").read_text()
    text = text.replace('"family/', f'"{root}/')
    text = re.sub(r"(?m)^trials = \d+", f"trials = {BUDGET}", text)
    text = re.sub(r"(?m)^population = \d+", f"population = {POPULATION}", text)
    text = re.sub(r'(?m)^output = ".*"', f'output = "{tmp_path / "run"}"', text)
    # The shipped gates need more trials than this test runs before one passes; the test is
    # about the commands, so it keeps the gates but lowers them until early CMA-ES trials pass.
    text = re.sub(r"gates = \{ min = [0-9.]+ \}", "gates = { min = 0.02 }", text)
    assert f"trials = {BUDGET}" in text and str(root) in text and "min = 0.02" in text
    path = tmp_path / "study.toml"
    path.write_text(text)
    return path


def search_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "search.cli", *args], cwd=REPO, capture_output=True, text=True,
        timeout=timeout,
    )


def test_start_kill_resume_status_finalize_export_and_mergekit_rebuild(
    tmp_path: Path, demo_family_root: Path
) -> None:
    path = demo_study(tmp_path, demo_family_root)
    config = load_study(path)

    # 1. start, then SIGKILL once a trial is done and others of the generation are running.
    proc = subprocess.Popen(
        [sys.executable, "-m", "search.cli", "start", str(path), "--quiet"], cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 300
    killed_mid_trial = False
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
        study = open_running_study(config)
        if study is None:
            continue
        searched = [t for t in study.get_trials() if t.user_attrs.get("kind") == "search"]
        complete = sum(t.state == TrialState.COMPLETE for t in searched)
        running = sum(t.state == TrialState.RUNNING for t in searched)
        if complete >= 2 and running >= 1:
            os.kill(proc.pid, signal.SIGKILL)
            killed_mid_trial = True
            break
    proc.communicate(timeout=60)
    assert killed_mid_trial, "the study finished before it could be killed"
    before = {t.number: t for t in optuna.load_study(study_name=config.name, storage=config.storage).get_trials()}
    finished = [t for t in before.values() if t.state == TrialState.COMPLETE]
    running = [t for t in before.values() if t.state == TrialState.RUNNING]
    assert running

    # 2. start again: finishes the budget; nothing finished is lost, nothing duplicated.
    resumed = search_cli("start", str(path), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    study = storage.load_existing_study(config.name, config.storage)
    after = {t.number: t for t in study.get_trials()}
    for trial in finished:
        assert after[trial.number].state == TrialState.COMPLETE
        assert after[trial.number].values == trial.values
    for trial in running:
        assert after[trial.number].state == TrialState.FAIL
        assert after[trial.number].user_attrs["failure"] == ranking.DRIVER_STOPPED
        if set(trial.params):
            reruns = [t for t in after.values() if t.user_attrs.get("rerun_of") == trial.number]
            assert len(reruns) == 1 and reruns[0].params == trial.params
    searched = [t for t in after.values() if t.user_attrs.get("kind") == "search"]
    assert sum(ranking.counts_toward_budget(t) for t in searched) == BUDGET
    assert not [t for t in after.values() if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    names = sorted(ranking.baseline_trials(after.values()))
    assert names == ["default_ties", "source:catalog", "source:refunds", "source:shipping", "uniform_linear"]
    assert isinstance(study.user_attrs.get("final_trial"), int)

    # 3. status
    status = search_cli("status", str(path))
    assert status.returncode == 0, status.stderr
    assert f"trials: {BUDGET}/{BUDGET} done" in status.stdout
    assert "source:shipping" in status.stdout

    # 4. finalize (again: idempotent, same final trial)
    final = study.user_attrs["final_trial"]
    finalized = search_cli("finalize", str(path))
    assert finalized.returncode == 0, finalized.stderr + finalized.stdout
    assert f"final trial: {final}" in finalized.stdout
    assert "gap" in finalized.stdout

    # 5. export
    recipe = tmp_path / "recipe.yaml"
    exported = search_cli("export", str(path), "-o", str(recipe))
    assert exported.returncode == 0, exported.stderr
    text = recipe.read_text()
    assert f"# trial: {final} " in text and "# scores (held-out slices):" in text
    tested = study.user_attrs[f"test:{final}"]["scores_test"]  # the honest final score, in the header too
    assert ("# scores (test slices, scored once after the final choice): "
            + ", ".join(f"{task} {score:.4f}" for task, score in tested.items())) in text
    assert not list(tmp_path.glob("recipe.yaml.tmp-*"))

    # 6. mergekit rebuilds it; the rebuilt checkpoint scores what the study recorded.
    out = tmp_path / "rebuilt"
    mergekit = shutil.which("mergekit-yaml", path=str(Path(sys.executable).parent))
    assert mergekit is not None
    # from the folder the header names: the model paths are relative to it
    assert "# run from the folder that holds this file: mergekit-yaml recipe.yaml OUTPUT_FOLDER" in text
    built = subprocess.run([mergekit, recipe.name, str(out)], cwd=recipe.parent, capture_output=True, text=True,
                           timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(config.models.base)
    trial = study.get_trials()[final]
    heldout = storage.heldout_record(study.user_attrs, final)
    assert heldout is not None
    for task in config.tasks:
        data = load_task(task, tokenizer)
        rows = len(data.search.examples)
        # mergekit and the engine do the same float32 arithmetic in possibly different
        # orders; a last-bit difference can flip one near-tie argmax, i.e. one example.
        assert abs(score_slice(model, data.search) - trial.user_attrs["scores_search"][task.name]) <= 1 / rows
        assert abs(score_slice(model, data.heldout) - heldout.scores[task.name]) <= 1 / len(data.heldout.examples)
