"""``search dashboard`` on a real tiny study, checked through optuna-dashboard's HTTP API.

The study is run by the real driver (inline pool, ``llama_family``, a gate that splits the
candidates). The real command is started as a subprocess on a free loopback port; every
trial's scores, gate margins and ``gate_status``, recipe summary, feasibility (the
``constraints`` list that the dashboard's frontend tests with
``constraints.every(c => c <= 0)``), the recipe YAML artifacts and the notes on the chosen
trial and the baselines must be served. The *Best Trial* box (``best_trials``) holds the chosen
trial, never an infeasible trial or a baseline: studies built by hand in the same storage
check the cases a driver run cannot force. It is read-only: every writing route answers 403
and changes nothing; ``--allow-writes`` lets writes through, and a non-loopback ``--host``
warns. Ctrl-C must stop it cleanly.
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
from hypothesis import given
from hypothesis import strategies as st
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from fitness.gates import GateResult
from merges.mergekit_yaml import recipe_from_mergekit
from merges.recipe import Recipe
from search import ranking, storage
from search.annotate import chosen_trial
from search.cli import main
from search.commands.dashboard import is_loopback
from search.config import StudyConfig
from search.gate_record import gate_status, read_study_gates, read_trial_gates
from search.report import build_report
from tests.checkpoints import TinyFamily
from tests.processes import ctrl_c_works
from tests.studies import gated_study, run

optuna.logging.set_verbosity(optuna.logging.WARNING)

REPO = Path(__file__).resolve().parents[1]
STARTUP_S = 120.0  # a hang guard: a loaded machine may take a while to start the command


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    body: dict[str, Any] | None = None


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


def send(url: str, request: Request) -> tuple[int, Any]:
    """The status and JSON answer of one request (4xx/5xx answers included)."""
    data = None if request.body is None else json.dumps(request.body).encode()
    req = urllib.request.Request(  # noqa: S310 (loopback)
        url + request.path, data=data, method=request.method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as response:  # noqa: S310 (loopback)
            status, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    return status, json.loads(body) if body else None


def start_dashboard(path: Path, port: int, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "search.cli", "dashboard", str(path), "--port", str(port), *extra],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_works,
    )


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
    process = start_dashboard(path, port)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(process, url)
        yield Served(config, study, url, process)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=30)


def study_detail(served: Served, name: str | None = None) -> tuple[int, Any]:
    studies = get_json(f"{served.url}/api/studies")["study_summaries"]
    (summary,) = [s for s in studies if s["study_name"] == (name or served.config.name)]
    study_id = int(summary["study_id"])
    return study_id, get_json(f"{served.url}/api/studies/{study_id}")


def best_numbers(detail: Any) -> list[int]:
    return [int(t["number"]) for t in detail["best_trials"]]


def attrs(served_trial: Any) -> dict[str, str]:
    return {a["key"]: a["value"] for a in served_trial["user_attrs"]}


def by_number(trials: list[FrozenTrial]) -> dict[int, FrozenTrial]:
    return {t.number: t for t in trials}


def test_trials_serve_scores_named_gates_summary_and_feasibility(served: Served) -> None:
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
        # Each gate by name, with the score, the limit it was checked against and the margin.
        named = json.loads(values["gates"])
        assert named == trial.user_attrs["gates"]
        limits = {g.name: g.limit for g in read_study_gates(served.study.user_attrs).limits or []}
        assert list(named) == list(limits) == ["alpha.max_regression"]
        for name, gate in named.items():
            assert gate["limit"] == limits[name]
            assert gate["score"] == trial.user_attrs["scores_search"][name.split(".")[0]]
            assert gate["margin"] == pytest.approx(gate["score"] - gate["limit"], abs=1e-12)
            assert gate["passed"] is (gate["margin"] >= 0)
        margins = {g.name: g.margin for g in read_trial_gates(trial.user_attrs)}
        assert values["recipe_summary"] == trial.user_attrs["recipe_summary"]
        assert values["kind"] == ranking.kind(trial)
        if ranking.kind(trial) == ranking.KIND_BASELINE:
            assert values["baseline"] == trial.user_attrs["baseline"]
        # Which gate failed and by how much, in one line on the trial's page.
        status = values["gate_status"]
        assert status.startswith("feasible: " if trial.user_attrs["feasible"] else "infeasible: ")
        for gate, margin in margins.items():
            verdict, relation = ("passes", ">=") if margin > 0 else ("fails", "<") if margin < 0 else ("passes", "=")
            against = f"{named[gate]['score']:.4f} {relation} {named[gate]['limit']:.4f}"
            assert f"{gate} {verdict} by {abs(margin):.4g} ({against})" in status
        # The dashboard's frontend: feasible iff every constraint <= 0.
        constraints = shown["constraints"]
        assert constraints == [-m if m else 0.0 for m in margins.values()]
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
    for gate in read_trial_gates(chosen.user_attrs):
        assert gate.limit is not None and gate.score is not None
        assert f"| `{gate.name}` | {gate.margin:+.4f} |" in body
        assert f" | {gate.score:.4f} >= {gate.limit:.4f} |" in body  # the chosen trial passes
    for name in ranking.baseline_trials(served.study.get_trials()):
        assert f"| {name} (search) |" in body
    baselines = ranking.baseline_trials(served.study.get_trials())
    assert sorted(n for n, b in notes.items() if b) == sorted([chosen.number, *(t.number for t in baselines.values())])
    for name, trial in baselines.items():
        assert notes[trial.number].startswith(f"## Baseline `{name}`")
        assert "never the chosen recipe" in notes[trial.number]
    study_note = detail["note"]["body"]
    assert study_note.startswith(f"## Chosen recipe: trial {chosen.number}")
    # The report picks the same trial and shows the same gate margins.
    report = build_report(served.study, task_higher={t.name: True for t in served.config.tasks})
    assert f"data-trial='{chosen.number}'" in report
    for gate in read_trial_gates(chosen.user_attrs):
        assert f"{gate.margin:+.4f} pass" in report


# -- the Best Trial box ---------------------------------------------------------------------

Row = tuple[list[float], list[float], str]  # told values, constraints, kind


def hand_built_study(served: Served, name: str, directions: list[str], rows: list[Row]) -> optuna.Study:
    """A study in the served storage whose trials are exactly ``rows`` (numbered in order)."""
    study = optuna.create_study(
        study_name=name, storage=storage.resolve_storage(served.config.storage), directions=directions
    )
    for number, (values, constraints, kind) in enumerate(rows):
        # a scored trial as the driver stores it (ranking skips a trial without scores_search)
        attrs: dict[str, Any] = {"kind": kind, "scores_search": {"task": values[0]},
                                 "feasible": all(c <= 0 for c in constraints)}
        if kind == ranking.KIND_BASELINE:
            attrs["baseline"] = f"baseline-{number}"
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.COMPLETE, values=values, params={"x": 0.5},
            distributions={"x": FloatDistribution(0.0, 1.0)}, user_attrs=attrs,
            system_attrs={"constraints": constraints},
        ))
    return study


def test_the_best_trial_box_shows_the_chosen_trial(served: Served) -> None:
    # The driver's study: after finalize the box holds the final trial.
    _, detail = study_detail(served)
    assert best_numbers(detail) == [served.study.user_attrs["final_trial"]]
    # By hand: a baseline with the highest value and an infeasible trial above the feasible ones.
    study = hand_built_study(served, "best-by-hand", ["maximize"], [
        ([10.0], [0.0], "baseline"), ([9.0], [0.2], "search"), ([5.0], [-0.1], "search"),
        ([3.0], [0.0], "search"),
    ])
    assert study._storage.get_best_trial(study._study_id).number == 0  # what Optuna alone would show
    _, detail = study_detail(served, "best-by-hand")
    assert best_numbers(detail) == [2]  # before finalize: the best feasible search trial
    study.set_user_attr("final_trial", 3)
    _, detail = study_detail(served, "best-by-hand")
    assert best_numbers(detail) == [3]  # after: the final trial


def test_the_best_trial_box_is_empty_without_a_feasible_search_trial(served: Served) -> None:
    hand_built_study(served, "none-feasible", ["maximize"], [
        ([10.0], [0.0], "baseline"), ([9.0], [0.2], "search"), ([1.0], [0.0, 0.5], "search"),
    ])
    _, detail = study_detail(served, "none-feasible")
    assert len(detail["trials"]) == 3
    assert best_numbers(detail) == []


def test_several_objectives_show_only_feasible_search_trials_as_best(served: Served) -> None:
    # All four are on the Pareto front that optuna-dashboard computes (it ignores constraints).
    hand_built_study(served, "pareto-by-hand", ["maximize", "maximize"], [
        ([10.0, 0.0], [0.0], "baseline"), ([9.0, 1.0], [0.3], "search"), ([5.0, 5.0], [0.0], "search"),
        ([1.0, 9.0], [-0.2], "search"),
    ])
    _, detail = study_detail(served, "pareto-by-hand")
    assert sorted(best_numbers(detail)) == [2, 3]


# -- read-only unless --allow-writes ---------------------------------------------------------


def writing_requests(study_id: int, detail: Any) -> list[Request]:
    """One request per route of optuna-dashboard 0.21 that changes the storage or artifacts."""
    trial = next(t for t in detail["trials"] if t["artifacts"])
    trial_id, trial_artifact = trial["trial_id"], trial["artifacts"][0]["artifact_id"]
    study_artifact = detail["artifacts"][0]["artifact_id"]
    upload = {"file": "data:text/plain;base64,eA==", "filename": "x.txt"}
    note = {"version": 99, "body": "overwritten"}
    return [
        Request("DELETE", f"/api/studies/{study_id}"),
        Request("PUT", f"/api/studies/{study_id}/note", note),
        Request("PUT", f"/api/studies/{study_id}/{trial_id}/note", note),
        Request("POST", f"/api/trials/{trial_id}/tell", {"state": "fail"}),
        Request("POST", f"/api/trials/{trial_id}/user-attrs", {"user_attrs": {"x": 1}}),
        Request("POST", "/api/studies", {"study_name": "created", "directions": ["maximize"]}),
        Request("POST", f"/api/studies/{study_id}/rename", {"study_name": "renamed"}),
        Request("POST", f"/api/studies/{study_id}/preference", {"mode": "ChooseWorst", "candidates": [0, 1], "clicked": 0}),
        Request("PUT", f"/api/studies/{study_id}/preference_feedback_component", {"output_type": "note"}),
        Request("POST", f"/api/studies/{study_id}/{trial_id}/skip"),
        Request("POST", f"/api/artifacts/{study_id}/{trial_id}", upload),
        Request("POST", f"/api/artifacts/{study_id}", upload),
        Request("DELETE", f"/api/artifacts/{study_id}/{trial_id}/{trial_artifact}"),
        Request("DELETE", f"/api/artifacts/{study_id}/{study_artifact}"),
        Request("POST", "/incompatible-rdb-schema"),
    ]


def test_every_write_is_refused_and_changes_nothing(served: Served) -> None:
    study_id, before = study_detail(served)
    studies = get_json(f"{served.url}/api/studies")
    artifacts = sorted(p.name for p in (served.config.output / "artifacts").iterdir())
    for request in writing_requests(study_id, before):
        status, answer = send(served.url, request)
        assert status == 403, f"{request.method} {request.path} answered {status}: {answer}"
        assert "read-only" in answer["reason"] and "--allow-writes" in answer["reason"]
    assert get_json(f"{served.url}/api/studies") == studies
    _, after = study_detail(served)
    assert after == before  # trials, notes (the chosen trial's and the study's), artifacts
    assert sorted(p.name for p in (served.config.output / "artifacts").iterdir()) == artifacts


def test_allow_writes_lets_writes_through_and_a_public_host_warns(served: Served) -> None:
    study = hand_built_study(served, "writable", ["maximize"], [([1.0], [0.0], "search")])
    port = free_port()
    process = start_dashboard(served.config.path, port, "--allow-writes", "--host", "0.0.0.0")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(process, url)
        status, _ = send(url, Request("PUT", f"/api/studies/{study._study_id}/note", {"version": 1, "body": "kept"}))
        assert status == 204
        assert study_detail(served, "writable")[1]["note"]["body"] == "kept"
    finally:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)  # a hang guard
    assert process.returncode == 0, err
    assert "(read-write: --allow-writes)" in out
    assert "warning: --host 0.0.0.0: the dashboard has no login" in err
    assert "with --allow-writes, change or delete it" in err


_margins = st.floats(min_value=-10, max_value=10, allow_nan=False).map(lambda m: m if m else 0.0)


@given(st.dictionaries(st.from_regex(r"[a-z]{1,6}\.(min|max_regression)", fullmatch=True), _margins, max_size=5))
def test_gate_status_names_every_failed_gate_and_by_how_much(margins: dict[str, float]) -> None:
    gates = [GateResult(name, -m if m else 0.0, m, m >= 0) for name, m in margins.items()]
    status = gate_status(gates)
    failed = [g for g in gates if not g.passed]
    assert status.startswith("infeasible: " if failed else "feasible: ")
    for gate in gates:
        assert f"{gate.name} {'passes' if gate.passed else 'fails'} by {abs(gate.margin):.4g}" in status
    if failed:  # the failed gates come first
        assert status.index(f"{failed[-1].name} fails") < min(
            (status.index(f"{g.name} passes") for g in gates if g.passed), default=len(status)
        )


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.0.1.1", True), ("::1", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("192.0.2.7", False),
])
def test_only_loopback_hosts_count_as_local(host: str, loopback: bool) -> None:
    assert is_loopback(host) == loopback


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
    # The timeout is a hang guard. On a busy machine this used to pass 60 s: after "dashboard
    # stopped" the interpreter tore down torch and transformers, over a second of CPU a niced
    # process barely gets; the dashboard no longer imports them (tests/test_light.py).
    # A client holding a connection open without a request (a browser's preconnect, an idle
    # tab) must not keep it from stopping: it used to wait for that request's thread.
    idle = socket.create_connection(("127.0.0.1", int(served.url.rsplit(":", 1)[1])), timeout=30)
    get(f"{served.url}/api/meta")  # served while that connection sits idle
    try:
        served.process.send_signal(signal.SIGINT)
        out, err = served.process.communicate(timeout=60)
    finally:
        idle.close()
    assert served.process.returncode == 0, err
    assert f"(read-only): http://127.0.0.1:{served.url.rsplit(':', 1)[1]}/dashboard/studies/" in out
    assert "dashboard stopped" in out
    assert "Traceback" not in err
