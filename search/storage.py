"""Where a study lives: storage URLs, creating or loading the study, held-out records.

The driver is the only process that writes the storage. ``status``/``export``/``report``/
``dashboard`` only read it, and never create it when it is missing.

Optuna refuses to change a finished trial (``check_trial_is_updatable``), so numbers that
arrive after a trial is told (its held-out re-score) are kept as study user attributes
``heldout:<trial number>`` holding ``{"scores_heldout", "gate_margins_heldout",
"feasible_heldout", "rows_heldout"}`` (``rows_heldout``: the per-row values, encoded by
``search.records``; absent on records from before they were kept); :func:`heldout_record`
reads them back (``search.records.trial_rows`` decodes the rows).
"""

from __future__ import annotations

import errno
import os
import resource
import shutil
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.exceptions import StorageInternalError
from optuna.samplers import BaseSampler
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from sqlalchemy import event
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from search.definition import check_definition
from search.errors import SearchError, StudyConfigError
from search.records import HELDOUT_KEY_PREFIX, HeldoutRecord, heldout_record  # noqa: F401  (re-exported)

JOURNAL_PREFIX = "journal:"
START_HINT = "start one with `search start STUDY.toml`"


class NoStudyYetError(SearchError):
    """A read-only command found no study: nothing was created, ``search start`` makes one."""


def resolve_storage(url: str, *, create: bool = True) -> BaseStorage:
    """The Optuna storage for a URL: ``journal:PATH``, ``sqlite:///PATH`` or any SQLAlchemy URL.

    ``create=False`` (the read-only commands): a storage that does not exist yet raises
    :class:`NoStudyYetError` instead of being created (no folder, file or tables written).
    """
    if url.startswith(JOURNAL_PREFIX):
        path = Path(url[len(JOURNAL_PREFIX):]).expanduser()
        if not create and not path.is_file():
            raise NoStudyYetError(f"no study yet: the journal {path} does not exist; {START_HINT}")
        with storage_errors(url, "create"):
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(_WholeLinesJournal(str(path)))
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):]).expanduser()
        if not create and not path.is_file():
            raise NoStudyYetError(f"no study yet: the storage {path} does not exist; {START_HINT}")
        # SQLite creates the file but not its folder.
        path.parent.mkdir(parents=True, exist_ok=True)
    if not create and not _has_optuna_tables(url):
        raise NoStudyYetError(f"no study yet: storage {url!r} holds no Optuna tables; {START_HINT}")
    # Read-only commands hold no pooled connection: an open SQLite connection keeps -wal/-shm
    # files beside the study until garbage collection, so a command would change the folder.
    engine_kwargs = {} if create else {"poolclass": NullPool}
    try:
        storage = RDBStorage(url, engine_kwargs=engine_kwargs)
    except (OSError, SQLAlchemyError, StorageInternalError) as exc:
        if storage_file(url) is None:
            raise SearchError(f"storage {url!r}: cannot open: {exc}") from exc
        raise StorageWriteError(describe_storage_error(exc, url, "open")) from exc
    except Exception as exc:  # SQLAlchemy raises many types for a bad URL
        raise SearchError(f"storage {url!r}: cannot open: {exc}") from exc
    if url.startswith("sqlite") and create:  # a read-only command leaves the journal mode as it is
        _write_ahead_log(storage)
    return storage  # create_study / load_study wrap it in Optuna's cache


def _has_optuna_tables(url: str) -> bool:
    """Whether an SQLAlchemy database already holds Optuna's schema (looked up, nothing written)."""
    try:
        engine = sqlalchemy.create_engine(url)
    except Exception as exc:  # a malformed URL, a missing driver module
        raise SearchError(f"storage {url!r}: cannot open: {exc}") from exc
    try:
        return sqlalchemy.inspect(engine).has_table("studies")
    except Exception as exc:  # the server is unreachable, credentials are wrong
        raise SearchError(f"storage {url!r}: cannot open: {exc}") from exc
    finally:
        engine.dispose()


def _write_ahead_log(storage: RDBStorage) -> None:
    """WAL journal with ``synchronous=NORMAL`` on every SQLite connection.

    Optuna commits once per parameter and attribute; with SQLite's default rollback
    journal each commit is an fsync (about 10 ms here: 0.74 s of storage time per trial
    of the demo genome, more than the trial itself). In WAL mode a commit survives a
    killed process (what resume relies on) and only a power loss can drop the last few;
    readers (status, dashboard) no longer block the driver either.
    """

    def on_connect(connection: object, _record: object) -> None:
        cursor = connection.cursor()  # type: ignore[attr-defined]
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    event.listen(storage.engine, "connect", on_connect)
    storage.engine.dispose()  # connections opened before the listener get replaced


class _WholeLinesJournal(JournalFileBackend):
    """A journal file that never keeps half a record.

    A failed append (a full disk) can leave a partial last line; Optuna skips it, but the
    next append would be glued to it and make the journal unreadable from there. The
    partial line is cut off at once (truncating needs no space).
    """

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        try:
            super().append_logs(logs)
        except OSError:
            _cut_partial_line(Path(self._file_path))
            raise


def _cut_partial_line(path: Path) -> None:
    with path.open("rb+") as f:
        size = f.seek(0, os.SEEK_END)
        keep = size
        while keep > 0:
            step = min(keep, 1 << 16)
            f.seek(keep - step)
            block = f.read(step)
            newline = block.rfind(b"\n")
            if newline >= 0:
                keep = keep - step + newline + 1
                break
            keep -= step
        if keep < size:
            f.truncate(keep)


class StorageWriteError(SearchError):
    """The study storage could not be read or written (full disk, no permission, I/O error)."""


def storage_file(url: str) -> Path | None:
    """The file holding a ``journal:`` or ``sqlite:///`` storage (None: a database server)."""
    if url.startswith(JOURNAL_PREFIX):
        return Path(url[len(JOURNAL_PREFIX):]).expanduser()
    if url.startswith("sqlite:///") and url[len("sqlite:///"):] not in ("", ":memory:"):
        return Path(url[len("sqlite:///"):].split("?", 1)[0]).expanduser()
    return None


@contextmanager
def storage_errors(url: str, doing: str = "write") -> Iterator[None]:
    """Turn a failed access to the study storage into one line: the file and the cause.

    Optuna reports every failed commit as "invalid data ... e.g. exceeding max length",
    whatever the cause; the cause is in the exception chain (an errno, or SQLite's error
    name) and in the state of the file system.
    """
    try:
        yield
    except (OSError, SQLAlchemyError, StorageInternalError) as exc:
        raise StorageWriteError(describe_storage_error(exc, url, doing)) from exc


def describe_storage_error(exc: BaseException, url: str, doing: str = "write") -> str:
    file = storage_file(url)
    where = str(file) if file is not None else _redact(url)
    cause = _cause(exc)
    hint = ""
    if file is not None:
        folder = next((p for p in file.parents if p.exists()), Path("/"))
        free = shutil.disk_usage(folder).free
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        sizes = [p.stat().st_size for p in (file, file.with_name(file.name + "-wal")) if p.exists()]
        if free < FULL_BELOW_BYTES:
            hint = f"; {free} bytes free on {folder}" + ("" if "ENOSPC" in cause else " (the disk is full, ENOSPC)")
        elif limit != resource.RLIM_INFINITY and any(size + FULL_BELOW_BYTES >= limit for size in sizes):
            hint = f"; the file reached this process's file size limit, ulimit -f = {limit} bytes (EFBIG)"
    return (
        f"storage {where}: cannot {doing} the study: {cause}{hint}. Every trial stored as finished is "
        "complete (its results are written with or before its state); free space or fix the cause, "
        "then run `search start` again to resume"
    )


FULL_BELOW_BYTES = 1 << 20
"""Free space under which a failed write is put down to a full file system."""


def _cause(exc: BaseException) -> str:
    """The root cause in an exception chain: an errno, or SQLite's error name."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            name = errno.errorcode.get(seen.errno, str(seen.errno))
            return f"{seen.strerror or os.strerror(seen.errno)} ({name})"
        if isinstance(seen, sqlite3.Error):
            name = getattr(seen, "sqlite_errorname", "")
            return f"{seen} ({name})" if name else str(seen)
        seen = seen.__cause__ or seen.__context__
    return f"{type(exc).__name__}: {exc}"


def _redact(url: str) -> str:
    if "://" in url and "@" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.rpartition('@')[2]}"
    return url


def open_study(
    name: str, storage_url: str, directions: Sequence[str], *, sampler: BaseSampler | None = None,
    definition: Mapping[str, object] | None = None,
) -> optuna.Study:
    """Create the study or load it by name; its directions must match the config's.

    ``definition`` (``search.definition.study_definition``): stored on a new study; an
    existing study defined otherwise is refused, naming what changed.
    """
    storage = resolve_storage(storage_url)
    with storage_errors(storage_url, "create"):
        study = optuna.create_study(
            study_name=name, storage=storage, sampler=sampler, directions=list(directions),
            load_if_exists=True,
        )
    stored = [d.name.lower() for d in study.directions]
    if stored != [d.lower() for d in directions]:
        raise StudyConfigError(
            f"study {name!r} in {storage_url} was created with directions {stored}, "
            f"but the config now asks for {list(directions)} (objective or tasks changed): "
            "use a new study name or output folder"
        )
    if definition is not None:
        with storage_errors(storage_url):
            check_definition(study, definition, storage_url)
    if isinstance(storage, RDBStorage):
        storage.engine.dispose()  # no pooled connection left open (see WriteBehindStorage.close)
    return study


def load_existing_study(
    name: str, storage_url: str, *, sampler: BaseSampler | None = None
) -> optuna.Study:
    """Load a study that must exist (``status``, ``export``, ``report``, ``dashboard``, ``finalize``).

    Read-only: a storage that does not exist yet is not created (:class:`NoStudyYetError`).
    """
    storage = resolve_storage(storage_url, create=False)
    names = optuna.get_all_study_names(storage)  # not the summaries: those read every trial
    if name not in names:
        raise NoStudyYetError(
            f"no study named {name!r} in {storage_url} yet (found: {', '.join(names) or 'none'}); {START_HINT}"
        )
    return optuna.load_study(study_name=name, storage=storage, sampler=sampler)


def save_heldout(study: optuna.Study, trial_number: int, record: HeldoutRecord) -> None:
    study.set_user_attr(f"{HELDOUT_KEY_PREFIX}{trial_number}", record.to_json())
