"""One writer per study storage: an OS lock on a file derived from the storage URL.

``search start`` holds :func:`storage_lock` while it runs. The lock is ``flock`` on
a lock file (never deleted: unlinking a lock file lets a second process lock a new
file of the same name): the kernel releases it when the holder exits or is killed, so
there is no stale lock to take over and no race between processes taking one over.
Which file (:func:`lock_path`):

* ``sqlite:///PATH`` -> ``PATH.writer.lock``, ``journal:PATH`` -> ``PATH.writer.lock``: next to the
  study file, so every driver that opens that file meets the same lock, whatever its
  output folder;
* any other URL (a database server) -> ``~/.cache/mergesearch/locks/<sha256 of the
  URL>.writer.lock``: this guards one machine only (drivers on other machines do not see it);
* an in-memory SQLite database needs none (no other process can open it).

The holder writes a record into the file (pid, host, process start time, storage,
output folder) so that a refused driver can say who holds the lock, and whether that
process is still the one that took it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

from search.errors import SearchError

LOCK_SUFFIX = ".writer.lock"  # not ".lock": Optuna's journal backend locks "<journal>.lock" itself
JOURNAL_PREFIX = "journal:"
SQLITE_PREFIX = "sqlite:///"
RECORD_POLLS = 60
"""How often (every 50 ms, so up to 3 s on a busy machine) a refused taker looks again for
the current holder's record (not written yet, or the file still holds a dead holder's)."""


def lock_path(storage_url: str) -> Path | None:
    """The lock file of a storage URL (None: an in-memory database, which needs none)."""
    if storage_url.startswith(JOURNAL_PREFIX):
        return _beside(Path(storage_url[len(JOURNAL_PREFIX):]))
    if storage_url.startswith(SQLITE_PREFIX):
        path = storage_url[len(SQLITE_PREFIX):].split("?", 1)[0]
        if not path or path == ":memory:":
            return None
        return _beside(Path(path))
    if storage_url in ("sqlite://", "sqlite:///:memory:"):
        return None
    digest = hashlib.sha256(storage_url.encode()).hexdigest()[:32]
    return Path.home() / ".cache" / "mergesearch" / "locks" / f"{digest}{LOCK_SUFFIX}"


def _beside(path: Path) -> Path:
    path = path.expanduser().absolute()
    return path.with_name(path.name + LOCK_SUFFIX)


@dataclass(frozen=True)
class LockRecord:
    """Who took a lock: written by the holder, read by a refused driver for its message."""

    pid: int
    host: str
    started: float  # the holder process's start time (epoch seconds, psutil's create_time)
    storage: str
    output: str

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def read(cls, path: Path) -> LockRecord | None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(int(data["pid"]), str(data["host"]), float(data["started"]),
                       str(data["storage"]), str(data["output"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None  # not written yet (the holder is between lock and write) or not ours


def _start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _redact(url: str) -> str:
    """The URL without a password (it goes into a file others may read)."""
    if "://" not in url or "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    credentials, at, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***{at}{host}" if ":" in credentials else url


def describe_holder(path: Path) -> str:
    """Who holds the lock at ``path``, as far as its record and this machine can tell."""
    record = LockRecord.read(path)
    for _ in range(RECORD_POLLS):
        # The holder writes its record right after it took the lock; until then the file is
        # empty or still holds the record of a holder that has died.
        if record is not None and _is_alive(record):
            break
        time.sleep(0.05)
        record = LockRecord.read(path)
    if record is None:
        return f"{path} is locked by a process that left no record (`fuser {path}` names it)"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.started))
    who = f"pid {record.pid} on {record.host}, started {started}, output {record.output}"
    if _is_alive(record):
        return f"held by {who}"
    # The kernel still holds the lock for someone, but not for the recorded process: a
    # process it started (forked) kept the lock file open after it ended.
    now = _start_time(record.pid)
    state = "has exited" if now is None else "is now a different process (pid reused)"
    return (f"recorded holder {who} {state}, but a process it started still holds {path}; "
            f"`fuser -v {path}` names it; stop that process")


def _is_alive(record: LockRecord) -> bool:
    """The recorded process still runs (on another host: assumed, it cannot be checked here)."""
    if record.host != socket.gethostname():
        return True
    now = _start_time(record.pid)
    return now is not None and abs(now - record.started) < 1.0


@contextmanager
def storage_lock(storage_url: str, *, output: Path | str = "") -> Iterator[Path | None]:
    """Hold the study storage's writer lock for the block; SearchError when another holds it.

    Yields the lock file's path (None when the storage needs no lock).
    """
    path = lock_path(storage_url)
    if path is None:
        yield None
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise SearchError(f"{path}: cannot open the study's lock file: {exc.strerror or exc}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SearchError(
                f"storage {_redact(storage_url)}: another `search start` is writing this study storage "
                f"({describe_holder(path)}); wait for it or stop it (Ctrl-C) first, "
                "or give this study its own storage"
            ) from None
        record = LockRecord(os.getpid(), socket.gethostname(), _start_time(os.getpid()) or time.time(),
                            _redact(storage_url), str(output))
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, record.to_json().encode(), 0)
        except OSError:
            pass  # e.g. a full disk: the lock holds without its record; the storage's own error follows
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # the record is left empty; the file stays (see the module doc)
    finally:
        os.close(fd)  # closing the last descriptor releases the lock
