"""The driver's write-behind storage against real SQLite and journal files.

``WriteBehindStorage`` answers reads from an in-memory copy and batches trial writes into
the study's storage. These tests hold it to its contract: it behaves like a plain Optuna
study (same trials as an in-memory reference under the same seeded sampler), a fresh
reader of the file sees a told trial complete with every attribute when ``tell`` returns,
and a second writer of the same storage is detected instead of silently diverging.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.samplers import RandomSampler
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, Trial, TrialState, create_trial

from search.config import load_study
from search.driver import run_study
from search.errors import SearchError
from search.plan import worker_setup
from search.pool import InlinePool
from search.storage import open_study, resolve_storage
from search.write_behind import WriteBehindStorage
from tests.checkpoints import TinyFamily
from tests.studies import write_study

optuna.logging.set_verbosity(optuna.logging.WARNING)

REPO = Path(__file__).resolve().parents[1]

NAME = "wb"
SPACE: dict[str, BaseDistribution] = {
    "x": FloatDistribution(-1.0, 1.0),
    "lr": FloatDistribution(1e-4, 1.0, log=True),
    "quarter": FloatDistribution(0.0, 1.0, step=0.25),
    "n": IntDistribution(1, 8),
    "method": CategoricalDistribution(["linear", "ties", None, 3]),
}
OTHER_WRITER = "no other writer"


# -- helpers ------------------------------------------------------------------------------


def storage_url(folder: Path, backend: str) -> str:
    if backend == "sqlite":
        return f"sqlite:///{folder / 'study.db'}"
    return f"journal:{folder / 'study.journal'}"


def open_write_behind(url: str, directions: Sequence[str], seed: int = 0) -> optuna.Study:
    """The study as ``open_plan_study`` opens it: the durable study, wrapped."""
    durable = open_study(NAME, url, directions)
    return optuna.Study(
        study_name=NAME, storage=WriteBehindStorage(durable._storage, NAME),
        sampler=RandomSampler(seed),
    )


def write_behind(study: optuna.Study) -> WriteBehindStorage:
    storage = study._storage
    assert isinstance(storage, WriteBehindStorage)
    return storage


@dataclass(frozen=True)
class Snapshot:
    """What a reader of the storage sees (no trial ids, no datetimes)."""

    trials: list[tuple[object, ...]]
    user_attrs: dict[str, object]
    system_attrs: dict[str, object]


def trial_view(trial: FrozenTrial) -> tuple[object, ...]:
    return (
        trial.number, trial.state, trial.params, trial.distributions, trial.values,
        trial.intermediate_values, trial.user_attrs, trial.system_attrs,
    )


def snapshot(study: optuna.Study) -> Snapshot:
    return Snapshot(
        [trial_view(t) for t in study.get_trials()],
        study.user_attrs,
        study._storage.get_study_system_attrs(study._study_id),
    )


def read_fresh(url: str, read: Callable[[optuna.Study], object] = snapshot) -> object:
    """``read`` of the study through a new storage object: only what was committed."""
    storage = resolve_storage(url)
    try:
        return read(optuna.load_study(study_name=NAME, storage=storage))
    finally:
        if isinstance(storage, RDBStorage):
            storage.engine.dispose()


def fresh_trial(url: str, number: int) -> FrozenTrial:
    found = read_fresh(url, lambda study: study.get_trials()[number])
    assert isinstance(found, FrozenTrial)
    return found


# -- 1. equivalence with a plain in-memory study -------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
finite = st.floats(-1e6, 1e6, allow_nan=False)
enqueued_params = st.fixed_dictionaries(
    {},
    optional={
        "x": st.floats(-1.0, 1.0),
        "n": st.integers(1, 8),
        "method": st.sampled_from(["linear", "ties", None, 3]),
    },
)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("ask")),
        st.tuples(st.just("ask")),  # twice: trials to write to
        st.tuples(st.just("enqueue"), enqueued_params),
        st.tuples(st.just("user_attr"), st.integers(0, 5), st.sampled_from("abc"), json_values),
        st.tuples(st.just("system_attr"), st.integers(0, 5), st.sampled_from("de"), json_values),
        st.tuples(st.just("report"), st.integers(0, 5), st.integers(0, 3), finite),
        st.tuples(st.just("complete"), st.integers(0, 5), st.lists(finite, min_size=2, max_size=2)),
        st.tuples(st.just("fail"), st.integers(0, 5)),
        st.tuples(st.just("prune"), st.integers(0, 5)),
        st.tuples(st.just("add_complete"), st.lists(finite, min_size=2, max_size=2)),
        st.tuples(st.just("study_attr"), st.sampled_from("fg"), json_values),
        st.tuples(st.just("flush")),
    ),
    min_size=12,
    max_size=24,
)


class Twin:
    """The same operations on the write-behind study and an in-memory reference study."""

    def __init__(self, url: str, directions: list[str], seed: int) -> None:
        self.url = url
        self.objectives = len(directions)
        self.study = open_write_behind(url, directions, seed)
        self.reference = optuna.create_study(directions=directions, sampler=RandomSampler(seed))
        self.running: list[tuple[Trial, Trial]] = []  # (write-behind, reference)

    def check(self) -> None:
        """All three views agree: write-behind, a fresh reader of the file, the reference."""
        expected = snapshot(self.reference)
        assert snapshot(self.study) == expected
        assert read_fresh(self.url) == expected

    def apply(self, op: tuple[object, ...]) -> None:
        kind = op[0]
        if kind == "ask":
            pair = (self.study.ask(SPACE), self.reference.ask(SPACE))
            assert pair[0].number == pair[1].number
            self.running.append(pair)
        elif kind == "enqueue":
            for study in (self.study, self.reference):
                study.enqueue_trial(dict(op[1]))  # type: ignore[call-overload]
        elif kind == "add_complete":
            values = list(op[1])[: self.objectives]  # type: ignore[call-overload]
            for study in (self.study, self.reference):
                study.add_trial(create_trial(
                    params={"x": 0.5, "n": 3}, distributions={"x": SPACE["x"], "n": SPACE["n"]},
                    values=values, user_attrs={"added": True},
                ))
            self.check()
        elif kind == "study_attr":
            for study in (self.study, self.reference):
                study.set_user_attr(str(op[1]), op[2])
        elif kind == "flush":
            write_behind(self.study).flush()
            self.check()
        elif self.running:
            self.apply_to_running(op)

    def apply_to_running(self, op: tuple[object, ...]) -> None:
        kind, index = op[0], int(op[1])  # type: ignore[call-overload]
        pair = self.running[index % len(self.running)]
        if kind == "user_attr":
            for trial in pair:
                trial.set_user_attr(str(op[2]), op[3])
        elif kind == "system_attr":
            for trial in pair:
                trial.storage.set_trial_system_attr(trial._trial_id, str(op[2]), op[3])
        elif kind == "report" and self.objectives == 1:
            for trial in pair:
                trial.report(float(op[3]), int(op[2]))  # type: ignore[arg-type]
        elif kind in ("complete", "fail", "prune"):
            if kind == "prune" and self.objectives > 1:
                return  # Optuna prunes single-objective studies only
            self.running.remove(pair)
            values = list(op[2])[: self.objectives] if kind == "complete" else None  # type: ignore[call-overload]
            state = {"complete": TrialState.COMPLETE, "fail": TrialState.FAIL,
                     "prune": TrialState.PRUNED}[str(kind)]
            self.study.tell(pair[0], values, state)
            self.reference.tell(pair[1], values, state)
            self.check()  # told: everything written so far is on disk


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=operations,
    objectives=st.sampled_from([1, 2]),
    backend=st.sampled_from(["sqlite", "journal"]),
    seed=st.integers(0, 2**16),
)
def test_write_behind_study_matches_a_plain_study_and_its_file(
    ops: list[tuple[object, ...]], objectives: int, backend: str, seed: int
) -> None:
    directions = ["maximize", "minimize"][:objectives]
    with tempfile.TemporaryDirectory() as folder:
        twin = Twin(storage_url(Path(folder), backend), directions, seed)
        for op in ops:
            twin.apply(op)
        write_behind(twin.study).flush()
        twin.check()


# -- 2 + 4. durability on tell and on flush --------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "journal"])
def test_told_trial_is_complete_on_disk_when_tell_returns(tmp_path: Path, backend: str) -> None:
    url = storage_url(tmp_path, backend)
    study = open_write_behind(url, ["maximize"])
    trial = study.ask(SPACE)
    trial.set_user_attr("recipe", {"method": "linear", "weights": [0.25, 0.75]})
    trial.storage.set_trial_system_attr(trial._trial_id, "constraints", [-0.5])
    trial.report(0.1, 0)
    study.tell(trial, 0.75)

    seen = fresh_trial(url, trial.number)
    assert seen.state == TrialState.COMPLETE and seen.values == [0.75]
    assert seen.params == trial.params and set(seen.params) == set(SPACE)
    assert seen.distributions == SPACE
    assert seen.user_attrs == {"recipe": {"method": "linear", "weights": [0.25, 0.75]}}
    assert seen.system_attrs == {"constraints": [-0.5]}
    assert seen.intermediate_values == {0: 0.1}


@pytest.mark.parametrize("backend", ["sqlite", "journal"])
def test_running_trial_shows_its_writes_after_flush(tmp_path: Path, backend: str) -> None:
    url = storage_url(tmp_path, backend)
    study = open_write_behind(url, ["maximize", "minimize"])
    trial = study.ask(SPACE)
    trial.set_user_attr("kind", "search")
    trial.set_user_attr("kind", "baseline")  # the last write wins
    trial.storage.set_trial_system_attr(trial._trial_id, "fixed", {"a": [1, 2]})
    write_behind(study).flush()

    seen = fresh_trial(url, trial.number)
    assert seen.state == TrialState.RUNNING
    assert seen.params == trial.params and seen.distributions == SPACE
    assert seen.user_attrs == {"kind": "baseline"}
    assert seen.system_attrs == {"fixed": {"a": [1, 2]}}


def test_study_attrs_are_written_through_without_a_flush(tmp_path: Path) -> None:
    url = storage_url(tmp_path, "sqlite")
    study = open_write_behind(url, ["maximize"])
    study.set_user_attr("final_trial", 3)
    study._storage.set_study_system_attr(study._study_id, "cma:penalty", [1.5])
    seen = read_fresh(url)
    assert isinstance(seen, Snapshot)
    assert seen.user_attrs == {"final_trial": 3}
    assert seen.system_attrs == {"cma:penalty": [1.5]}


def test_it_creates_and_deletes_no_studies(tmp_path: Path) -> None:
    study = open_write_behind(storage_url(tmp_path, "sqlite"), ["maximize"])
    storage = write_behind(study)
    with pytest.raises(SearchError):
        storage.create_new_study([optuna.study.StudyDirection.MAXIMIZE], "another")
    with pytest.raises(SearchError):
        storage.delete_study(study._study_id)


def test_a_write_that_cannot_be_stored_loses_no_other_trials_writes(tmp_path: Path) -> None:
    """Optuna's SQLite storage refuses an attribute that is not JSON when it is set; here it
    is queued. Whatever it raises, the other trial's attribute and state must still reach the
    file when that trial is told."""
    url = storage_url(tmp_path, "sqlite")
    study = open_write_behind(url, ["maximize"])
    good, bad = study.ask(SPACE), study.ask(SPACE)
    good.set_user_attr("scores_search", {"alpha": 0.5})
    with pytest.raises(Exception):  # noqa: B017 - any refusal, at set or at tell, is fine
        bad.set_user_attr("not_json", {1, 2})
        study.tell(bad, 1.0)
    study.tell(good, 0.5)
    seen = fresh_trial(url, good.number)
    assert seen.state == TrialState.COMPLETE
    assert seen.user_attrs == {"scores_search": {"alpha": 0.5}}


# -- 3. resume over a study another (plain) Optuna process wrote -----------------------------


def test_resumed_study_reads_every_stored_trial_and_numbers_on(tmp_path: Path) -> None:
    url = storage_url(tmp_path, "sqlite")
    plain = open_study(NAME, url, ["maximize"], sampler=RandomSampler(1))
    plain.set_user_attr("sources", {"s0": "/a"})
    for number in range(5):
        trial = plain.ask(SPACE)
        trial.set_user_attr("kind", "search")
        trial.report(float(number), 0)
        if number == 1:
            plain.tell(trial, state=TrialState.FAIL)
        elif number == 2:
            plain.tell(trial, state=TrialState.PRUNED)
        elif number < 4:
            plain.tell(trial, number / 10)
        # trial 4 stays RUNNING (an interrupted driver)
    plain.enqueue_trial({"x": 0.25, "n": 2})  # trial 5 waits
    stored = plain.get_trials()
    assert [t.state for t in stored] == [
        TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED, TrialState.COMPLETE,
        TrialState.RUNNING, TrialState.WAITING,
    ]

    study = open_write_behind(url, ["maximize"], seed=2)
    read = study.get_trials()
    # identical, datetimes included; only the ids may differ
    assert [(trial_view(t), t.datetime_start, t.datetime_complete) for t in read] == [
        (trial_view(t), t.datetime_start, t.datetime_complete) for t in stored
    ]
    assert study.user_attrs == {"sources": {"s0": "/a"}}
    assert study.best_trial.number == 3

    waiting = study.ask(SPACE)  # takes the waiting trial
    assert waiting.number == 5 and waiting.params["x"] == 0.25 and waiting.params["n"] == 2
    fresh = study.ask(SPACE)
    assert fresh.number == 6
    study.tell(fresh, 0.9)
    study.tell(waiting, 0.1)
    study.tell(4, state=TrialState.FAIL)  # recover the interrupted one
    on_disk = read_fresh(url)
    assert on_disk == snapshot(study)
    assert isinstance(on_disk, Snapshot)
    assert [t[0] for t in on_disk.trials] == list(range(7))
    assert [t[1] for t in on_disk.trials][4:] == [
        TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE
    ]


# -- 5. a second writer is detected ------------------------------------------------------------


def other_writer(url: str) -> optuna.Study:
    return optuna.load_study(study_name=NAME, storage=resolve_storage(url))


@pytest.mark.parametrize("backend", ["sqlite", "journal"])
def test_trial_created_by_another_writer_stops_the_next_ask(tmp_path: Path, backend: str) -> None:
    url = storage_url(tmp_path, backend)
    study = open_write_behind(url, ["maximize"])
    study.tell(study.ask(SPACE), 0.5)
    other_writer(url).ask()  # trial 1, behind the write-behind study's back
    with pytest.raises(SearchError, match=OTHER_WRITER):
        study.ask(SPACE)


@pytest.mark.parametrize("backend", ["sqlite", "journal"])
def test_waiting_trial_taken_by_another_writer_stops_the_ask(tmp_path: Path, backend: str) -> None:
    url = storage_url(tmp_path, backend)
    study = open_write_behind(url, ["maximize"])
    study.enqueue_trial({"x": 0.5})
    taken = other_writer(url).ask()
    assert taken.number == 0
    with pytest.raises(SearchError, match=OTHER_WRITER):
        study.ask(SPACE)


def running_trial_finished_elsewhere(url: str) -> tuple[optuna.Study, Trial]:
    """A write-behind study whose RUNNING trial another writer has just told."""
    study = open_write_behind(url, ["maximize"])
    trial = study.ask(SPACE)
    trial.set_user_attr("kind", "search")
    write_behind(study).flush()
    other_writer(url).tell(trial.number, 0.1)
    return study, trial


@pytest.mark.parametrize("backend", ["sqlite", "journal"])
@pytest.mark.parametrize("before_tell", ["queued writes", "flush", "nothing"])
def test_a_trial_finished_elsewhere_is_detached_and_the_study_goes_on(
    tmp_path: Path, backend: str, before_tell: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = storage_url(tmp_path, backend)
    study, trial = running_trial_finished_elsewhere(url)
    other = study.ask(SPACE)  # another running trial, whose writes must all land
    other.set_user_attr("kind", "search")
    if before_tell != "nothing":
        trial.set_user_attr("scores_search", {"alpha": 0.5})
        trial.storage.set_trial_system_attr(trial._trial_id, "constraints", [0.0])
    if before_tell == "flush":
        write_behind(study).flush()
    told = study.tell(trial, 0.5)  # what the driver does next: no error

    # The stored trial is the other writer's; the driver's copy became the same.
    assert told.values == [0.1] and told.state == TrialState.COMPLETE
    on_disk = fresh_trial(url, trial.number)
    assert "scores_search" not in on_disk.user_attrs and "constraints" not in on_disk.system_attrs
    assert trial_view(study.get_trials()[trial.number]) == trial_view(on_disk)
    message = write_behind(study).foreign_finished()[trial.number]
    assert f"trial {trial.number} was finished by another process (stored as COMPLETE" in message
    assert message in caplog.text

    other.set_user_attr("scores_search", {"alpha": 0.7})
    study.tell(other, 0.7)
    assert read_fresh(url) == snapshot(study)
    assert fresh_trial(url, other.number).user_attrs == {"kind": "search", "scores_search": {"alpha": 0.7}}


def test_another_study_in_the_same_file_is_not_a_second_writer(tmp_path: Path) -> None:
    """Trial ids are shared by every study of a database: another study's trials move them,
    but not this study's numbers."""
    url = storage_url(tmp_path, "sqlite")
    neighbour = optuna.create_study(study_name="neighbour", storage=resolve_storage(url))
    neighbour.tell(neighbour.ask(), 1.0)
    study = open_write_behind(url, ["maximize"])
    first = study.ask(SPACE)
    neighbour.tell(neighbour.ask(), 2.0)
    neighbour.ask()
    second = study.ask(SPACE)
    second.set_user_attr("kind", "search")
    study.tell(second, 0.2)
    study.tell(first, 0.1)
    assert [t.number for t in study.get_trials()] == [0, 1]
    on_disk = read_fresh(url)
    assert on_disk == snapshot(study)
    assert isinstance(on_disk, Snapshot)
    assert on_disk.trials[1][6] == {"kind": "search"}
    assert len(neighbour.get_trials()) == 3


# -- 6. the real driver: what a reader sees while the study runs -------------------------------


class ReadingPool(InlinePool):
    """The real inline pool that, as each trial is submitted to be scored on the search
    split, reads the study through a fresh storage (what ``search status`` and the
    dashboard do mid-run)."""

    def __init__(self, config_path: Path) -> None:
        config = load_study(config_path)
        super().__init__(worker_setup(config))
        self.url = config.storage
        self.name = config.name
        self.seen: list[tuple[int, list[FrozenTrial]]] = []

    def submit(self, ticket: int, recipe: dict, split: str = "search") -> None:
        if split == "search":
            storage = resolve_storage(self.url)
            try:
                trials = optuna.load_study(study_name=self.name, storage=storage).get_trials()
            finally:
                if isinstance(storage, RDBStorage):
                    storage.engine.dispose()
            self.seen.append((ticket, trials))
        super().submit(ticket, recipe, split)


def test_a_reader_sees_the_driver_s_trials_while_the_study_runs(
    tmp_path: Path, llama_family: TinyFamily
) -> None:
    path = write_study(tmp_path, llama_family, trials=3)
    pool = ReadingPool(path)
    result = run_study(load_study(path), quiet=True, pool=pool, finalize_after=False)
    assert result.done == 3
    # the baselines are scored first, on the same split; the search trials are the last three
    searched = pool.seen[-3:]
    assert [len([t for t in trials if t.user_attrs.get("kind") == "search"]) for _, trials in searched] == [
        1, 2, 3
    ]
    for ticket, trials in searched:
        by_number = {t.number: t for t in trials}
        submitted = by_number[ticket]  # flushed before submit: its genes and recipe are there
        assert submitted.state == TrialState.RUNNING
        assert submitted.params and submitted.user_attrs.get("kind") == "search"
        assert "recipe" in submitted.user_attrs and "recipe_summary" in submitted.user_attrs
        # the inline pool runs one trial at a time: every other trial was told, on disk in full
        for trial in trials:
            if trial.number == ticket:
                continue
            assert trial.state.is_finished(), trial.number
            if trial.user_attrs.get("kind") == "search" and trial.state == TrialState.COMPLETE:
                assert {"recipe", "scores_search", "feasible"} <= set(trial.user_attrs)
                assert "constraints" in trial.system_attrs
                assert trial.values is not None


# -- 7. the real driver survives a dashboard's tell of its running trial ------------------------

# optuna-dashboard's own app, in another process, answering POST /api/trials/<id>/tell (what
# its "Mark as Complete" button sends) on the study's SQLite file.
DASHBOARD_TELL = """
import io, json, sys
from wsgiref.util import setup_testing_defaults
import optuna
from optuna_dashboard import wsgi
url, name, number = sys.argv[1], sys.argv[2], int(sys.argv[3])
trial_id = optuna.load_study(study_name=name, storage=url).trials[number]._trial_id
body = json.dumps({"state": "Complete", "values": [0.5]}).encode()
environ = {"REQUEST_METHOD": "POST", "PATH_INFO": f"/api/trials/{trial_id}/tell",
           "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": str(len(body)),
           "wsgi.input": io.BytesIO(body)}
setup_testing_defaults(environ)
status = []
b"".join(wsgi(url)(environ, lambda code, headers, *rest: status.append(code)))
print(status[0])
"""


class DashboardTellingPool(InlinePool):
    """The real inline pool; when the first search trial is submitted (running, flushed), a
    dashboard in another process tells it complete."""

    def __init__(self, config_path: Path) -> None:
        config = load_study(config_path)
        super().__init__(worker_setup(config))
        self.url, self.name = config.storage, config.name
        self.told: int | None = None

    def submit(self, ticket: int, recipe: dict, split: str = "search") -> None:
        if self.told is None and split == "search":
            trials = optuna.load_study(study_name=self.name, storage=self.url).trials
            if any(t.number == ticket and t.state == TrialState.RUNNING for t in trials):
                done = subprocess.run([sys.executable, "-c", DASHBOARD_TELL, self.url, self.name, str(ticket)],
                                      capture_output=True, text=True, timeout=300, cwd=REPO,
                                      env={**os.environ, "PYTHONPATH": str(REPO)})
                assert done.stdout.strip() == "204 No Content", done.stderr
                self.told = ticket
        super().submit(ticket, recipe, split)


def test_driver_survives_a_dashboard_tell_of_its_running_trial_and_never_ranks_it(
    tmp_path: Path, llama_family: TinyFamily, caplog: pytest.LogCaptureFixture
) -> None:
    from search import ranking
    from search.commands.export import choose_trial
    from search.commands.status import render_status

    path = write_study(tmp_path, llama_family, trials=3)
    pool = DashboardTellingPool(path)
    result = run_study(load_study(path), quiet=True, pool=pool)
    told = pool.told
    assert told is not None and result.done == 3 and result.finalized is not None
    assert f"trial {told} was finished by another process" in caplog.text

    study = optuna.load_study(study_name="tiny", storage=load_study(path).storage)
    trials = study.get_trials()
    stored = trials[told]
    assert stored.state == TrialState.COMPLETE and stored.values == [0.5]
    assert "scores_search" not in stored.user_attrs  # never scored by the driver
    assert told not in {t.number for t in ranking.search_trials(trials)}
    assert result.finalized.final_trial != told
    assert told not in {row.trial for row in result.finalized.rows}
    assert choose_trial(trials, {}, study.directions, None).number != told
    assert "complete" in render_status(study, budget=3)

    resumed = run_study(load_study(path, trials=4), quiet=True)  # resume: no KeyError, one more trial
    assert resumed.done == 4 and resumed.finalized is not None and resumed.finalized.final_trial != told


# -- 8. a full disk under the study storage: one clear line, nothing half-written ---------------


def filling_scorer(model: torch.nn.Module, batch: object, examples: Sequence[object]) -> list[float]:
    """Scores by the first head weight; at call $FILL_AT_CALL the study file's disk fills up.

    ``FILL_MODE=tmpfs``: a filler file takes every free byte of the small file system under
    the storage. ``FILL_MODE=rlimit``: this process's file size limit drops to the size the
    storage files have now (writes past it fail with EFBIG instead of SIGXFSZ killing it).
    """
    counter = os.environ.get("FILL_COUNTER_FILE")
    if counter:
        path = Path(counter)
        calls = int(path.read_text()) + 1 if path.exists() else 1
        path.write_text(str(calls))
        if calls == int(os.environ["FILL_AT_CALL"]):
            target = Path(os.environ["FILL_TARGET"])
            if os.environ["FILL_MODE"] == "tmpfs":
                fd = os.open(target, os.O_WRONLY | os.O_CREAT)
                with contextlib.suppress(OSError):
                    while True:
                        os.write(fd, b"\0" * 65536)
                with contextlib.suppress(OSError):
                    while True:
                        os.write(fd, b"\0")
                os.close(fd)
            else:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                sizes = [p.stat().st_size for p in target.parent.iterdir() if p.name.startswith(target.name)]
                resource.setrlimit(resource.RLIMIT_FSIZE, (max(sizes), resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return [float(model.lm_head.weight[0, 0])] * len(examples)


def trials_on_disk(url: str, name: str) -> list[FrozenTrial]:
    """The study's trials through a storage opened and closed here (no file is left open)."""
    storage = resolve_storage(url)
    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials()
    finally:
        if isinstance(storage, RDBStorage):
            storage.engine.dispose()


@contextlib.contextmanager
def small_file_system(folder: Path, mode: str) -> Iterator[Path]:
    """A 16 MiB tmpfs at ``folder`` (root only), or a plain folder for the rlimit mode."""
    folder.mkdir()
    if mode == "rlimit":
        yield folder
        return
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the rlimit case covers a failing write")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


# Scorer calls: 4 baselines x 2 tasks, then 2 per search trial: call 14 is the third search
# trial's second task, so the disk fills mid-search with trials left for the resume.
FILL_AT_CALL = 14
FULL_DISK_TRIALS = 5


@pytest.mark.parametrize(("mode", "backend"), [("tmpfs", "sqlite"), ("tmpfs", "journal"), ("rlimit", "sqlite")])
def test_a_full_disk_stops_the_driver_with_one_line_and_the_study_resumes(
    tmp_path: Path, llama_family: TinyFamily, mode: str, backend: str
) -> None:
    with small_file_system(tmp_path / "small", mode) as small:
        url = storage_url(small, backend)
        stored_file = small / ("study.db" if backend == "sqlite" else "study.journal")
        path = write_study(tmp_path, llama_family, trials=FULL_DISK_TRIALS,
                           metric="tests.test_write_behind:filling_scorer")
        path.write_text(path.read_text().replace("[study]\n", f'[study]\nstorage = "{url}"\n', 1))
        filler = small / "filler"
        env = {**os.environ, "PYTHONPATH": str(REPO), "FILL_COUNTER_FILE": str(tmp_path / "calls"),
               "FILL_AT_CALL": str(FILL_AT_CALL), "FILL_MODE": mode,
               "FILL_TARGET": str(filler if mode == "tmpfs" else stored_file)}
        cli = [sys.executable, "-m", "search.cli", "start", str(path), "--quiet"]
        first = subprocess.run(cli, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert first.returncode == 2, first.stderr
        lines = first.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in first.stderr, first.stderr
        assert lines[0].startswith(f"error: storage {stored_file}: cannot write the study: "), lines[0]
        assert ("ENOSPC" if mode == "tmpfs" else "EFBIG") in lines[0] and "exceeding max length" not in lines[0]
        assert "run `search start` again to resume" in lines[0]

        filler.unlink(missing_ok=True)  # space again
        stored = trials_on_disk(url, "tiny")
        searched = [t for t in stored if t.user_attrs.get("kind") == "search"]
        assert len([t for t in searched if t.state == TrialState.COMPLETE]) < FULL_DISK_TRIALS
        for trial in stored:  # finished means complete: nothing half-written looks done
            if trial.state == TrialState.COMPLETE:
                assert {"scores_search", "feasible", "gates"} <= set(trial.user_attrs), trial.number

        env.pop("FILL_COUNTER_FILE")
        again = subprocess.run(cli, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert again.returncode == 0, again.stderr
        final = trials_on_disk(url, "tiny")
        done = [t for t in final if t.user_attrs.get("kind") == "search" and t.state == TrialState.COMPLETE]
        assert len(done) == FULL_DISK_TRIALS and all("scores_search" in t.user_attrs for t in done)
