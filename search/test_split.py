"""The test split: the chosen recipe's score on rows that no choice has looked at.

Finalize chooses among the top-k by held-out scores (``search.finalize``), so the held-out
score of the chosen recipe is biased upward, and the search scores chose the top-k. When
every task names a ``test`` file, finalize, *after* choosing, scores the final trial and the
best baseline on held-out (for the gain) on the test rows, once: :func:`score_test`. Nothing
reads a test score to choose anything; the test rows do not define the study (adding or
changing them extends it, ``search.definition``), and a test file whose contents changed
since its scores were stored is scored again by the next ``search finalize``.

Stored on the study (light: status reads them without Optuna):

* ``test:<number>`` — a :class:`ScoresOnTest` (task scores and per-row values, as held-out
  records keep them, ``search.records``);
* ``test_split`` (:data:`TEST_ATTR`) — ``{"trial", "baseline", "baseline_trial", "data", "error"}``:
  which trial was final when the test rows were scored, the baseline compared with, the
  SHA-256 of each task's test file, and why scoring failed (None when it did not); None when
  the study has no test split (or no final trial);
* ``example_rows["test"]`` — which rows (``search.records.store_row_ids``).

What ``status``, the report and the chosen trial's note say about it is
``search.confidence.test_lines``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fitness.spec import TEST_SPLIT, TaskSpec
from search.records import decode_rows, rows_attr, store_row_ids
from studies.demo_family.shipped import sha256_file

if TYPE_CHECKING:  # status imports this module without numpy or optuna
    import numpy as np
    import optuna
    from optuna.trial import FrozenTrial

    from search.pool import WorkerPool
    from search.progress import Progress

TEST_KEY_PREFIX = "test:"
"""Study user attribute ``test:<trial number>``: a :class:`ScoresOnTest`."""
TEST_ATTR = "test_split"
"""Study user attribute: what was scored on the test split (see the module docstring)."""
NO_TEST_SPLIT = "no test split (no task names a `test` file; the held-out score above is the final word)"


@dataclass(frozen=True)
class ScoresOnTest:
    """A trial's scores on the test split (and the per-row values they are the mean of)."""

    scores: dict[str, float]
    rows: dict[str, str] | None = None  # task -> encoded per-row values (search.records.rows_attr)

    def to_json(self) -> dict[str, object]:
        return {"scores_test": dict(self.scores), **({"rows_test": dict(self.rows)} if self.rows else {})}


def read_test_record(study_user_attrs: Mapping[str, object], trial_number: int) -> ScoresOnTest | None:
    """The test record of a trial, if it was scored on the test split."""
    raw = study_user_attrs.get(f"{TEST_KEY_PREFIX}{trial_number}")
    if not isinstance(raw, Mapping) or not isinstance(raw.get("scores_test"), Mapping):
        return None
    rows = raw.get("rows_test")
    return ScoresOnTest({str(k): float(v) for k, v in raw["scores_test"].items()},
                      {str(k): str(v) for k, v in rows.items()} if isinstance(rows, Mapping) and rows else None)



def record_rows(record: ScoresOnTest | None) -> dict[str, np.ndarray] | None:
    """The record's per-row values (task -> float64 array), or None when it has none."""
    if record is None or not record.rows:
        return None
    return {task: decode_rows(text) for task, text in record.rows.items()}


def read_test_state(study_user_attrs: Mapping[str, object]) -> Mapping[str, object] | None:
    """The stored :data:`TEST_ATTR`, or None (no test split, or not finalized)."""
    state = study_user_attrs.get(TEST_ATTR)
    return state if isinstance(state, Mapping) else None



def has_test_split(tasks: Sequence[TaskSpec]) -> bool:
    """Whether the study has a test split (``search.config`` requires it of every task or none)."""
    return bool(tasks) and all(task.test is not None for task in tasks)


def data_fingerprint(tasks: Sequence[TaskSpec]) -> dict[str, str]:
    """Task -> SHA-256 of its test file (a stored score is stale when its file changed)."""
    return {task.name: sha256_file(Path(task.test)) for task in tasks if task.test is not None}


def score_test(study: optuna.Study, tasks: Sequence[TaskSpec], pool: WorkerPool, progress: Progress,
               final: FrozenTrial | None, baseline: tuple[str, FrozenTrial] | None) -> str | None:
    """Score ``final`` and ``baseline`` (the best baseline on held-out) on the test rows, unless
    their stored scores are of the same test files; record :data:`TEST_ATTR`. Called by
    finalize *after* the final trial is chosen. Returns what failed (None: nothing)."""
    if final is None or not has_test_split(tasks):
        study.set_user_attr(TEST_ATTR, None)
        return None
    # search.pool imports torch (the worker): imported here, so status stays light
    from search.pool import evaluate_all

    data = data_fingerprint(tasks)
    state = read_test_state(study.user_attrs)
    same_data = state is not None and state.get("data") == data
    wanted = [final] + ([] if baseline is None else [baseline[1]])
    todo = [t for t in wanted if not (same_data and read_test_record(study.user_attrs, t.number) is not None)]
    errors: list[str] = []
    if todo:
        progress.message(f"scoring on the test split, once, after the choice: trial(s) "
                         f"{', '.join(str(t.number) for t in todo)} (the final trial"
                         + (f" and the best baseline on held-out, {baseline[0]})" if baseline else ")"))
        outcomes = evaluate_all(pool, [t.user_attrs["recipe"] for t in todo], TEST_SPLIT)
        store_row_ids(study, TEST_SPLIT, next((o.row_ids for o in outcomes if o.row_ids), None))
        for trial, outcome in zip(todo, outcomes, strict=True):
            if outcome.scores is None:
                errors.append(f"trial {trial.number}: {outcome.error}")
                study.set_user_attr(f"{TEST_KEY_PREFIX}{trial.number}", None)
                continue
            record = ScoresOnTest(dict(outcome.scores), rows_attr(outcome.rows) if outcome.rows else None)
            study.set_user_attr(f"{TEST_KEY_PREFIX}{trial.number}", record.to_json())
    error = "; ".join(errors) or None
    study.set_user_attr(TEST_ATTR, {
        "trial": final.number,
        "baseline": None if baseline is None else baseline[0],
        "baseline_trial": None if baseline is None else baseline[1].number,
        "data": data,
        "error": error,
    })
    return error

