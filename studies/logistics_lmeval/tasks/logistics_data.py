"""lm-eval ``custom_dataset`` loaders over the demo family's rows (nothing is downloaded).

Each task YAML here names one of these functions with ``custom_dataset: !function
logistics_data.NAME``; lm-eval calls it with the task's metadata as keyword arguments
(ignored). The rows are the demo family's search and held-out files of one task, joined
into one ``test`` split: the study, not lm-eval, splits the documents into search and
held-out by index (``[[tasks]] split_seed`` / ``heldout_fraction``).
"""

from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "logistics" / "family" / "data"


def _rows(task: str) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for split in ("search", "heldout"):
        with open(DATA / task / f"{split}.jsonl", encoding="utf-8") as handle:
            rows.extend(json.loads(line) for line in handle if line.strip())
    return rows


def _dataset(rows: list[dict[str, object]]):  # -> datasets.DatasetDict
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def shipping(**_metadata: object):
    return _dataset(_rows("shipping"))


def catalog(**_metadata: object):
    return _dataset(_rows("catalog"))


def refunds(**_metadata: object):
    """Multiple choice: every refund decision seen in the data is an option."""
    rows = _rows("refunds")
    options = sorted({row["answer"] for row in rows})
    return _dataset([{**row, "choices": options, "label": options.index(row["answer"])} for row in rows])
