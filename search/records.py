"""What the driver stores on a scored trial (search trial or baseline) beside its values.

The user attributes every reader relies on (status, export, report, dashboard: see
"What a trial stores" in docs/ARCHITECTURE.md): the recipe's one-line summary, the
scores, each gate's result by name (``search.gate_record``), the gates as one line, and feasibility.

Per-row results (one value per row per task, the values each task's score is the mean of;
what paired intervals are computed from) are kept compactly where the dashboard does not
list them: a scored trial's search rows in its system attribute ``rows_search``, its
held-out rows in its held-out record (``search.storage``), each task's rows encoded as one
string (:func:`encode_rows`: 0/1 rows as bits, others as float64 bytes, base64). Which rows
they are is stored once on the study (user attribute ``example_rows``: split -> task ->
``{"n", "ids"}``, ids as runs of file rows), the same for every trial. :func:`trial_rows` is the one reader.

A study scored in stages (``study.fidelity``, ``fitness.fidelity``) stores a trial that did not
reach the last stage (stopped, or still running) with only the rows it scored: each task's rows
are a prefix of the study's row order (not file order), marked ``prefix:<rows of the task>:``
before the encoding; :func:`decode_rows_prefix` tells the prefix length and the task's size,
:func:`trial_prefix_rows` reads them, and :func:`trial_rows` gives None for such a trial (no
paired comparison over every row is possible with it). A trial scored on every row is stored in
file order as in a study without stages. A stopped trial (state PRUNED) holds its stages in user
attr ``fidelity`` (``search.staged``); :func:`stopped_trial` reads it for status and the report,
which say it in the words of :func:`stopped_early`.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fitness.gates import GateResult
from merges.recipe import Recipe
from search import gate_record
from search.errors import SearchError

if TYPE_CHECKING:  # status imports this module: no numpy or optuna at import (issue 12)
    import numpy as np
    import optuna
    from optuna.trial import FrozenTrial

ROWS_SEARCH_ATTR = "rows_search"
"""Trial system attribute: task -> encoded search-split rows (:func:`encode_rows`)."""
EXAMPLE_ROWS_ATTR = "example_rows"
"""Study user attribute: split -> task -> {"n": rows, "ids": ["FILE:FIRST-LAST", ...]} (:func:`row_ids`)."""
_PREFIX = "prefix:"
_BITS = "bits:"
_FLOAT64 = "f64:"

STOPPED_EARLY = "stopped early (multi-fidelity: scored on fewer rows, never best)"
"""How status and the report say that trials scored in stages were stopped (:func:`stopped_early`)."""
FIDELITY_ATTR = "fidelity"
"""Study user attr: the row order's inputs and digest (``search.staged.study_stages``); trial user
attr: the trial's stages (``search.loop``: ``stage``, ``stages``, ``rows``, and on a stopped trial
``stopped``, ``estimate``, ``objective``; on a re-run, ``carried``: rows kept from the lost run).
Here, not in ``search.staged``, because status, the report and the samplers read it without it."""

HELDOUT_KEY_PREFIX = "heldout:"  # study user attr heldout:<trial number>, a HeldoutRecord (no Optuna here: status reads it)


def score_attrs(scores: Mapping[str, float], gates: Sequence[GateResult]) -> dict[str, object]:
    """A scored trial's user attributes: scores, gate margins and status, feasibility."""
    return {"scores_search": dict(scores), **gate_record.trial_gate_attrs(gates)}


def summarize_recipe(recipe: Recipe, labels: Sequence[str]) -> str:
    """One readable line: method, groups, per-source means of each per-source parameter."""
    parts = [recipe.method, f"{len(recipe.groups)} group(s)"]
    for name, table in recipe.tensor_params.items():
        cells = [cell for row in table for cell in row]
        means = [sum(c[i] for c in cells) / len(cells) for i in range(len(recipe.sources))]
        parts.append(f"{name} " + " ".join(f"{lab}={m:.2f}" for lab, m in zip(labels, means, strict=False)))
    for name, table in recipe.global_params.items():
        values = [v for row in table for v in row]
        if all(isinstance(v, bool) for v in values):
            parts.append(f"{name}={values[0]}")
        else:
            parts.append(f"{name}={sum(float(v) for v in values) / len(values):.2f}")
    if recipe.layer_slices:
        parts.append(" ".join(f"{s.model.rsplit('/', 1)[-1]}[{s.start}:{s.end}]" for s in recipe.layer_slices))
    return ", ".join(parts)


@dataclass(frozen=True)
class HeldoutRecord:
    """A trial's scores on the held-out split and its gates evaluated there."""

    scores: dict[str, float]
    gate_margins: dict[str, float]
    feasible: bool
    rows: dict[str, str] | None = None  # task -> encoded per-row values (rows_attr)

    def to_json(self) -> dict[str, object]:
        return {
            "scores_heldout": dict(self.scores),
            "gate_margins_heldout": dict(self.gate_margins),
            "feasible_heldout": self.feasible,
            **({"rows_heldout": dict(self.rows)} if self.rows else {}),
        }


def stopped_early(count: int, of: int | None = None) -> str:
    """``N stopped early (...)``, or with ``of`` (search trials done) ``N of M search trials stopped early (...)``."""
    return f"{count} {STOPPED_EARLY}" if of is None else f"{count} of {of} search trials {STOPPED_EARLY}"


@dataclass(frozen=True)
class StoppedTrial:
    """A search trial stopped after a stage (its user attr ``fidelity``, as ``search.loop`` stores it)."""

    number: int
    stage: int  # the last stage it was scored on (1-based)
    stages: int  # the study's stages
    rows: dict[str, int]  # task -> rows scored
    estimate: dict[str, float]  # task -> mean of those rows
    objective: tuple[float, ...]  # the objective(s) from the estimate
    reason: str  # why it was stopped


def stopped_trial(trial: FrozenTrial) -> StoppedTrial | None:
    """The stages of a trial stopped early; None for any other trial."""
    record = trial.user_attrs.get(FIDELITY_ATTR)
    if trial.state.name != "PRUNED" or not isinstance(record, Mapping) or "stopped" not in record:
        return None
    rows, estimate = record.get("rows"), record.get("estimate")
    return StoppedTrial(
        trial.number, int(record.get("stage", 0)), int(record.get("stages", 0)),
        {str(t): int(n) for t, n in rows.items()} if isinstance(rows, Mapping) else {},
        {str(t): float(v) for t, v in estimate.items()} if isinstance(estimate, Mapping) else {},
        tuple(float(v) for v in record.get("objective") or ()), str(record["stopped"]),
    )


def heldout_record(study_user_attrs: Mapping[str, object], trial_number: int) -> HeldoutRecord | None:
    """The held-out record of a trial from the study's user attributes, if it was re-scored."""
    raw = study_user_attrs.get(f"{HELDOUT_KEY_PREFIX}{trial_number}")
    if not isinstance(raw, Mapping):
        return None
    return HeldoutRecord(
        scores={str(k): float(v) for k, v in raw["scores_heldout"].items()},
        gate_margins={str(k): float(v) for k, v in raw["gate_margins_heldout"].items()},
        feasible=bool(raw["feasible_heldout"]),
        rows={str(k): str(v) for k, v in raw["rows_heldout"].items()} if isinstance(raw.get("rows_heldout"), Mapping)
        else None,
    )


def encode_rows(values: Sequence[float]) -> str:
    """One task's row values as a compact string (exact: 0/1 rows as bits, others as float64)."""
    import numpy as np

    array = np.asarray(values, dtype=np.float64)
    if np.all((array == 0.0) | (array == 1.0)):
        packed = np.packbits(array.astype(np.uint8)).tobytes()
        return f"{_BITS}{array.size}:{base64.b64encode(packed).decode('ascii')}"
    return _FLOAT64 + base64.b64encode(array.astype("<f8").tobytes()).decode("ascii")


def encode_prefix(values: Sequence[float], of: int) -> str:
    """The first rows of a task in the study's row order (``of``: the task's search rows)."""
    if not 0 <= len(values) <= of:
        raise SearchError(f"a prefix of {len(values)} rows of a task with {of} rows")
    return f"{_PREFIX}{of}:{encode_rows(values)}"


def decode_rows_prefix(text: str) -> tuple[np.ndarray, int | None]:
    """The values and, for a prefix (:func:`encode_prefix`), the task's row count (else None:
    every row, in file order); the prefix length is the array's size."""
    if text.startswith(_PREFIX):
        of, _, inner = text[len(_PREFIX):].partition(":")
        if not of.isdigit():
            raise SearchError(f"stored per-row values are corrupt: bad prefix {text[:24]!r}")
        values = decode_rows(inner)
        if values.size > int(of):
            raise SearchError(f"stored per-row values are corrupt: {values.size} rows of a task with {of}")
        return values, int(of)
    return decode_rows(text), None


def decode_rows(text: str) -> np.ndarray:
    """The float64 row values :func:`encode_rows` or :func:`encode_prefix` encoded."""
    import numpy as np

    if text.startswith(_PREFIX):
        return decode_rows_prefix(text)[0]

    try:
        if text.startswith(_BITS):
            count, _, payload = text[len(_BITS):].partition(":")
            bits = np.unpackbits(np.frombuffer(base64.b64decode(payload), dtype=np.uint8))
            return bits[:int(count)].astype(np.float64)
        if text.startswith(_FLOAT64):
            return np.frombuffer(base64.b64decode(text[len(_FLOAT64):]), dtype="<f8").astype(np.float64)
    except (ValueError, TypeError) as exc:
        raise SearchError(f"stored per-row values are corrupt: {exc}") from exc
    raise SearchError(f"stored per-row values have an unknown encoding: {text[:16]!r}")


def rows_attr(rows: Mapping[str, Sequence[float]]) -> dict[str, str]:
    """The stored form of a trial's rows on one split: task -> encoded values."""
    return {task: encode_rows(values) for task, values in rows.items()}


def trial_rows(trial: FrozenTrial, study_user_attrs: Mapping[str, object],
               split: str = "search", *, decode: Callable[[str], np.ndarray] | None = None) -> dict[str, np.ndarray] | None:
    """A trial's per-row values on ``split`` (task -> float64 array in the study's row order),
    or None when it has none stored (not scored on that split; a task without per-row values,
    such as an lm-eval metric lm-eval does not average, leaves its task out). ``decode``: what
    decodes each task's text (default :func:`decode_rows`; ``search.staged`` passes a memo)."""
    if split == "search":
        raw = trial.system_attrs.get(ROWS_SEARCH_ATTR)
    else:
        record = heldout_record(study_user_attrs, trial.number)
        raw = None if record is None else record.rows
    if not isinstance(raw, Mapping) or not raw or any(str(text).startswith(_PREFIX) for text in raw.values()):
        return None  # none stored, or a stopped trial's prefix (trial_prefix_rows)
    decode = decode or decode_rows
    return {str(task): decode(str(text)) for task, text in raw.items()}


def prefix_rows_attr(rows: Mapping[str, Sequence[float]], task_rows: Mapping[str, int]) -> dict[str, str]:
    """The stored form of a trial's rows scored in stages: task -> prefix of the study's order."""
    return {task: encode_prefix(values, task_rows[task]) for task, values in rows.items()}


def trial_prefix_rows(trial: FrozenTrial, *, decode: Callable[[str], np.ndarray] | None = None
                      ) -> dict[str, np.ndarray] | None:
    """A trial's search rows scored in stages (task -> prefix of the study's row order), or
    None when it holds none or holds every row (file order: :func:`trial_rows`); ``decode`` as there."""
    raw = trial.system_attrs.get(ROWS_SEARCH_ATTR)
    if not isinstance(raw, Mapping) or not raw or not all(str(t).startswith(_PREFIX) for t in raw.values()):
        return None
    decode = decode or decode_rows
    return {str(task): decode(str(text)) for task, text in raw.items()}


def row_ids(examples_by_task: Mapping[str, Sequence[tuple[str, int]]]) -> dict[str, dict[str, object]]:
    """What identifies each task's rows on one split: their count and ids, in row order, as
    ``FILE:FIRST-LAST`` runs of consecutive rows of one file (``FILE:ROW`` for a single row)."""
    out: dict[str, dict[str, object]] = {}
    for task, rows in examples_by_task.items():
        runs: list[list[object]] = []  # [file, first, last]
        for file, row in rows:
            if runs and runs[-1][0] == file and runs[-1][2] == row - 1:
                runs[-1][2] = row
            else:
                runs.append([file, row, row])
        ids = [f"{f}:{a}" if a == b else f"{f}:{a}-{b}" for f, a, b in runs]
        out[task] = {"n": len(rows), "ids": ids}
    return out


def expand_row_ids(ids: Sequence[str]) -> list[tuple[str, int]]:
    """The ``(file, row)`` of every row, in order, from :func:`row_ids`' runs."""
    out: list[tuple[str, int]] = []
    for run in ids:
        file, _, span = str(run).rpartition(":")
        first, _, last = span.partition("-")
        out += [(file, row) for row in range(int(first), int(last or first) + 1)]
    return out


def store_row_ids(study: optuna.Study, split: str, ids: Mapping[str, Mapping[str, object]] | None) -> None:
    """Add ``split``'s row identity to the study's ``example_rows`` unless it holds it already
    (the rows are the same for every trial: stored once)."""
    if not ids:
        return
    stored = study.user_attrs.get(EXAMPLE_ROWS_ATTR)
    current = dict(stored) if isinstance(stored, Mapping) else {}
    if current.get(split) == {task: dict(value) for task, value in ids.items()}:
        return
    current[split] = {task: dict(value) for task, value in ids.items()}
    study.set_user_attr(EXAMPLE_ROWS_ATTR, current)
