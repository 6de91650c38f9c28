"""The document split of a study's lm-eval tasks, recorded on the study.

lm-eval has no search / held-out split; the study makes one by document index
(:func:`fitness.lm_eval_task.split_documents`). ``search start`` records the split itself,
not only the keys that make it: the study user attribute ``lm_eval_splits`` holds, per
lm-eval task, ``{"lm_eval": NAME, "documents": N, "search": "0-3,7", "heldout": "4-6,8"}``
(:class:`~fitness.lm_eval_task.DocumentSplit`, indices as ranges). It is written once, when
the study is first run. A later run computes the split again and refuses to go on when it
differs, naming the task: the task's documents changed behind its YAML (another data file,
another dataset version, another lm-eval), so the new trials would not be scored on the
documents the old ones were.

Importing this module imports neither lm-eval nor torch (``search report`` reads the record).
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from fitness.errors import FitnessError
from fitness.lm_eval_task import DocumentSplit
from fitness.spec import TaskSpec

if TYPE_CHECKING:  # status imports this module and must not load optuna (issue 12)
    import optuna

SPLITS_KEY = "lm_eval_splits"
"""Study user attribute: task name -> its ``DocumentSplit.to_attr()``."""


def current_splits(tasks: Sequence[TaskSpec]) -> dict[str, DocumentSplit]:
    """The split of every lm-eval task as its documents are now (loads the tasks in lm-eval)."""
    from fitness.lm_eval_task import document_split

    return {task.name: document_split(task) for task in tasks if task.lm_eval is not None}


def stored_splits(study_user_attrs: Mapping[str, object]) -> dict[str, DocumentSplit]:
    """The splits a study recorded (none for a study without lm-eval tasks)."""
    stored = study_user_attrs.get(SPLITS_KEY)
    if not isinstance(stored, Mapping):
        return {}
    return {str(name): DocumentSplit.from_attr(value) for name, value in stored.items() if isinstance(value, Mapping)}


def record_splits(study: optuna.Study, splits: Mapping[str, DocumentSplit], storage_url: str, *,
                  store: bool = True) -> None:
    """Store ``splits`` on a study that has none (or lacks a task); refuse one they differ from.

    ``store=False``: only compare (``search finalize`` scores held-out documents, never records them).
    """
    if not splits:
        return
    from search.definition import DefinitionChangedError  # loads optuna: not at import (status)

    try:
        stored = stored_splits(study.user_attrs)
    except FitnessError as exc:
        raise DefinitionChangedError(f"study {study.study_name!r} in {storage_url}: {SPLITS_KEY}: {exc}") from None
    changes = [_difference(name, stored[name], split) for name, split in splits.items()
               if name in stored and stored[name] != split]
    if changes:
        raise DefinitionChangedError(
            f"study {study.study_name!r} in {storage_url} split its lm-eval documents differently: "
            + "; ".join(changes)
            + ". The task's documents changed behind its YAML (its data, or the dataset's or lm-eval's "
            "version), so new trials would be scored on other documents than the study's; restore them, "
            "or start a new study with a new --out (or study name, or storage)"
        )
    if store and any(name not in stored for name in splits):
        study.set_user_attr(SPLITS_KEY, {name: split.to_attr() for name, split in {**stored, **splits}.items()})


def _difference(name: str, old: DocumentSplit, new: DocumentSplit) -> str:
    parts = []
    if old.task != new.task:
        parts.append(f"lm-eval task {old.task!r} -> {new.task!r}")
    if old.documents != new.documents:
        parts.append(f"{old.documents} documents -> {new.documents}")
    for split, before, after in (("search", old.search, new.search), ("held-out", old.heldout, new.heldout)):
        if before != after:
            moved = len(set(before) ^ set(after))
            parts.append(f"{split} docs {len(before)} -> {len(after)} ({moved} indices differ)")
    return f"task {name!r}: " + ", ".join(parts)


def split_lines(study_user_attrs: Mapping[str, object]) -> list[str]:
    """``lm-eval task NAME (TASK): N search docs, M held-out docs (of D)`` per recorded task."""
    try:
        splits = stored_splits(study_user_attrs)
    except FitnessError as exc:
        return [str(exc)]
    return [split.describe(name) for name, split in splits.items()]


def splits_html(study_user_attrs: Mapping[str, object]) -> str:
    """The report's paragraph on the recorded splits, each with its document indices."""
    try:
        splits = stored_splits(study_user_attrs)
    except FitnessError as exc:
        return f"<p id='lm-eval-splits'>{html.escape(str(exc))}</p>"
    if not splits:
        return ""
    items = "".join(
        f"<li>{html.escape(split.describe(name))}<details><summary>document indices</summary>"
        f"<pre>search: {html.escape(split.to_attr()['search'])}\n"  # type: ignore[arg-type]
        f"held-out: {html.escape(split.to_attr()['heldout'])}</pre></details></li>"  # type: ignore[arg-type]
        for name, split in splits.items()
    )
    return ("<section id='lm-eval-splits'><p>The study's split of its lm-eval tasks' documents "
            f"(recorded when it was created):</p><ul>{items}</ul></section>")
