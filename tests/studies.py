"""Small real studies for tests: synthetic jsonl task slices and a study.toml on a tiny family.

Slices are word prompts with one-word answers over the tiny vocabulary of
``tests.checkpoints``; ``loglik`` scores them, which varies continuously between recipes.
Studies run in-process with the inline pool, so a handful of trials takes seconds.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path

import optuna
import torch

from search import storage
from search.config import StudyConfig, load_study
from search.driver import run_study
from tests.checkpoints import TinyFamily

ROWS = 12
TASKS = ("alpha", "beta")


def write_slices(folder: Path, task: str, *, seed: int, rows: int = ROWS) -> tuple[Path, Path]:
    """Search and held-out jsonl files of word prompts and one-word answers."""
    gen = torch.Generator().manual_seed(seed)
    paths = []
    for split in ("search", "heldout"):
        path = folder / f"{task}-{split}.jsonl"
        with path.open("w") as f:
            for _ in range(rows):
                words = torch.randint(4, 60, (4,), generator=gen).tolist()
                prompt = " ".join(f"w{w - 4}" for w in words[:3])
                f.write(json.dumps({"prompt": prompt, "answer": f"w{words[3] - 4}"}) + "\n")
        paths.append(path)
    return paths[0], paths[1]


def write_study(
    folder: Path,
    family: TinyFamily,
    *,
    trials: int,
    name: str = "tiny",
    sampler: str = "random",
    method: str = "linear",
    objective: str = "mean",
    population: int | None = None,
    gates: Mapping[str, str] | None = None,
    metric: str = "loglik",
    genome_extra: str = "",
    tasks: Sequence[str] = TASKS,
    top_k: int = 2,
    seed: int = 0,
) -> Path:
    """A study.toml in ``folder`` (output ``folder/out``); ``gates``: task -> TOML inline table."""
    sources = "\n".join(f's{i} = "{p}"' for i, p in enumerate(family.sources))
    blocks = []
    for index, task in enumerate(tasks):
        search, heldout = write_slices(folder, task, seed=index)
        gate = (gates or {}).get(task)
        blocks.append(
            f'[[tasks]]\nname = "{task}"\nsearch = "{search}"\nheldout = "{heldout}"\n'
            f'metric = "{metric}"\n' + (f"gates = {gate}\n" if gate else "")
        )
    text = f"""
[study]
name = "{name}"
seed = {seed}
output = "{folder / 'out'}"
trials = {trials}
sampler = "{sampler}"
{f'population = {population}' if population else ''}
objective = "{objective}"
top_k = {top_k}

[models]
base = "{family.base}"

[models.sources]
{sources}

[genome]
method = "{method}"
layer_granularity = 2
{genome_extra}

{chr(10).join(blocks)}

[execution]
backend = "inline"
device = "cpu"
batch_size = 16
"""
    path = folder / "study.toml"
    path.write_text(text)
    return path


def run(path: Path) -> tuple[StudyConfig, optuna.Study]:
    """Run the study to its budget (baselines, search, finalize) and load it back."""
    config = load_study(path)
    run_study(config, quiet=True)
    return config, storage.load_existing_study(config.name, config.storage)


def stored_study(path: Path, out: Path | None = None) -> optuna.Study:
    """The study ``path`` (a study.toml) names, loaded as every command but the driver loads it."""
    config = load_study(path, out=out)
    return storage.load_existing_study(config.name, config.storage)


def source_scores(path: Path, task: str) -> list[float]:
    """The sources' search-split scores on ``task``, sorted, scored directly (no study run).

    The driver stores exactly these numbers on the ``source:<label>`` baselines.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fitness.scoring import score_slice
    from fitness.slices import load_task

    config = load_study(path)
    spec = next(t for t in config.tasks if t.name == task)
    data = load_task(spec, AutoTokenizer.from_pretrained(config.models.base))
    scores = []
    for source in config.models.sources.values():
        model = AutoModelForCausalLM.from_pretrained(source).eval()
        scores.append(score_slice(model, data.search))
    return sorted(scores)


def gated_study(
    folder: Path, family: TinyFamily, *, trials: int, task: str = "alpha", sampler: str = "random",
    objective: str = "mean", population: int | None = None,
) -> Path:
    """A study gated on ``task`` three quarters of the way down from its best source to its
    worst, so some candidates pass and some fail (merges of these sources mostly land in the
    middle). The gate is ``max_regression`` against the best source, so on the held-out split
    it sits at the same distance below the best source there."""
    scores = source_scores(write_study(folder, family, trials=0), task)
    allowed = (scores[-1] - scores[0]) * 3 / 4
    return write_study(
        folder, family, trials=trials, sampler=sampler, objective=objective, population=population,
        gates={task: f'{{ max_regression = {allowed!r}, against = "best" }}'},
    )


def open_running_study(config: StudyConfig) -> optuna.Study | None:
    """The study another process (a ``search start`` under test) is writing, once it exists.

    Opening the storage while the driver is still creating its schema would make this
    process create it too, and one of the two would fail on alembic's version row; so the
    storage is opened only after a read-only look finds the study's row.
    """
    db = config.output / "study.db"
    if not db.exists():
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as connection:
            row = connection.execute(
                "SELECT 1 FROM studies WHERE study_name = ?", (config.name,)
            ).fetchone()
    except sqlite3.OperationalError:
        return None  # no schema yet
    if row is None:
        return None
    return optuna.load_study(study_name=config.name, storage=config.storage)
