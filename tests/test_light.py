"""Light commands stay light: ``status``, ``export`` (without ``--materialize``) and ``dashboard``
never import torch, transformers or datasets.

Each command runs in a fresh interpreter (``python -c`` calling ``search.cli.main``) on a
finished tiny study, and prints which of the heavy packages ended up in ``sys.modules``
after ``main`` returned. The dashboard is queried over HTTP first (study list, the study's
trials and Best Trial box, its page), then stopped with Ctrl-C: ``main`` must return
normally (the line after it runs) with exit status 0.
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
from pathlib import Path

import pytest

from search.config import StudyConfig
from tests.checkpoints import TinyFamily
from tests.processes import ctrl_c_works
from tests.studies import run, write_study

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "datasets")
HANG_GUARD_S = 300  # only against a hang; nothing here is timed
MARK = "loaded heavy modules: "


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, llama_family: TinyFamily) -> tuple[Path, StudyConfig]:
    """A tiny study run to its end (baselines, one search trial, finalize)."""
    folder = tmp_path_factory.mktemp("light")
    path = write_study(folder, llama_family, trials=1, top_k=1)
    config, _ = run(path)
    return path, config


def command(argv: list[str]) -> list[str]:
    """``python -c``: run ``search.cli.main(argv)``, then print the heavy modules it loaded."""
    code = (
        "import sys\n"
        "from search.cli import main\n"
        f"status = main({argv!r})\n"
        f"print({MARK!r} + ','.join(m for m in {HEAVY!r} if m in sys.modules), flush=True)\n"
        "sys.exit(status)\n"
    )
    return [sys.executable, "-c", code]


def heavy_loaded(stdout: str) -> list[str]:
    lines = [line for line in stdout.splitlines() if line.startswith(MARK)]
    assert lines, f"main did not return normally; stdout:\n{stdout}"
    return [name for name in lines[-1].removeprefix(MARK).split(",") if name]


def run_light(argv: list[str]) -> str:
    done = subprocess.run(command(argv), cwd=REPO, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_status_imports_no_torch(finished: tuple[Path, StudyConfig]) -> None:
    path, config = finished
    out = run_light(["status", str(path)])
    assert f"study {config.name}" in out
    assert heavy_loaded(out) == []


def test_export_without_materialize_imports_no_torch(finished: tuple[Path, StudyConfig],
                                                     tmp_path: Path) -> None:
    path, _ = finished
    recipe = tmp_path / "recipe.yaml"
    out = run_light(["export", str(path), "-o", str(recipe)])
    assert recipe.read_text().startswith("# mergesearch export")
    assert heavy_loaded(out) == []


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 (loopback)
        return bytes(response.read())


def test_dashboard_imports_no_torch_and_returns_on_ctrl_c(finished: tuple[Path, StudyConfig]) -> None:
    path, config = finished
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(command(["dashboard", str(path), "--port", str(port)]), cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=ctrl_c_works)
    try:
        deadline = time.monotonic() + HANG_GUARD_S
        while True:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the dashboard did not answer (hang guard)"
            try:
                studies = json.loads(get(f"{url}/api/studies"))["study_summaries"]
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        (summary,) = [s for s in studies if s["study_name"] == config.name]
        detail = json.loads(get(f"{url}/api/studies/{summary['study_id']}"))
        assert detail["trials"] and detail["best_trials"]  # the chosen trial and feasibility code ran
        assert get(f"{url}/dashboard/studies/{summary['study_id']}")
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=HANG_GUARD_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    assert "dashboard stopped" in out
    assert heavy_loaded(out) == []


def test_notes_are_written_without_the_dashboard_package(tmp_path: Path) -> None:
    """The driver writes notes (``search.annotate``) without importing optuna_dashboard, whose
    ``__init__`` loads its web app and sklearn (~0.9 s of every ``search start``); the stored
    attrs are exactly what optuna-dashboard's own ``save_note`` writes (a body over one
    2045-character chunk, written twice so the version counts up and a stale chunk is cleared)."""
    import optuna
    from optuna_dashboard import get_note, save_note

    bodies = ["x" * 2045 + "tail" * 600, "short"]
    # Two storages with the same ids (a trial's note is keyed by its trial id).
    url, their_url = (f"sqlite:///{tmp_path / name}" for name in ("ours.db", "theirs.db"))
    code = (
        "import sys, optuna\n"
        "from search.annotate import _save_note\n"
        f"study = optuna.create_study(study_name='notes', storage={url!r})\n"
        "trial = study.ask()\n"
        f"for body in {bodies!r}:\n"
        "    _save_note()(study, body)\n"
        "    _save_note()(trial, body[::-1])\n"
        "print(MARK + ','.join(m for m in ('optuna_dashboard', 'sklearn') if m in sys.modules))\n"
    ).replace("MARK", repr(MARK))
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=HANG_GUARD_S)
    assert done.returncode == 0, done.stderr
    assert heavy_loaded(done.stdout) == []
    theirs = optuna.create_study(study_name="notes", storage=their_url)
    their_trial = theirs.ask()
    for body in bodies:
        save_note(theirs, body)
        save_note(their_trial, body[::-1])
    ours = optuna.load_study(study_name="notes", storage=url)
    attrs = ours._storage.get_study_system_attrs(ours._study_id)
    assert attrs == theirs._storage.get_study_system_attrs(theirs._study_id)
    assert attrs["dashboard:note_ver"] == 2
    assert get_note(ours) == "short"
