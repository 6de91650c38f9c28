"""The driver's storage: every read from memory, writes batched into the study's storage.

Optuna commits once per parameter and attribute, and every sampler call re-reads the
running trials from the database: on the demo genome that was 35-50 ms of SQLite work per
trial in the driver, 90% of its time, against ~2 ms for the same calls on an in-memory
storage. The driver is the study's only writer (``search.lock``), so it can keep the whole
study in memory and answer every read from there. Writes are applied to memory at once
and queued for the durable storage, which gets them in one transaction per ``flush``:

* a trial is created in the durable storage at once (its number is the durable one);
* a change of a trial's state (tell, a waiting trial taken) flushes everything queued and
  then writes the state, so a told trial is complete on disk when ``tell`` returns, with
  every attribute written before its state (what Optuna's own cache guarantees);
* study attributes are written through at once;
* the driver calls ``flush`` after submitting a trial, so readers (``search status``, the
  dashboard) see its genes and recipe while it runs.

A crash loses at most the queued writes of running trials, which ``recover_interrupted``
fails and re-runs on resume anyway.

Threads: Optuna's ``BaseStorage`` must be thread-safe because Optuna shares one storage
between threads in ``study.optimize(n_jobs > 1)`` and in heartbeat threads. The driver
does neither: it asks and tells from one thread. So this storage is used by the thread
that created it only, and every public method raises :class:`SearchError` when called
from another (a check, not a lock: the queue, the memory copy's trial ids and the
detached trials would otherwise need one lock around each write and its flush).

Another process finishing one of the driver's running trials (optuna-dashboard's "tell",
a script) is a named, per-trial condition, not a crash: the first write that meets the
finished trial detaches it. The driver's later writes to it are dropped, its tell goes to
the memory copy only (so the sampler and the driver's own bookkeeping go on as usual),
and then the memory copy becomes what the storage holds. Such a trial has no
``scores_search`` and is never ranked (``search.ranking.is_scored``);
:meth:`WriteBehindStorage.foreign_finished` lists them, and each is logged once.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

import optuna
from optuna.distributions import BaseDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage, InMemoryStorage, RDBStorage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from search.errors import SearchError
from search.storage import storage_errors

if TYPE_CHECKING:
    from optuna.study._frozen import FrozenStudy  # get_all_studies' type; Optuna exports it nowhere

log = logging.getLogger(__name__)
_Class = TypeVar("_Class", bound=type)


def _creator_thread_only(cls: _Class) -> _Class:
    """Wrap every public method of ``cls`` in a check that the calling thread created the instance."""
    for name, method in list(vars(cls).items()):
        if name.startswith("_") or not callable(method):
            continue

        @functools.wraps(method)
        def checked(self: Any, *args: Any, __method: Callable[..., Any] = method, **kwargs: Any) -> Any:
            if threading.get_ident() != self._thread:
                raise SearchError(
                    f"the driver's storage was used from thread {threading.current_thread().name!r}, "
                    "not the one that created it: it is not thread-safe (one thread asks and tells; "
                    "see search.write_behind)"
                )
            return __method(self, *args, **kwargs)

        setattr(cls, name, checked)
    return cls


class _FinishedElsewhere(Exception):
    """Raised by a durable write that met trials another process has finished."""

    def __init__(self, trial_ids: Sequence[int]) -> None:
        super().__init__(f"trials {list(trial_ids)} finished elsewhere")
        self.trial_ids = list(trial_ids)


@dataclass(frozen=True)
class _Write:
    """One queued trial write (trial ids are the same in the copy and the durable storage)."""

    kind: str  # "param" | "user_attr" | "system_attr" | "intermediate"
    trial_id: int
    key: str | int
    value: Any
    distribution: BaseDistribution | None = None
    value_json: str = ""  # attributes: encoded when set, so a bad value fails there


@_creator_thread_only
class WriteBehindStorage(BaseStorage):
    """One study of ``durable``, mirrored in memory for a process that is its only writer.

    Used only by the thread that created it (see the module doc on threads).
    """

    def __init__(self, durable: BaseStorage, study_name: str, *, url: str = "") -> None:
        """``url``: the storage's URL, for error messages (derived from ``durable`` if not given)."""
        self._thread = threading.get_ident()
        # Optuna wraps an RDBStorage in its _CachedStorage; write to the database itself.
        backend = getattr(durable, "_backend", durable)
        self._durable: BaseStorage = backend if isinstance(backend, RDBStorage) else durable
        self._url = url or _url_of(self._durable)
        self._durable_study = self._durable.get_study_id_from_name(study_name)
        self._memory = InMemoryStorage()
        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(logging.WARNING)  # not "A new study created in memory": a copy
        try:
            self._study = self._memory.create_new_study(
                self._durable.get_study_directions(self._durable_study), study_name
            )
        finally:
            optuna.logging.set_verbosity(verbosity)
        for key, value in self._durable.get_study_user_attrs(self._durable_study).items():
            self._memory.set_study_user_attr(self._study, key, value)
        for key, value in self._durable.get_study_system_attrs(self._durable_study).items():
            self._memory.set_study_system_attr(self._study, key, value)
        for trial in self._durable.get_all_trials(self._durable_study, deepcopy=False):
            self._copy_trial(trial._trial_id, trial)
        self._queue: list[_Write] = []
        self._detached: dict[int, str] = {}  # trial id -> what happened to it

    def trial_id(self, number: int) -> int:
        """The storage id of trial ``number`` (``Trial`` and ``FrozenTrial`` keep theirs private)."""
        return self._memory.get_trial_id_from_study_id_trial_number(self._study, number)

    def foreign_finished(self) -> dict[int, str]:
        """Trial number -> message, for every running trial another process finished."""
        return {self._memory.get_trial(i).number: message for i, message in self._detached.items()}

    # -- the write path ---------------------------------------------------------------

    def flush(self) -> None:
        """Write every queued trial write to the durable storage (one transaction on a database)."""
        if not self._queue:
            return
        durable = self._durable
        if isinstance(durable, RDBStorage):
            self._write(lambda writes: _write_rdb(durable, writes))
        else:
            self._write(lambda writes: _write_each(durable, writes))

    def close(self) -> None:
        """Flush, then close the durable storage's pooled connections (the study stays readable).

        SQLite removes its ``-wal``/``-shm`` files when the last connection closes; left open
        (until garbage collection, or for good if the process is killed first) they would stay
        beside the study after ``search start`` returns.
        """
        try:
            self.flush()
        finally:
            if isinstance(self._durable, RDBStorage):
                self._durable.engine.dispose()

    def _write(self, write: Callable[[list[_Write]], None]) -> None:
        """Hand the queue to ``write``; on failure the queue keeps what was not written.

        Writes of trials another process finished are dropped (those trials are detached)
        and the rest is written again.
        """
        while True:
            writes, self._queue = self._queue, []
            try:
                with storage_errors(self._url):
                    write(writes)
                return
            except _FinishedElsewhere as elsewhere:
                for trial_id in elsewhere.trial_ids:
                    self._detach(trial_id)
                self._queue = [w for w in writes + self._queue if w.trial_id not in self._detached]
            except BaseException:
                self._queue = writes + self._queue
                raise

    def _detach(self, trial_id: int) -> None:
        """Another process finished this running trial: stop writing it (see the module doc)."""
        if trial_id in self._detached:
            return
        stored = self._durable.get_trial(trial_id)
        message = (
            f"trial {stored.number} was finished by another process (stored as {stored.state.name}"
            + (f" with values {stored.values}" if stored.values else "")
            + "): the driver's result for it is not stored and it is never ranked; a study the "
            "driver runs should have no other writer (e.g. a dashboard 'tell' of a running trial)"
        )
        self._detached[trial_id] = message
        log.warning("%s", message)

    def _adopt(self, trial_id: int) -> None:
        """Make the memory copy of a detached trial what the storage holds."""
        self._memory._set_trial(trial_id, self._durable.get_trial(trial_id))

    def _check_study(self, study_id: int) -> None:
        if study_id != self._study:
            raise KeyError(f"study id {study_id}: this storage holds only study {self._study}")

    # -- studies: reads from memory, writes through -----------------------------------

    def create_new_study(self, directions: Sequence[StudyDirection], study_name: str | None = None) -> int:
        raise SearchError("the driver's storage holds one existing study; it creates none")

    def delete_study(self, study_id: int) -> None:
        raise SearchError("the driver's storage does not delete studies")

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        self._check_study(study_id)
        self._memory.set_study_user_attr(study_id, key, value)
        with storage_errors(self._url):
            self._durable.set_study_user_attr(self._durable_study, key, value)

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        self._check_study(study_id)
        self._memory.set_study_system_attr(study_id, key, value)
        with storage_errors(self._url):
            self._durable.set_study_system_attr(self._durable_study, key, value)

    def get_study_id_from_name(self, study_name: str) -> int:
        return self._memory.get_study_id_from_name(study_name)

    def get_study_name_from_id(self, study_id: int) -> str:
        return self._memory.get_study_name_from_id(study_id)

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        return self._memory.get_study_directions(study_id)

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return self._memory.get_study_user_attrs(study_id)

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return self._memory.get_study_system_attrs(study_id)

    def get_all_studies(self) -> list[FrozenStudy]:
        return self._memory.get_all_studies()

    # -- trials ---------------------------------------------------------------------

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        self._check_study(study_id)
        self.flush()
        with storage_errors(self._url):
            if isinstance(self._durable, RDBStorage):  # returns the new row: no read back
                created = self._durable._create_new_trial(self._durable_study, template_trial)
                durable_id, number = created._trial_id, created.number
            else:
                durable_id = self._durable.create_new_trial(self._durable_study, template_trial)
                number = self._durable.get_trial(durable_id).number
        memory_id = self._copy_trial(durable_id, template_trial)
        if number != self._memory.get_trial(memory_id).number:
            raise SearchError(
                f"trial {number} was created by another process: a study the driver runs must "
                "have no other writer (is a second `search start` using the same storage?)"
            )
        return memory_id

    def _copy_trial(self, durable_id: int, template: FrozenTrial | None) -> int:
        """Create the memory copy of a trial under the durable trial's id.

        Ids leak into stored data (optuna-dashboard keys a trial's note by its id), so
        the copy must use the same ones. InMemoryStorage numbers ids from ``_max_trial_id``.
        """
        self._memory._max_trial_id = durable_id - 1
        memory_id = self._memory.create_new_trial(self._study, template)
        if memory_id != durable_id:
            raise SearchError(f"internal: the memory copy gave trial id {memory_id}, not {durable_id}")
        return memory_id

    def set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float,
                        distribution: BaseDistribution) -> None:
        # memory first: it checks the trial is running and the distribution is compatible
        self._memory.set_trial_param(trial_id, param_name, param_value_internal, distribution)
        if trial_id not in self._detached:  # else finished elsewhere: dropped
            self._queue.append(_Write("param", trial_id, param_name,
                                      param_value_internal, distribution))

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        encoded = _json(key, value)
        self._memory.set_trial_user_attr(trial_id, key, value)
        if trial_id not in self._detached:  # else finished elsewhere: dropped
            self._queue.append(_Write("user_attr", trial_id, key, value, value_json=encoded))

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        encoded = _json(key, value)
        self._memory.set_trial_system_attr(trial_id, key, value)
        if trial_id not in self._detached:  # else finished elsewhere: dropped
            self._queue.append(_Write("system_attr", trial_id, key, value, value_json=encoded))

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        self._memory.set_trial_intermediate_value(trial_id, step, intermediate_value)
        if trial_id not in self._detached:  # else finished elsewhere: dropped
            self._queue.append(_Write("intermediate", trial_id, step, intermediate_value))

    def set_trial_state_values(self, trial_id: int, state: TrialState,
                               values: Sequence[float] | None = None) -> bool:
        if not self._memory.set_trial_state_values(trial_id, state, values):
            return False  # e.g. a waiting trial already taken: nothing changed
        try:
            if isinstance(self._durable, RDBStorage) and state.is_finished():
                # the trial's last writes and its state in one transaction
                rdb = self._durable

                def write(writes: list[_Write]) -> None:
                    finish = None if trial_id in self._detached else (trial_id, state, values)
                    _write_rdb(rdb, writes, finish=finish)

                self._write(write)
            else:
                self.flush()
                with storage_errors(self._url):
                    changed = trial_id in self._detached or self._durable.set_trial_state_values(
                        trial_id, state, values
                    )
                if not changed:
                    raise SearchError(
                        f"trial {self._memory.get_trial(trial_id).number} changed state in the storage "
                        "behind the driver's back: a study the driver runs must have no other writer"
                    )
        except UpdateFinishedTrialError:
            self._detach(trial_id)
        if trial_id in self._detached and state.is_finished():
            self._adopt(trial_id)
        return True

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        return self._memory.get_trial_id_from_study_id_trial_number(study_id, trial_number)

    def get_trial(self, trial_id: int) -> FrozenTrial:
        return self._memory.get_trial(trial_id)

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        return self._memory.get_all_trials(study_id, deepcopy=deepcopy, states=states)


def _url_of(storage: BaseStorage) -> str:
    if isinstance(storage, RDBStorage):
        return storage.engine.url.render_as_string(hide_password=True)
    backend = getattr(storage, "_backend", None)
    path = getattr(backend, "_file_path", None)
    return f"journal:{path}" if path else type(storage).__name__


def _write_rdb(storage: RDBStorage, writes: Sequence[_Write],
               finish: tuple[int, TrialState, Sequence[float] | None] | None = None) -> None:
    """All ``writes`` in one transaction: one statement per table, not one commit per row.

    RDBStorage's own writers look the trial up again for every row (0.7 ms each on SQLite);
    the memory copy already checked that each trial is running and each distribution
    compatible, so one check of the trials' states is enough here. ``finish``: a trial
    whose final state and values are written last, in the same transaction (what
    ``RDBStorage.set_trial_state_values`` writes for a finished state).
    """
    from optuna.distributions import distribution_to_json
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session
    from sqlalchemy import delete, insert, select

    params: list[dict[str, Any]] = []
    attrs: dict[str, dict[tuple[int, str], Any]] = {"user_attr": {}, "system_attr": {}}
    steps: list[_Write] = []
    for write in writes:
        if write.kind == "param":
            assert write.distribution is not None
            params.append({"trial_id": write.trial_id, "param_name": str(write.key),
                           "param_value": write.value,
                           "distribution_json": distribution_to_json(write.distribution)})
        elif write.kind == "intermediate":
            steps.append(write)
        else:
            attrs[write.kind][(write.trial_id, str(write.key))] = write.value_json  # the last one wins
    trial_ids = sorted({write.trial_id for write in writes} | ({finish[0]} if finish else set()))
    with _create_scoped_session(storage.scoped_session) as session:
        states = session.execute(
            select(models.TrialModel.trial_id, models.TrialModel.state)
            .where(models.TrialModel.trial_id.in_(trial_ids))
        ).all()
        if len(states) != len(trial_ids):
            raise SearchError(
                f"trials {sorted(set(trial_ids) - {t for t, _ in states})} are gone from the storage: "
                "a study the driver runs must have no other writer"
            )
        finished = [trial_id for trial_id, state in states if state.is_finished()]
        if finished:
            raise _FinishedElsewhere(finished)
        if params:
            session.execute(insert(models.TrialParamModel), params)
        for kind, model in (("user_attr", models.TrialUserAttributeModel),
                            ("system_attr", models.TrialSystemAttributeModel)):
            rows = attrs[kind]
            if not rows:
                continue
            for trial_id in {trial_id for trial_id, _ in rows}:
                keys = [key for t, key in rows if t == trial_id]
                session.execute(delete(model).where(model.trial_id == trial_id, model.key.in_(keys)))
            session.execute(insert(model), [
                {"trial_id": trial_id, "key": key, "value_json": value_json}
                for (trial_id, key), value_json in rows.items()
            ])
        for write in steps:
            storage._set_trial_intermediate_value_without_commit(
                session, write.trial_id, int(write.key), write.value
            )
        if finish is not None:
            trial_id, state, values = finish
            trial = models.TrialModel.find_or_raise_by_id(trial_id, session, for_update=True)
            for objective, value in enumerate(values or ()):
                storage._set_trial_value_without_commit(session, trial, objective, value)
            trial.state = state
            trial.datetime_complete = datetime.now()


_ONE_WRITERS: dict[str, Callable[[BaseStorage, _Write], None]] = {
    "param": lambda s, w: s.set_trial_param(w.trial_id, str(w.key), w.value, w.distribution),
    "user_attr": lambda s, w: s.set_trial_user_attr(w.trial_id, str(w.key), w.value),
    "system_attr": lambda s, w: s.set_trial_system_attr(w.trial_id, str(w.key), w.value),
    "intermediate": lambda s, w: s.set_trial_intermediate_value(w.trial_id, int(w.key), w.value),
}


def _write_each(storage: BaseStorage, writes: list[_Write]) -> None:
    """One call per write (storages without transactions, e.g. a journal file)."""
    for index, write in enumerate(writes):
        try:
            _ONE_WRITERS[write.kind](storage, write)
        except UpdateFinishedTrialError:
            del writes[:index]  # written ones stay written
            raise _FinishedElsewhere([write.trial_id]) from None
        except BaseException:
            del writes[:index]  # written ones stay written; the caller re-queues the rest
            raise


def _json(key: str, value: Any) -> str:
    """The stored form of an attribute; refuses what JSON cannot hold when it is set."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"trial attribute {key!r} cannot be stored: {exc}") from exc
