"""Where a study lives: storage URLs, creating or loading the study, held-out records.

The driver is the only process that writes the storage. ``status``/``export``/``report``/
``dashboard`` only read it, and never create it when it is missing.

Optuna refuses to change a finished trial (``check_trial_is_updatable``), so numbers that
arrive after a trial is told (its held-out re-score) are kept as study user attributes
``heldout:<trial number>`` holding ``{"scores_heldout", "gate_margins_heldout",
"feasible_heldout"}``; :func:`heldout_record` reads them back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import optuna
import sqlalchemy
from optuna.samplers import BaseSampler
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from sqlalchemy import event

from search.errors import SearchError, StudyConfigError

JOURNAL_PREFIX = "journal:"
HELDOUT_KEY_PREFIX = "heldout:"
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
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):]).expanduser()
        if not create and not path.is_file():
            raise NoStudyYetError(f"no study yet: the storage {path} does not exist; {START_HINT}")
        # SQLite creates the file but not its folder.
        path.parent.mkdir(parents=True, exist_ok=True)
    if not create and not _has_optuna_tables(url):
        raise NoStudyYetError(f"no study yet: storage {url!r} holds no Optuna tables; {START_HINT}")
    try:
        storage = RDBStorage(url)
    except Exception as exc:  # SQLAlchemy raises many types for a bad URL
        raise SearchError(f"storage {url!r}: cannot open: {exc}") from exc
    if url.startswith("sqlite"):
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


def open_study(
    name: str, storage_url: str, directions: Sequence[str], *, sampler: BaseSampler | None = None
) -> optuna.Study:
    """Create the study or load it by name; its directions must match the config's."""
    storage = resolve_storage(storage_url)
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


@dataclass(frozen=True)
class HeldoutRecord:
    """A trial's scores on the held-out split and its gates evaluated there."""

    scores: dict[str, float]
    gate_margins: dict[str, float]
    feasible: bool

    def to_json(self) -> dict[str, object]:
        return {
            "scores_heldout": dict(self.scores),
            "gate_margins_heldout": dict(self.gate_margins),
            "feasible_heldout": self.feasible,
        }


def save_heldout(study: optuna.Study, trial_number: int, record: HeldoutRecord) -> None:
    study.set_user_attr(f"{HELDOUT_KEY_PREFIX}{trial_number}", record.to_json())


def heldout_record(study_user_attrs: Mapping[str, object], trial_number: int) -> HeldoutRecord | None:
    """The held-out record of a trial from the study's user attributes, if it was re-scored."""
    raw = study_user_attrs.get(f"{HELDOUT_KEY_PREFIX}{trial_number}")
    if not isinstance(raw, Mapping):
        return None
    return HeldoutRecord(
        scores={str(k): float(v) for k, v in raw["scores_heldout"].items()},
        gate_margins={str(k): float(v) for k, v in raw["gate_margins_heldout"].items()},
        feasible=bool(raw["feasible_heldout"]),
    )
