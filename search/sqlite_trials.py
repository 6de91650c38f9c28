"""A study read straight from an Optuna SQLite file, without Optuna: ``search status``'s fast path.

Importing Optuna and opening an ``RDBStorage`` (SQLAlchemy, alembic) costs most of a
second before one trial is read; ``status`` only reads. :func:`read_study` opens the file
with Python's ``sqlite3`` in read-only mode and returns :class:`StudyRecord` /
:class:`TrialRecord`: the read-only part of ``optuna.Study`` / ``FrozenTrial`` that
``search.ranking``, ``progress``, ``gate_record`` and ``warm_start_line`` use, decoded as
Optuna 5's ``storages/_rdb`` decodes it (JSON attribute values, ``value_type``
INF_POS/INF_NEG/FINITE, datetimes stored as naive UTC and shown as naive local time).

This reads Optuna's private schema. Only the layout checked against optuna's
``storages/_rdb/models.py`` (:data:`SCHEMA`) is read; any other version, a journal file, a
server URL or an unreadable file returns None and the caller opens the study with Optuna,
which also gives the one error message for a missing study. ``tests/test_optuna_private.py``
fails when Optuna's schema moves.

Nothing is written: a file whose writer is not running (no ``-wal``/``-journal`` beside it)
is read as immutable, so not even SQLite's ``-wal``/``-shm`` files appear next to it, and the
read is kept only if the file did not change meanwhile; otherwise (``search start`` is
writing) it is read in WAL read-only mode with a busy timeout.
"""

from __future__ import annotations

import enum
import json
import sqlite3
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

SCHEMA = ("v3.2.0.a", 12)
"""(alembic revision, ``version_info.schema_version``) whose tables this module reads: optuna 5.0."""
BUSY_TIMEOUT_S = 30.0  # hang guard while the driver holds a write lock (WAL readers rarely wait)
_SQLITE_PREFIX = "sqlite:///"


class TrialStateName(enum.Enum):
    """Optuna's trial states, by the names its ``trials.state`` column stores (ranking compares names)."""

    RUNNING = 0
    COMPLETE = 1
    PRUNED = 2
    FAIL = 3
    WAITING = 4


class DirectionName(enum.Enum):
    """Optuna's study directions, by the names its ``study_directions.direction`` column stores."""

    NOT_SET = 0
    MINIMIZE = 1
    MAXIMIZE = 2


@dataclass(frozen=True)
class TrialRecord:
    """One trial as stored; the read-only fields of ``optuna.trial.FrozenTrial`` that status uses."""

    number: int
    state: TrialStateName
    values: list[float] | None
    params: dict[str, float]  # as stored: Optuna's internal float (a categorical's choice index)
    user_attrs: dict[str, object]
    system_attrs: dict[str, object]
    datetime_start: datetime | None
    datetime_complete: datetime | None

    @property
    def constraints(self) -> dict[str, float]:
        """As ``FrozenTrial.constraints``: the ``constraints`` list by index, then ``constraints:<key>``."""
        found: dict[str, float] = {}
        stored = self.system_attrs.get("constraints")
        if isinstance(stored, list):
            found.update({str(i): c for i, c in enumerate(stored)})
        found.update({k[len("constraints:"):]: v for k, v in self.system_attrs.items()  # type: ignore[misc]
                      if k.startswith("constraints:")})
        return found


@dataclass(frozen=True)
class StudyRecord:
    """A study as stored; ``study_name``, ``directions``, ``user_attrs`` and ``get_trials`` as on ``optuna.Study``."""

    study_name: str
    directions: list[DirectionName]
    user_attrs: dict[str, object]
    trials: list[TrialRecord] = field(default_factory=list)  # in trial_id order, as Optuna returns them

    def get_trials(self, deepcopy: bool = False) -> list[TrialRecord]:
        return list(self.trials)


def sqlite_file(url: str) -> Path | None:
    """The file of a plain ``sqlite:///PATH`` URL (None: another storage, or a URL with options)."""
    if not url.startswith(_SQLITE_PREFIX):
        return None
    path = url[len(_SQLITE_PREFIX):]
    if path in ("", ":memory:") or any(c in path for c in "?#%"):
        return None  # options or escapes: SQLAlchemy's reading of them is not repeated here
    return Path(path).expanduser()


def read_study(url: str, name: str) -> StudyRecord | None:
    """The study ``name`` of an SQLite storage, or None when Optuna must read it (see the module)."""
    path = sqlite_file(url)
    if path is None or not path.is_file():
        return None
    try:
        if not any(path.with_name(path.name + end).exists() for end in ("-wal", "-journal")):
            before = _identity(path)
            study = _read(path, name, immutable=True)
            if _identity(path) == before and not path.with_name(path.name + "-journal").exists():
                return study
        return _read(path, name, immutable=False)
    except (OSError, sqlite3.Error, ValueError, KeyError):
        return None  # not a database, a table missing, a value Optuna would not have stored


def _identity(path: Path) -> tuple[int, int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _read(path: Path, name: str, *, immutable: bool) -> StudyRecord | None:
    uri = f"file:{quote(str(path.absolute()))}?mode=ro" + ("&immutable=1" if immutable else "")
    connection = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        connection.execute("BEGIN")  # one read transaction: a consistent snapshot while the driver writes
        return _read_study(connection, name)
    finally:
        connection.close()


def _read_study(db: sqlite3.Connection, name: str) -> StudyRecord | None:
    revision = db.execute("SELECT version_num FROM alembic_version").fetchall()
    schema = db.execute("SELECT schema_version FROM version_info").fetchall()
    if revision != [(SCHEMA[0],)] or schema != [(SCHEMA[1],)]:
        return None
    found = db.execute("SELECT study_id FROM studies WHERE study_name = ?", (name,)).fetchone()
    if found is None:
        return None
    study_id = found[0]
    directions = [DirectionName[d] for (d,) in db.execute(
        "SELECT direction FROM study_directions WHERE study_id = ? ORDER BY objective", (study_id,))]
    user_attrs = {k: json.loads(v) for k, v in db.execute(
        "SELECT key, value_json FROM study_user_attributes WHERE study_id = ?", (study_id,))}
    rows = db.execute(
        "SELECT trial_id, number, state, datetime_start, datetime_complete FROM trials "
        "WHERE study_id = ? ORDER BY trial_id", (study_id,)).fetchall()
    of_study = "trial_id IN (SELECT trial_id FROM trials WHERE study_id = ?)"
    values: dict[int, dict[int, float]] = {}
    for trial_id, objective, value, kind in db.execute(
            f"SELECT trial_id, objective, value, value_type FROM trial_values WHERE {of_study}", (study_id,)):
        values.setdefault(trial_id, {})[objective] = _stored_value(value, kind)
    params: dict[int, dict[str, float]] = {}
    for trial_id, param, value in db.execute(
            f"SELECT trial_id, param_name, param_value FROM trial_params WHERE {of_study} ORDER BY param_id",
            (study_id,)):
        params.setdefault(trial_id, {})[param] = value
    user = _attrs(db, "trial_user_attributes", of_study, study_id)
    system = _attrs(db, "trial_system_attributes", of_study, study_id)
    trials = [
        TrialRecord(
            number=number, state=TrialStateName[state],
            values=[values[trial_id][i] for i in range(len(values[trial_id]))] if trial_id in values else None,
            params=params.get(trial_id, {}), user_attrs=user.get(trial_id, {}),
            system_attrs=system.get(trial_id, {}), datetime_start=_local(start), datetime_complete=_local(end),
        )
        for trial_id, number, state, start, end in rows
    ]
    return StudyRecord(name, directions, user_attrs, trials)


def _attrs(db: sqlite3.Connection, table: str, of_study: str, study_id: int) -> dict[int, dict[str, object]]:
    out: dict[int, dict[str, object]] = {}
    for trial_id, key, value in db.execute(f"SELECT trial_id, key, value_json FROM {table} WHERE {of_study}",
                                           (study_id,)):
        out.setdefault(trial_id, {})[key] = json.loads(value)
    return out


def _stored_value(value: float | None, kind: str) -> float:
    """``TrialValueModel.stored_repr_to_value``: infinities are stored as a type, not a number."""
    if kind == "INF_POS":
        return float("inf")
    if kind == "INF_NEG":
        return float("-inf")
    if kind != "FINITE" or value is None:
        raise ValueError(f"trial value {value!r} of type {kind!r}")
    return float(value)


def _local(stored: str | None) -> datetime | None:
    """``TrialModel.datetime_start``: stored as naive UTC, read back as naive local time."""
    if stored is None:
        return None
    return datetime.fromisoformat(stored).replace(tzinfo=timezone.utc).astimezone().replace(tzinfo=None)

