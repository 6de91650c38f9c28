"""Each piece of Optuna's private API that search/ still uses, held to what we rely on.

docs/ARCHITECTURE.md ("Optuna private API we use") says where each is used and why there
is no public equivalent. A test here fails when an Optuna upgrade moves or changes one,
naming the access, instead of the driver failing somewhere downstream.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.samplers import TPESampler
from optuna.storages import InMemoryStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState, create_trial

from search.errors import SearchError
from search.samplers import _SamplerView
from search.storage import open_study, resolve_storage
from search.write_behind import WriteBehindStorage

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE = {"x": FloatDistribution(0.0, 1.0)}


def _sqlite(tmp_path: Path) -> tuple[RDBStorage, int]:
    storage = RDBStorage(f"sqlite:///{tmp_path / 'study.db'}")
    study = optuna.create_study(study_name="s", storage=storage)
    study.add_trial(create_trial(params={"x": 0.5}, distributions=SPACE, value=1.0))
    return storage, storage.get_study_id_from_name("s")


def test_frozen_trial_keeps_its_storage_id_in_trial_id(tmp_path: Path) -> None:
    """annotate (save_note/upload_artifact need an ``optuna.Trial``), write_behind (copying ids)."""
    storage, study_id = _sqlite(tmp_path)
    trial = storage.get_all_trials(study_id)[0]
    assert trial._trial_id == storage.get_trial_id_from_study_id_trial_number(study_id, 0)
    assert optuna.Trial(optuna.load_study(study_name="s", storage=storage), trial._trial_id).number == 0


def test_samplers_read_the_study_through_get_trials_private(tmp_path: Path) -> None:
    """samplers._SamplerView overrides ``Study._get_trials``: Optuna's samplers must read there."""
    params = list(inspect.signature(optuna.Study._get_trials).parameters)
    assert params == ["self", "deepcopy", "states", "use_cache"]
    study = optuna.create_study()
    for x in (0.1, 0.2):  # baselines: the view hides them
        study.add_trial(create_trial(params={"x": x}, distributions=SPACE, value=x,
                                     user_attrs={"kind": "baseline"}))
    trial = study.ask()
    assert TPESampler(seed=0).infer_relative_search_space(study, study.trials[-1]) == SPACE
    hidden = _SamplerView(study, position=None, horizon=None, penalise=False)
    assert TPESampler(seed=0).infer_relative_search_space(hidden, study.trials[-1]) == {}  # type: ignore[arg-type]
    study.tell(trial, 0.0)


def test_rdb_create_new_trial_private_returns_the_frozen_trial(tmp_path: Path) -> None:
    """write_behind: ``RDBStorage._create_new_trial`` saves reading the new trial back."""
    storage, study_id = _sqlite(tmp_path)
    created = storage._create_new_trial(study_id, None)
    assert isinstance(created, FrozenTrial) and created.number == 1 and created.state == TrialState.RUNNING
    assert storage.get_trial(created._trial_id).number == 1


def test_in_memory_max_trial_id_decides_the_next_id() -> None:
    """write_behind: the memory copy gives each trial the durable storage's id."""
    memory = InMemoryStorage()
    study_id = memory.create_new_study([optuna.study.StudyDirection.MINIMIZE], "s")
    memory._max_trial_id = 41
    assert memory.create_new_trial(study_id) == 42


def test_in_memory_set_trial_replaces_a_trial_record() -> None:
    """write_behind: a trial another process finished is adopted as stored (``_set_trial``)."""
    memory = InMemoryStorage()
    study_id = memory.create_new_study([optuna.study.StudyDirection.MINIMIZE], "s")
    trial_id = memory.create_new_trial(study_id)
    finished = create_trial(value=3.0)
    finished.number = 0
    finished._trial_id = trial_id
    memory._set_trial(trial_id, finished)
    assert memory.get_trial(trial_id).state == TrialState.COMPLETE and memory.get_trial(trial_id).value == 3.0


def test_cached_storage_wraps_the_rdb_storage_as_backend(tmp_path: Path) -> None:
    """write_behind: given a study's storage, it writes to the database behind Optuna's cache."""
    rdb = RDBStorage(f"sqlite:///{tmp_path / 'study.db'}")
    study = optuna.create_study(storage=rdb)
    assert study._storage._backend is rdb  # type: ignore[attr-defined]


def test_journal_file_backend_keeps_its_path(tmp_path: Path) -> None:
    """storage._WholeLinesJournal (cutting a partial line) and write_behind._url_of (messages)."""
    path = tmp_path / "study.log"
    backend = JournalFileBackend(str(path))
    assert backend._file_path == str(path)
    assert JournalStorage(backend)._backend is backend


def test_rdb_models_and_scoped_session_write_in_one_transaction(tmp_path: Path) -> None:
    """write_behind._write_rdb: rows through Optuna's models, values through its writers."""
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session
    from sqlalchemy import insert, select

    storage, study_id = _sqlite(tmp_path)
    trial_id = storage.create_new_trial(study_id)
    for model in (models.TrialParamModel, models.TrialUserAttributeModel, models.TrialSystemAttributeModel):
        assert {"trial_id"} <= set(model.__table__.columns.keys())
    with _create_scoped_session(storage.scoped_session) as session:
        session.execute(select(models.TrialModel.trial_id, models.TrialModel.state)
                        .where(models.TrialModel.trial_id.in_([trial_id]))).all()
        session.execute(insert(models.TrialUserAttributeModel),
                        [{"trial_id": trial_id, "key": "k", "value_json": "1"}])
        storage._set_trial_intermediate_value_without_commit(session, trial_id, 0, 0.25)
        row = models.TrialModel.find_or_raise_by_id(trial_id, session, for_update=True)
        storage._set_trial_value_without_commit(session, row, 0, 0.5)
        row.state = TrialState.COMPLETE
    trial = storage.get_trial(trial_id)
    assert (trial.state, trial.values, trial.intermediate_values, trial.user_attrs) == (
        TrialState.COMPLETE, [0.5], {0: 0.25}, {"k": 1}
    )


def test_frozen_study_is_what_get_all_studies_returns() -> None:
    """write_behind, commands/dashboard: the return type they annotate (typing only)."""
    from optuna.study._frozen import FrozenStudy

    memory = InMemoryStorage()
    memory.create_new_study([optuna.study.StudyDirection.MINIMIZE], "s")
    assert isinstance(memory.get_all_studies()[0], FrozenStudy)


def test_write_behind_refuses_a_second_thread(tmp_path: Path) -> None:
    """Optuna's BaseStorage must be thread-safe; WriteBehindStorage enforces one thread instead."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    open_study("s", url, ["minimize"])
    storage = WriteBehindStorage(resolve_storage(url), "s", url=url)
    study = optuna.Study(study_name="s", storage=storage)
    study.tell(study.ask(), 1.0)  # the creating thread: fine
    with pytest.raises(SearchError, match="not thread-safe"):
        _in_thread(study.ask)
    with pytest.raises(SearchError, match="not thread-safe"):
        _in_thread(storage.flush)
    assert len(study.trials) == 1  # the refused ask created nothing


def _in_thread(function: Callable[[], object]) -> None:
    """Call ``function`` in a new thread and re-raise what it raised here."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            function()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            raised.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=60)
    if raised:
        raise raised[0]
