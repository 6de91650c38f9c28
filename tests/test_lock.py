"""The study storage's writer lock, with real processes.

Every taker is a separate Python process; the outcomes they report do not depend on
timing: a winner holds the lock until the test tells it to let go, so every other taker
tries while it is held.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from search.config import load_study
from search.driver import run_study
from search.errors import SearchError
from search.lock import lock_path, storage_lock
from tests.checkpoints import TinyFamily
from tests.studies import write_study

REPO = Path(__file__).resolve().parents[1]
HANG_GUARD_S = 120.0

# One taker: waits for the start file, tries the lock once, reports, and holds it until the
# stop file appears (so no other taker can get it while the test is still counting).
TAKER = """
import json, os, sys, time
from pathlib import Path
from search.errors import SearchError
from search.lock import storage_lock
url, start, stop, report = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
while not start.exists():
    time.sleep(0.005)
try:
    with storage_lock(url, output="taker"):
        report.with_suffix(".tmp").write_text(json.dumps({"got": True, "pid": os.getpid()}))
        report.with_suffix(".tmp").rename(report)
        while not stop.exists():
            time.sleep(0.01)
except SearchError as exc:
    report.with_suffix(".tmp").write_text(json.dumps({"got": False, "error": str(exc)}))
    report.with_suffix(".tmp").rename(report)
"""

# Takes the lock over and over; inside, creates a marker file exclusively: a second holder at
# the same moment would find it there.
CHURNER = """
import os, sys
from pathlib import Path
from search.errors import SearchError
from search.lock import storage_lock
url, marker, rounds = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
held = overlaps = 0
while held < rounds:
    try:
        with storage_lock(url):
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                overlaps += 1
            else:
                os.close(fd)
                os.unlink(marker)
            held += 1
    except SearchError:
        pass
print(overlaps)
"""

# Takes the lock and then blocks forever (the test kills it), or forks a child that keeps the
# lock file open and exits itself (a driver killed while a process it started lives on).
HOLDER = """
import os, sys, time
from search.lock import storage_lock
url, ready, fork = sys.argv[1], sys.argv[2], sys.argv[3] == "fork"
with storage_lock(url, output="/somewhere/out"):
    child = os.fork() if fork else 0
    if fork and child != 0:
        with open(ready + ".tmp", "w") as f:
            f.write(str(child))
        os.rename(ready + ".tmp", ready)
        os._exit(0)
    if not fork:
        open(ready, "w").close()
    while True:
        time.sleep(1)
"""


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def python(code: str, *args: str, pipes: bool = True) -> subprocess.Popen[str]:
    out = subprocess.PIPE if pipes else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, env=env(), text=True,
                            stdout=out, stderr=out)


def wait_for(path: Path, proc: subprocess.Popen[str] | None = None) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while not path.exists():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited before {path.name}: {proc.communicate()}")
        assert time.monotonic() < deadline, f"hang guard: {path} never appeared"
        time.sleep(0.02)


def hold(url: str, tmp_path: Path, *, fork: bool = False) -> tuple[subprocess.Popen[str], Path]:
    """A process holding the lock; with ``fork``, ready holds the pid of its child holding it too.

    (A forked child keeps the pipes open, so that holder's output goes nowhere.)
    """
    ready = tmp_path / f"ready-{time.monotonic_ns()}"
    proc = python(HOLDER, url, str(ready), "fork" if fork else "plain", pipes=not fork)
    wait_for(ready, proc if not fork else None)
    return proc, ready


def kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=HANG_GUARD_S)


def test_lock_file_is_derived_from_the_storage_not_the_output_folder(tmp_path: Path) -> None:
    db = tmp_path / "shared" / "study.db"
    assert lock_path(f"sqlite:///{db}") == db.with_name("study.db.writer.lock")
    journal = tmp_path / "study.journal"
    assert lock_path(f"journal:{journal}") == journal.with_name("study.journal.writer.lock")
    assert lock_path("sqlite:///:memory:") is None and lock_path("sqlite://") is None
    server = lock_path("postgresql://user:pw@db.example/studies")
    assert server is not None and server.name.endswith(".writer.lock")
    assert server == lock_path("postgresql://user:pw@db.example/studies")
    assert server != lock_path("postgresql://user:pw@db.example/other")


def test_the_lock_leaves_optuna_s_own_journal_lock_alone(tmp_path: Path) -> None:
    """Optuna's journal backend locks ``<journal>.lock`` around each append (and deletes a
    lock it finds held too long): the writer lock must not be that file."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    journal = tmp_path / "study.journal"
    url = f"journal:{journal}"
    with storage_lock(url) as path:
        study = optuna.create_study(storage=JournalStorage(JournalFileBackend(str(journal))))
        study.tell(study.ask(), 1.0)  # with the same name it waits for the lock, then deletes it
        assert not (tmp_path / "study.journal.lock").exists()
        assert path is not None and path.exists()
        with pytest.raises(SearchError, match="another `search start`"), storage_lock(url):
            pass


def test_killed_holder_is_taken_over_by_exactly_one_of_many_concurrent_takers(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    kill(hold(url, tmp_path)[0])  # the kernel released its lock; its record is still in the file
    start, stop = tmp_path / "start", tmp_path / "stop"
    reports = [tmp_path / f"report-{i}" for i in range(12)]
    takers = [python(TAKER, url, str(start), str(stop), str(r)) for r in reports]
    try:
        start.touch()
        for report, proc in zip(reports, takers, strict=True):
            wait_for(report, proc)
        results = [json.loads(r.read_text()) for r in reports]
        winners = [r for r in results if r["got"]]
        assert len(winners) == 1, results
        # A loser that looked before the winner wrote its record says so; none names another pid.
        named = (f"pid {winners[0]['pid']} on {socket.gethostname()}", "left no record")
        for loser in (r for r in results if not r["got"]):
            assert any(n in loser["error"] for n in named), loser
    finally:
        stop.touch()
        for proc in takers:
            _, err = proc.communicate(timeout=HANG_GUARD_S)
            assert proc.returncode == 0, err


def test_concurrent_churn_never_has_two_holders(tmp_path: Path) -> None:
    url = f"journal:{tmp_path / 'study.journal'}"
    marker = tmp_path / "inside"
    procs = [python(CHURNER, url, str(marker), "40") for _ in range(6)]
    outputs = [proc.communicate(timeout=HANG_GUARD_S) for proc in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
        assert out.strip() == "0", f"two holders at once: {out}"


def test_a_second_taker_in_the_same_process_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    with storage_lock(url), pytest.raises(SearchError, match=f"pid {os.getpid()}"), storage_lock(url):
        pass
    with storage_lock(url) as path:  # released on leaving the block; the file stays
        assert path is not None and path.exists()


def test_refusal_names_the_holder_pid_host_start_time_and_output(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    holder, _ = hold(url, tmp_path)
    try:
        with pytest.raises(SearchError) as caught, storage_lock(url):
            pass
        message = str(caught.value)
        assert f"pid {holder.pid} on {socket.gethostname()}, started 20" in message
        assert "output /somewhere/out" in message and str(tmp_path / "study.db") in message
    finally:
        kill(holder)
    with storage_lock(url):  # no stale lock left behind by the killed holder
        pass


def test_lock_kept_by_a_child_of_an_exited_holder_is_explained(tmp_path: Path) -> None:
    url = f"journal:{tmp_path / 'study.journal'}"
    parent, ready = hold(url, tmp_path, fork=True)
    parent.wait(timeout=HANG_GUARD_S)  # exited; its forked child keeps the lock
    child = int(ready.read_text())
    try:
        refused = f"pid {parent.pid} .* has exited, but a process it started"
        with pytest.raises(SearchError, match=refused), storage_lock(url):
            pass
    finally:
        os.kill(child, signal.SIGKILL)
    deadline = time.monotonic() + HANG_GUARD_S
    while True:  # the child is not ours to reap: wait until the kernel has released its lock
        try:
            with storage_lock(url):
                break
        except SearchError:
            assert time.monotonic() < deadline, "hang guard: the killed child's lock was never released"
            time.sleep(0.05)


def test_two_drivers_on_one_storage_with_different_outputs_are_refused(
    tmp_path: Path, llama_family: TinyFamily
) -> None:
    path = write_study(tmp_path, llama_family, trials=1)
    shared = f"sqlite:///{tmp_path / 'shared.db'}"
    first = load_study(path, out=tmp_path / "out-a")
    second = load_study(path, out=tmp_path / "out-b")
    first, second = replace(first, storage=shared), replace(second, storage=shared)
    holder, _ = hold(shared, tmp_path)  # the first driver, still running
    try:
        with pytest.raises(SearchError, match=f"another `search start` .*pid {holder.pid}"):
            run_study(second, quiet=True)
    finally:
        kill(holder)  # killed: its lock goes with it, no takeover needed
    assert run_study(second, quiet=True).done == 1
    assert not (tmp_path / "out-a").exists() and first.storage == second.storage
