"""What defines a study, so that a changed study file cannot silently continue an old one.

A study's trials only mean something together when they were sampled from one search
space and scored the same way. :func:`study_definition` collects what decides that:

* ``models``: the base and each source (by label) as a fingerprint of its folder (the size
  of every file, the SHA-256 of ``config.json``; paths are not compared, so a moved
  checkpoint is the same model), and the dtype trials are merged in;
* ``genome``: every gene setting (method, granularity, bounds, fixed values, frankenmerge);
* ``tasks``: per task, its data (SHA-256 of each file) and every setting that changes a
  score (fields, split, limit, metric, weight, chat template...), but not its gates;
* ``seed``, ``sampler``, ``population`` and ``objective``;
* with a warm start (``search.warm_start``), ``enqueue`` (each recipe file's SHA-256, in
  order) and ``warm_start`` (the earlier study's name and the SHA-256 of its definition);
  a study without one has neither key, so studies from before warm starts still match.

Not part of it, so a study can be extended deliberately: the budget (``trials``),
gates, ``top_k``, ``[execution]``, and where the files live.

The definition is stored as the study user attribute ``definition`` when the study is
created; :func:`check_definition` refuses a study file that defines something else and
names every difference.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from fitness.spec import FORMATS, TaskSpec
from merges.lora import reference_folders
from search.config import StudyConfig
from search.errors import SearchError
from studies.demo_family.shipped import sha256_file  # light, imports nothing of search: no cycle

if TYPE_CHECKING:  # confidence.py (status) reads DEFINITION_KEY without optuna
    import optuna

DEFINITION_KEY = "definition"
"""Study user attribute holding the definition (a JSON object)."""
LEGACY_KEYS = ("seed", "sampler")
"""Study attributes a study created before definitions were stored already had."""
SHOWN_CHANGES = 8
NOT_DEFINING_TASK_FIELDS = ("gates", "name", "search", "heldout", "test")  # gates: looser gates extend a study;
# test: no choice reads it, so adding or changing it extends a study (search/test_split.py)


class DefinitionChangedError(SearchError):
    """The study file defines another study than the one stored under its name."""


def genome_definition(config: StudyConfig) -> object:
    """The genome part of a study's definition (also what a CMA-ES warm start must share)."""
    genome = _jsonable(dataclasses.asdict(config.genome))
    if isinstance(genome, dict) and not genome.get("params"):
        genome.pop("params", None)  # definitions stored before genome.params existed stay equal
    return genome


def study_definition(config: StudyConfig) -> dict[str, object]:
    """The definition of the study ``config`` describes (JSON values; checkpoints must exist)."""
    from search.warm_start import warm_start_definition  # it reads the earlier study

    models = config.models
    genome = genome_definition(config)
    return {
        "models": {
            "base": checkpoint_fingerprint(Path(models.base)),
            "sources": {label: _source_fingerprint(p) for label, p in models.sources.items()},
            "dtype": models.dtype,
            **({"tokenizer": models.tokenizer} if models.tokenizer is not None else {}),  # older studies: absent
        },
        "genome": genome,
        "tasks": {task.name: _task_definition(task) for task in config.tasks},
        "seed": config.seed,
        "sampler": config.sampler,
        "population": config.population,
        "objective": config.objective,
        **warm_start_definition(config),
    }


def _source_fingerprint(source: Path) -> dict[str, object]:
    """A plain source's fingerprint; a LoRA source (``MODEL+ADAPTER``): its model's and its adapter's."""
    folders = reference_folders(source)
    if len(folders) == 1:
        return checkpoint_fingerprint(folders[0])
    return {"model": checkpoint_fingerprint(folders[0]), "lora": checkpoint_fingerprint(folders[1])}


def checkpoint_fingerprint(folder: Path) -> dict[str, object]:
    """Sizes of the files in a checkpoint folder and the hash of its config (reading no weights).

    Hidden files and model cards (``*.md``) are left out: they change no merge.
    """
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix != ".md")
    fingerprint: dict[str, object] = {"files": {p.name: p.stat().st_size for p in files}}
    config = folder / "config.json"
    if config.is_file():
        fingerprint["config_sha256"] = sha256_file(config)
    return fingerprint


def _task_definition(task: TaskSpec) -> dict[str, object]:
    fields = {
        f.name: getattr(task, f.name) for f in dataclasses.fields(task) if f.name not in NOT_DEFINING_TASK_FIELDS
    }
    fields["search_data"] = _data_fingerprint(task.search)
    if task.lm_eval is not None:  # lm-eval's task YAMLs (and their Python and data) define its documents
        include = task.lm_eval.include
        fields["lm_eval"] = {k: v for k, v in dataclasses.asdict(task.lm_eval).items() if k != "include"}  # not where
        fields["search_data"] = {} if include is None else _include_fingerprint(include)
    fields["heldout_data"] = None if task.heldout is None else _data_fingerprint(task.heldout)
    return _jsonable(fields)


def _data_fingerprint(path: Path, suffixes: tuple[str, ...] | None = None) -> dict[str, str]:
    """File name -> SHA-256 of a data file, or of every data file (``suffixes``) in a folder."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (suffixes or tuple(FORMATS)))
    else:
        files = [path]
    return {p.name: sha256_file(p) for p in files if p.exists()}


def _include_fingerprint(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every task YAML, Python and data file under an lm-eval include folder.

    Subfolders count: lm-eval indexes ``**/*.yaml`` below the include path (skipping
    ``__pycache__`` and ``.ipynb_checkpoints``), so a task defined two folders down is as much
    part of the study as one at the top. Top-level files keep their bare names, as before.
    """
    suffixes = (*FORMATS, ".yaml", ".yml", ".py")
    ignored = {"__pycache__", ".ipynb_checkpoints"}
    if not folder.is_dir():
        return _data_fingerprint(folder, suffixes)
    files = sorted(
        p for p in folder.rglob("*")
        if p.is_file() and p.suffix in suffixes and not ignored & set(p.relative_to(folder).parts)
    )
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in files}


def _jsonable(value: object) -> object:
    """Value as it reads back from JSON (tuples become lists, paths strings)."""
    return json.loads(json.dumps(value, default=str))


def check_definition(study: optuna.Study, definition: Mapping[str, object], storage_url: str, *,
                     store: bool = True) -> None:
    """Refuse to go on when the stored definition differs; store it on a study that has none.

    ``store=False``: only compare (read-only commands). A study created before definitions
    were stored is compared on what it kept (seed, sampler) and then gets this one.
    """
    attrs = study.user_attrs
    stored = attrs.get(DEFINITION_KEY)
    if not isinstance(stored, Mapping):
        stored = {key: attrs[key] for key in LEGACY_KEYS if key in attrs}
        current = {key: definition[key] for key in stored}
        complete = False
    else:
        current = _jsonable(definition)  # type: ignore[assignment]
        complete = True
    changes = describe_changes(stored, current)
    if changes:
        shown = changes[:SHOWN_CHANGES]
        more = len(changes) - len(shown)
        raise DefinitionChangedError(
            f"study {study.study_name!r} in {storage_url} was defined by another study file: "
            + "; ".join(shown) + (f"; and {more} more" if more > 0 else "")
            + ". To start a new study, use a new --out (or study name, or storage); to extend "
            "this one, undo those changes: a study goes on with more trials (--trials), other "
            "gates, top_k or [execution] settings, nothing else"
        )
    if store and not complete:
        study.set_user_attr(DEFINITION_KEY, _jsonable(definition))


def describe_changes(stored: Mapping[str, object], current: Mapping[str, object]) -> list[str]:
    """``key.path: old -> new`` for every leaf that differs (in key order)."""
    old, new = _flatten(stored), _flatten(current)
    changes = []
    for key in sorted(old.keys() | new.keys()):
        if old.get(key, _ABSENT) != new.get(key, _ABSENT):
            changes.append(f"{key}: {_show(old.get(key, _ABSENT))} -> {_show(new.get(key, _ABSENT))}")
    return changes


_ABSENT = object()


def _show(value: object) -> str:
    if value is _ABSENT:
        return "(none)"
    text = json.dumps(value)
    if isinstance(value, str) and len(value) == 64:  # a SHA-256
        return text[:13] + '…"'
    return text


def _flatten(value: object, prefix: str = "") -> dict[str, object]:
    if isinstance(value, Mapping) and value:
        out: dict[str, object] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}
