"""What a finalist generated: one JSON Lines file per re-scored trial, linked from the study.

Finalize re-scores the finalists (and the baselines) on the held-out slices; for generation
tasks the worker returns, per example, the prompt, the gold answer, the generated text (cut at
the first stop string), what the comparison extracted and the verdict
(:func:`fitness.generation.generation_records`). They go to
``<output>/generations/trial-<number>.jsonl``: a first line ``{"mergesearch": "generations",
"trial": N}``, then one record per line in task and file order. The file's path is kept in
the study user attr ``generations:<number>`` so the report and the dashboard note can link it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import optuna

from merges.output import write_file

SIGNATURE = '{"mergesearch": "generations"'
KEY_PREFIX = "generations:"


def save_generations(study: optuna.Study, output: Path, trial_number: int,
                     records: Mapping[str, Sequence[Mapping[str, object]]]) -> Path:
    """Write one trial's generated answers atomically and record where they are."""
    header = json.dumps({"mergesearch": "generations", "trial": trial_number})
    lines = [header, *(json.dumps(record, ensure_ascii=False) for task in records for record in records[task])]
    path = write_file(Path(output) / "generations" / f"trial-{trial_number}.jsonl", "\n".join(lines) + "\n",
                      signature=SIGNATURE)
    study.set_user_attr(f"{KEY_PREFIX}{trial_number}", str(path))
    return path


def generations_file(study_user_attrs: Mapping[str, object], trial_number: int) -> str | None:
    """Where a trial's generated answers were written, if it has any."""
    value = study_user_attrs.get(f"{KEY_PREFIX}{trial_number}")
    return value if isinstance(value, str) else None
