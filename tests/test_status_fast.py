"""``search status`` reads an SQLite study without Optuna (search.sqlite_trials), and says the same.

One real gated tiny study (baselines, infeasible and feasible search trials, finalize's
held-out records and ``final_trial``) gets, through Optuna's public API, a failed trial, a
running one, a waiting one and trials told infinite values, with both constraint formats.
Its status from the fast path (the CLI in a fresh interpreter) must equal the text rendered
from the Optuna-loaded study, import no Optuna, SQLAlchemy or torch, and leave the folder as
it was (same bytes and mtime; no ``-wal``/``-shm`` files). Other storages and schemas go
through Optuna. Nothing here is timed.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState, create_trial

from search import ranking, sqlite_trials, storage
from search.commands.status import render_status
from search.config import StudyConfig, load_study
from tests.checkpoints import TinyFamily
from tests.studies import gated_study, run

optuna.logging.set_verbosity(optuna.logging.WARNING)

REPO = Path(__file__).resolve().parents[1]
HANG_GUARD_S = 300  # only against a hang; nothing here is timed
NOT_IMPORTED = ("optuna", "sqlalchemy", "alembic", "torch")
MARK = "modules loaded: "


@pytest.fixture(scope="module")
def study_file(tmp_path_factory: pytest.TempPathFactory, llama_family: TinyFamily) -> Path:
    """A finished gated tiny study, then trials in every state and edge the status reads."""
    folder = tmp_path_factory.mktemp("status-fast")
    path = gated_study(folder, llama_family, trials=4)
    config, study = run(path)
    assert ranking.final_number(study.user_attrs) is not None, "finalize should have chosen a trial"
    directions = [d.name.lower() for d in study.directions]
    trials = study.get_trials()
    assert ranking.best_feasible(ranking.search_trials(trials), directions) is not None
    assert any(not ranking.is_feasible(t) for t in ranking.search_trials(trials)), "want infeasible trials too"
    space = {"x": FloatDistribution(0.0, 1.0)}
    scored = ranking.search_trials(trials)[0]
    for value, constraints in ((float("-inf"), {"constraints": [0.0]}),
                               (float("inf"), {"constraints": [0.5], "constraints:extra": -1.0})):
        study.add_trial(create_trial(
            params={"x": 0.25}, distributions=space, value=value, system_attrs=constraints,
            user_attrs={**scored.user_attrs, "kind": "search", "objective_note": "edge"},
        ))
    study.add_trial(create_trial(state=TrialState.FAIL, params={"x": 0.5}, distributions=space,
                                 user_attrs={"kind": "search", "failure": "scoring task 'alpha' failed: boom"}))
    running = study.ask()  # before the enqueue: ask would take the waiting trial
    running.set_user_attr("kind", "search")
    study.enqueue_trial({"x": 0.75}, user_attrs={"kind": "search"})  # waiting
    return path


def optuna_text(config: StudyConfig) -> str:
    return render_status(storage.load_existing_study(config.name, config.storage), budget=config.trials)


def status_cli(path: Path, *more: str) -> tuple[str, list[str]]:
    """``search status`` in a fresh interpreter: its output and which of NOT_IMPORTED it loaded."""
    code = (
        "import sys\n"
        "from search.cli import main\n"
        f"status = main(['status', {str(path)!r}, *{list(more)!r}])\n"
        f"print({MARK!r} + ','.join(m for m in {NOT_IMPORTED!r} if m in sys.modules), flush=True)\n"
        "sys.exit(status)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=HANG_GUARD_S)
    assert done.returncode == 0, done.stderr
    text, _, mark = done.stdout.rstrip("\n").rpartition("\n")
    assert mark.startswith(MARK), done.stdout
    return text, [m for m in mark.removeprefix(MARK).split(",") if m]


def finished_copy(config: StudyConfig, folder: Path) -> Path:
    """The study database as a finished ``search start`` leaves it (WAL mode, no writer, no
    ``-wal``/``-shm``): copied with SQLite's backup, since this process still has it open."""
    folder.mkdir()
    with closing(sqlite3.connect(config.output / "study.db")) as source, \
            closing(sqlite3.connect(folder / "study.db")) as copy:
        source.backup(copy)
        assert copy.execute("PRAGMA journal_mode=WAL").fetchone() == ("wal",)
    assert sorted(p.name for p in folder.iterdir()) == ["study.db"]
    return folder


def folder_state(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.is_file()}


def test_the_fast_read_is_what_optuna_reads(study_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Stored datetimes are naive UTC, shown as naive local time: read both in a zone that is not UTC.
    monkeypatch.setenv("TZ", "Asia/Kolkata")
    time.tzset()
    try:
        config = load_study(study_file)
        fast = sqlite_trials.read_study(config.storage, config.name)
        study = storage.load_existing_study(config.name, config.storage)
        assert fast is not None
        assert (fast.study_name, fast.user_attrs) == (study.study_name, study.user_attrs)
        assert [d.name for d in fast.directions] == [d.name for d in study.directions]
        expected = study.get_trials(deepcopy=False)
        assert [t.number for t in fast.get_trials()] == [t.number for t in expected]
        for record, trial in zip(fast.get_trials(), expected, strict=True):
            assert record.state.name == trial.state.name
            assert record.values == trial.values
            assert (record.user_attrs, record.system_attrs) == (trial.user_attrs, trial.system_attrs)
            assert (record.datetime_start, record.datetime_complete) == (trial.datetime_start,
                                                                          trial.datetime_complete)
            assert record.constraints == trial.constraints
            assert record.params == {k: trial.distributions[k].to_internal_repr(v) for k, v in trial.params.items()}
        states = {t.state.name for t in expected}
        assert {"COMPLETE", "FAIL", "RUNNING", "WAITING"} <= states
        assert {float("inf"), float("-inf")} <= {v for t in expected for v in t.values or ()}
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_status_says_the_same_without_optuna_and_changes_nothing(study_file: Path, tmp_path: Path) -> None:
    out = finished_copy(load_study(study_file), tmp_path / "out")
    before = folder_state(out)
    text, loaded = status_cli(study_file, "--out", str(out))
    assert folder_state(out) == before  # the database: same bytes, same mtime; no -wal or -shm added
    assert loaded == []
    assert text == optuna_text(load_study(study_file, out=out))
    for shown in ("final (trial", "  held-out", "source:s0", "1 failed", "1 running", "1 waiting",
                  "failed x1: scoring task 'alpha' failed: boom"):
        assert shown in text


def test_status_reads_while_the_driver_holds_the_write_lock(study_file: Path) -> None:
    config = load_study(study_file)
    expected = optuna_text(config)
    db = sqlite_trials.sqlite_file(config.storage)
    assert db is not None
    with closing(sqlite3.connect(db, isolation_level=None, timeout=60)) as writer:
        assert writer.execute("PRAGMA journal_mode").fetchone() == ("wal",)  # as search start sets it
        writer.execute("BEGIN IMMEDIATE")  # a write in progress, not committed
        changed = writer.execute("UPDATE study_user_attributes SET value_json = ? WHERE key = 'sampler'",
                                 (json.dumps("uncommitted"),))
        assert changed.rowcount == 1
        try:
            text, loaded = status_cli(study_file)
        finally:
            writer.execute("ROLLBACK")
    assert loaded == []
    assert text == expected


@pytest.fixture
def journal_copy(study_file: Path, tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """The study copied into a journal file, and a study file naming it as the storage."""
    config = load_study(study_file)
    url = f"journal:{tmp_path / 'study.journal'}"
    journal = JournalStorage(JournalFileBackend(str(tmp_path / "study.journal")))
    optuna.copy_study(from_study_name=config.name, from_storage=config.storage, to_storage=journal)
    text = study_file.read_text().replace("[study]\n", f'[study]\nstorage = "{url}"\n', 1)
    copy = tmp_path / "study.toml"
    copy.write_text(text)
    yield copy, url


def test_a_journal_storage_is_read_through_optuna(journal_copy: tuple[Path, str]) -> None:
    path, url = journal_copy
    config = load_study(path)
    assert config.storage == url
    assert sqlite_trials.read_study(url, config.name) is None
    text, loaded = status_cli(path)
    assert "optuna" in loaded
    assert text == optuna_text(config)


@pytest.mark.parametrize("change", [
    "UPDATE alembic_version SET version_num = 'v9.9.9.a'",
    "UPDATE version_info SET schema_version = 13",
])
def test_a_schema_not_checked_is_left_to_optuna(study_file: Path, tmp_path: Path, change: str) -> None:
    config = load_study(study_file)
    db = finished_copy(config, tmp_path / "copy") / "study.db"
    assert sqlite_trials.read_study(f"sqlite:///{db}", config.name) is not None
    with closing(sqlite3.connect(db)) as connection, connection:
        connection.execute(change)
    assert sqlite_trials.read_study(f"sqlite:///{db}", config.name) is None


def test_other_urls_and_missing_studies_are_left_to_optuna(study_file: Path, tmp_path: Path) -> None:
    config = load_study(study_file)
    assert sqlite_trials.read_study(config.storage, "no such study") is None
    assert sqlite_trials.read_study(f"sqlite:///{tmp_path / 'missing.db'}", config.name) is None
    assert not (tmp_path / "missing.db").exists()
    (tmp_path / "not.db").write_text("not a database")
    assert sqlite_trials.read_study(f"sqlite:///{tmp_path / 'not.db'}", config.name) is None
    for url in ("postgresql://u@h/db", f"sqlite:///{config.output / 'study.db'}?timeout=5", "sqlite:///:memory:"):
        assert sqlite_trials.read_study(url, config.name) is None


# -- Optuna's private schema (docs/ARCHITECTURE.md, "Optuna private API we use") --------------


def test_optunas_sqlite_schema_is_the_one_sqlite_trials_reads(tmp_path: Path) -> None:
    """search.sqlite_trials reads Optuna's tables directly: an Optuna upgrade that moves them
    fails here, naming what moved (then check the layout again and update SCHEMA)."""
    from optuna.storages._rdb import models

    rdb = RDBStorage(f"sqlite:///{tmp_path / 'fresh.db'}")
    assert (rdb.get_head_version(), models.SCHEMA_VERSION) == sqlite_trials.SCHEMA
    read = {  # table -> the columns sqlite_trials selects
        "alembic_version": {"version_num"},
        "version_info": {"schema_version"},
        "studies": {"study_id", "study_name"},
        "study_directions": {"study_id", "direction", "objective"},
        "study_user_attributes": {"study_id", "key", "value_json"},
        "trials": {"trial_id", "number", "study_id", "state", "datetime_start", "datetime_complete"},
        "trial_values": {"trial_id", "objective", "value", "value_type"},
        "trial_params": {"param_id", "trial_id", "param_name", "param_value"},
        "trial_user_attributes": {"trial_id", "key", "value_json"},
        "trial_system_attributes": {"trial_id", "key", "value_json"},
    }
    with closing(sqlite3.connect(tmp_path / "fresh.db")) as db:
        for table, columns in read.items():
            stored = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
            assert columns <= stored, f"Optuna's table {table} lacks {columns - stored}"
    assert {s.name: s.value for s in TrialState} == {s.name: s.value for s in sqlite_trials.TrialStateName}
    assert ({s.name: s.value for s in optuna.study.StudyDirection}
            == {s.name: s.value for s in sqlite_trials.DirectionName})
    assert {t.name for t in models.TrialValueModel.TrialValueType} == {"FINITE", "INF_POS", "INF_NEG"}
