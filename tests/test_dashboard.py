"""``search dashboard`` on a real tiny study, checked through optuna-dashboard's HTTP API.

The study is run by the real driver (inline pool, ``llama_family``, a gate that splits the
candidates). The real command is started as a subprocess on a free loopback port; every
trial's scores, gate margins, recipe summary, feasibility (the ``constraints`` list that
the dashboard's frontend tests with ``constraints.every(c => c <= 0)``), the recipe YAML
artifacts and the note on the chosen trial must be served. Ctrl-C must stop it cleanly.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

from merges.mergekit_yaml import recipe_from_mergekit
from merges.recipe import Recipe
from search import ranking
from search.annotate import chosen_trial
from search.cli import main
from search.config import StudyConfig
from search.report import build_report
from tests.checkpoints import TinyFamily
from tests.studies import gated_study, run

optuna.logging.set_verbosity(optuna.logging.WARNING)

REPO = Path(__file__).resolve().parents[1]
STARTUP_S = 120.0  # bounded: the command imports torch/transformers before it serves


@dataclass(frozen=True)
class Served:
    config: StudyConfig
    study: optuna.Study
    url: str
    process: subprocess.Popen[str]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str, *, timeout: float = 30.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (loopback)
        return bytes(response.read())


def get_json(url: str) -> Any:  # the dashboard's JSON, checked field by field below
    return json.loads(get(url))


def wait_until_serving(process: subprocess.Popen[str], url: str) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            out, err = process.communicate(timeout=10)
            raise AssertionError(f"dashboard exited with {process.returncode}: {out}\n{err}")
        try:
            get(f"{url}/api/meta", timeout=2.0)
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    raise AssertionError(f"dashboard did not answer at {url} within {STARTUP_S:.0f} s")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, llama_family: TinyFamily) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("dashboard")
    path = gated_study(folder, llama_family, trials=6)
    config, study = run(path)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "search.cli", "dashboard", str(path), "--port", str(port)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(process, url)
        yield Served(config, study, url, process)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=30)


def study_detail(served: Served) -> tuple[int, Any]:
    studies = get_json(f"{served.url}/api/studies")["study_summaries"]
    (summary,) = [s for s in studies if s["study_name"] == served.config.name]
    study_id = int(summary["study_id"])
    return study_id, get_json(f"{served.url}/api/studies/{study_id}")


def attrs(served_trial: Any) -> dict[str, str]:
    return {a["key"]: a["value"] for a in served_trial["user_attrs"]}


def by_number(trials: list[FrozenTrial]) -> dict[int, FrozenTrial]:
    return {t.number: t for t in trials}


def test_trials_serve_scores_gate_margins_summary_and_feasibility(served: Served) -> None:
    _, detail = study_detail(served)
    stored = by_number(served.study.get_trials())
    trials = detail["trials"]
    assert isinstance(trials, list) and len(trials) == len(stored)
    feasibility = set()
    for shown in trials:
        trial = stored[shown["number"]]
        if trial.state != TrialState.COMPLETE:
            continue
        values = attrs(shown)
        assert json.loads(values["scores_search"]) == trial.user_attrs["scores_search"]
        assert json.loads(values["gate_margins"]) == trial.user_attrs["gate_margins"]
        assert values["recipe_summary"] == trial.user_attrs["recipe_summary"]
        assert values["kind"] == ranking.kind(trial)
        if ranking.kind(trial) == ranking.KIND_BASELINE:
            assert values["baseline"] == trial.user_attrs["baseline"]
        # The dashboard's frontend: feasible iff every constraint <= 0.
        constraints = shown["constraints"]
        assert constraints == [-m if m else 0.0 for m in trial.user_attrs["gate_margins"].values()]
        dashboard_feasible = all(c <= 0 for c in constraints)
        assert dashboard_feasible == ranking.is_feasible(trial) == trial.user_attrs["feasible"]
        if ranking.kind(trial) == ranking.KIND_SEARCH:
            feasibility.add(dashboard_feasible)
    assert feasibility == {True, False}, "the gate should split the search trials"
    kinds = {attrs(t)["kind"] for t in trials}
    assert kinds == {"baseline", "search"}


def test_every_search_trial_serves_its_mergekit_yaml(served: Served) -> None:
    study_id, detail = study_detail(served)
    stored = by_number(served.study.get_trials())
    searched = [
        t for t in detail["trials"]
        if stored[t["number"]].state == TrialState.COMPLETE and ranking.kind(stored[t["number"]]) == "search"
    ]
    assert searched
    for shown in searched:
        trial = stored[shown["number"]]
        artifacts = shown["artifacts"]
        assert [a["filename"] for a in artifacts] == [f"recipe-{trial.number}.yaml"], (
            f"trial {trial.number} has no recipe artifact: search/driver.py must call "
            "search.annotate.attach_recipe before telling the trial (see search/annotate.py)"
        )
        (artifact,) = artifacts
        assert artifact["mimetype"] == "application/yaml"
        text = get(f"{served.url}/artifacts/{study_id}/{shown['trial_id']}/{artifact['artifact_id']}").decode()
        assert f"trial {trial.number}" in text.splitlines()[0]
        assert recipe_from_mergekit(text) == Recipe.from_dict(trial.user_attrs["recipe"])
    # Baselines are stored finished, so their YAML is a study artifact.
    names = sorted(a["filename"] for a in detail["artifacts"])
    baselines = ranking.baseline_trials(served.study.get_trials())
    assert names == sorted(f"baseline-{n.replace(':', '-')}.yaml" for n in baselines)


def test_the_chosen_trial_carries_a_note_with_why_and_its_gates(served: Served) -> None:
    _, detail = study_detail(served)
    chosen = chosen_trial(served.study)
    assert chosen is not None and chosen.number == served.study.user_attrs["final_trial"]
    notes = {t["number"]: t["note"]["body"] for t in detail["trials"]}
    body = notes[chosen.number]
    assert body.startswith(f"## Chosen recipe: trial {chosen.number}")
    assert "It is the final trial" in body
    for gate, margin in chosen.user_attrs["gate_margins"].items():
        assert f"| `{gate}` | {margin:+.4f} |" in body
    for name in ranking.baseline_trials(served.study.get_trials()):
        assert f"| {name} (search) |" in body
    assert [n for n, b in notes.items() if b] == [chosen.number]
    study_note = detail["note"]["body"]
    assert study_note.startswith(f"## Chosen recipe: trial {chosen.number}")
    # The report picks the same trial and shows the same gate margins.
    report = build_report(served.study, task_higher={t.name: True for t in served.config.tasks})
    assert f"data-trial='{chosen.number}'" in report
    for margin in chosen.user_attrs["gate_margins"].values():
        assert f"{margin:+.4f} pass" in report


def test_a_taken_port_or_a_missing_study_is_a_one_line_error(
    served: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = served.url.rsplit(":", 1)[1]
    taken = subprocess.run(
        [sys.executable, "-m", "search.cli", "dashboard", str(served.config.path), "--port", port],
        cwd=REPO, capture_output=True, text=True, timeout=STARTUP_S,
    )
    assert taken.returncode == 2
    assert taken.stderr.startswith(f"error: --host 127.0.0.1 --port {port}: cannot serve there")
    assert len(taken.stderr.strip().splitlines()) == 1
    # A study file whose study was never started: nothing is served.
    other = tmp_path / "other.toml"
    other.write_text(served.config.path.read_text().replace('name = "tiny"', 'name = "never-started"'))
    assert main(["dashboard", str(other), "--port", port]) == 2
    assert "error: no study named 'never-started'" in capsys.readouterr().err
    assert get_json(f"{served.url}/api/meta")  # the running dashboard is unaffected


def test_ctrl_c_stops_the_dashboard_cleanly(served: Served) -> None:
    # Runs last in this module (pytest keeps file order): the server goes down here.
    served.process.send_signal(signal.SIGINT)
    out, err = served.process.communicate(timeout=60)
    assert served.process.returncode == 0, err
    assert f"http://127.0.0.1:{served.url.rsplit(':', 1)[1]}/dashboard/studies/" in out
    assert "dashboard stopped" in out
    assert "Traceback" not in err
