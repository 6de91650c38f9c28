"""What the dashboard shows beyond numbers: recipe artifacts, and a note on the best trial.

Everything goes through public Optuna / optuna-dashboard APIs (``upload_artifact``,
``save_note``), so optuna-dashboard serves it like any study's artifacts and notes:

* :func:`attach_recipe` uploads a search trial's mergekit YAML as the trial artifact
  ``recipe-<number>.yaml``. Optuna refuses to change a finished trial, so the driver calls
  it while the trial is still running (after decoding its genes, before ``tell``).
* :func:`attach_baseline_recipe` uploads a baseline's YAML as a *study* artifact
  ``baseline-<name>.yaml`` (baselines are stored finished, ``study.add_trial``, so they
  cannot take a trial artifact) and writes a note on the baseline's trial saying it is one.
* :func:`write_best_note` writes a Markdown note on the chosen trial (the final trial
  after ``finalize``, else the best feasible search trial: the one ``search export``
  writes and the report shows) and a short study note pointing at it.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import optuna
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.trial import FrozenTrial

from merges.layout import Layout
from merges.mergekit_yaml import recipe_to_mergekit
from merges.recipe import Recipe
from search import confidence, gate_record, ranking, storage
from search.errors import SearchError
from search.generations import generations_file

ARTIFACTS_FOLDER = "artifacts"
RECIPE_MIMETYPE = "application/yaml"


def artifact_dir(output: Path) -> Path:
    """The study's artifact folder: ``<output>/artifacts`` (what ``search dashboard`` serves)."""
    return Path(output) / ARTIFACTS_FOLDER


def artifact_store(folder: Path) -> FileSystemArtifactStore:
    folder.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(folder))


@functools.cache
def _save_note() -> Callable[[optuna.Study | optuna.Trial, str], None]:
    """optuna-dashboard's ``save_note``, loaded without running the package's ``__init__``.

    ``import optuna_dashboard`` loads its web app and, through its importance view, sklearn:
    ~0.9 s of every ``search start``, which only writes notes. The note module itself imports
    only optuna, so it is loaded from its file (a private copy; the package is untouched). If a
    later optuna-dashboard moves it, the public import still works, just slower.
    """
    package = importlib.util.find_spec("optuna_dashboard")  # locates it; runs nothing
    folders = package.submodule_search_locations if package else None
    note_file = Path(folders[0]) / "_note.py" if folders else None
    if "optuna_dashboard" in sys.modules or note_file is None or not note_file.is_file():
        from optuna_dashboard import save_note

        return save_note
    spec = importlib.util.spec_from_file_location("search._dashboard_note", note_file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.save_note


def recipe_yaml(recipe: Recipe, layout: Layout, *, header: str = "") -> str:
    """The recipe as the mergekit YAML ``search export`` writes (``layout``: the base's)."""
    return recipe_to_mergekit(recipe, layout, header=header)


def attach_recipe(trial: optuna.Trial, recipe: Recipe, layout: Layout, folder: Path) -> str:
    """Upload a running trial's mergekit YAML as ``recipe-<number>.yaml``; returns the artifact id."""
    header = f"mergesearch study {trial.study.study_name!r}, trial {trial.number}"
    return _upload(trial, f"recipe-{trial.number}.yaml", recipe_yaml(recipe, layout, header=header), folder)


def attach_baseline_recipe(
    study: optuna.Study, name: str, recipe: Recipe, layout: Layout, folder: Path
) -> str:
    """Upload a baseline's YAML as the study artifact ``baseline-<name>.yaml``; returns its id.

    Once the baseline's trial is stored, it also gets a note saying it is a baseline (the
    dashboard lists baselines like any trial, and shows a trial's note at the top of its page).
    """
    save_note = _save_note()

    header = f"mergesearch study {study.study_name!r}, baseline {name}"
    filename = f"baseline-{re.sub(r'[^A-Za-z0-9_.-]+', '-', name)}.yaml"
    artifact_id = _upload(study, filename, recipe_yaml(recipe, layout, header=header), folder)
    trial = ranking.baseline_trials(study.get_trials(deepcopy=False)).get(name)
    if trial is not None:
        save_note(optuna.Trial(study, trial._trial_id), baseline_note(name, filename, trial))
    return artifact_id


def baseline_note(name: str, filename: str, trial: FrozenTrial) -> str:
    """Markdown for a baseline's trial: what it is, and that it is never the chosen recipe."""
    return (
        f"## Baseline `{name}`\n\n"
        f"`{trial.user_attrs.get('recipe_summary', '')}`\n\n"
        "A reference the search trials are compared with, not a candidate the sampler "
        "proposed: it is never the chosen recipe nor the *Best Trial*. Its mergekit YAML is "
        f"the study artifact `{filename}`.\n"
    )


def _upload(target: optuna.Study | optuna.Trial, filename: str, text: str, folder: Path) -> str:
    # upload_artifact names the artifact after the file it reads: write it under that name.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / filename
        path.write_text(text, encoding="utf-8")
        return upload_artifact(
            artifact_store=artifact_store(folder), file_path=str(path), study_or_trial=target,
            mimetype=RECIPE_MIMETYPE,
        )


# -- the chosen trial and its note ---------------------------------------------------------


def chosen_trial(study: optuna.Study) -> FrozenTrial | None:
    """The study's chosen trial (``ranking.chosen_trial``): the final trial, else the best
    feasible search trial, else None."""
    directions = [d.name.lower() for d in study.directions]
    try:
        return ranking.chosen_trial(study.get_trials(deepcopy=False), study.user_attrs, directions)
    except SearchError as exc:
        raise SearchError(f"study {study.study_name!r}: {exc}") from None


def best_note(study: optuna.Study, best: FrozenTrial) -> str:
    """Markdown: why this trial is chosen, its gates, and how it compares with every baseline."""
    trials = study.get_trials(deepcopy=False)
    user_attrs = study.user_attrs
    tasks = _tasks(study, best)
    held = storage.heldout_record(user_attrs, best.number)
    is_final = ranking.final_number(user_attrs) == best.number
    if is_final:
        why = (
            "It is the final trial: among the top finalists by search score, re-scored on the "
            f"held-out slices, it passes every gate there, and {confidence.RULE}."
        )
    elif ranking.FINAL_TRIAL_ATTR in user_attrs and user_attrs[ranking.FINAL_TRIAL_ATTR] is None:  # none passed
        why = (
            "It passes every gate on the search slices and has the best objective among the "
            "search trials that do. `search finalize` found no finalist that passes every gate "
            "on the held-out slices, so there is no final trial."
        )
    else:
        why = (
            "It passes every gate on the search slices and has the best objective among the "
            "search trials that do (not finalized yet: held-out scores come with `search finalize`)."
        )
    lines = [
        f"## Chosen recipe: trial {best.number}",
        "",
        f"`{best.user_attrs.get('recipe_summary', '')}`",
        "",
        why,
        "Its mergekit YAML is this trial's artifact.",
        "",
        *_generations_line(user_attrs, best.number),
        "| | " + " | ".join(tasks) + " | lowest |",
        "| --- | " + " | ".join("---" for _ in tasks) + " | --- |",
        _row(f"**trial {best.number}** (search)", best.user_attrs.get("scores_search", {}), tasks),
    ]
    if held is not None:
        lines.append(_row(f"**trial {best.number}** (held-out)", held.scores, tasks))
    for name, trial in ranking.baseline_trials(trials).items():
        lines.append(_row(f"{name} (search)", trial.user_attrs.get("scores_search", {}), tasks))
        record = storage.heldout_record(user_attrs, trial.number)
        if held is not None and record is not None:
            lines.append(_row(f"{name} (held-out)", record.scores, tasks))
    intervals = confidence.confidence_lines(trials, user_attrs, [d.name.lower() for d in study.directions])
    if intervals:
        lines += ["", "```", *intervals, "```"]
    gates = gate_record.read_trial_gates(best.user_attrs)
    if gates:
        lines += ["", "Gate margins (positive: passed by that much) and, on the search slices, "
                  "the score against the gate's limit:", ""]
        lines += ["| gate | search | held-out | search: score vs limit |", "| --- | --- | --- | --- |"]
        for gate in gates:
            other = "" if held is None else f"{held.gate_margins.get(gate.name, float('nan')):+.4f}"
            against = gate_record.comparison(gate) or "not stored (older version)"
            lines.append(f"| `{gate.name}` | {gate.margin:+.4f} | {other} | {against} |")
    else:
        lines += ["", "The study has no gates."]
    return "\n".join(lines) + "\n"


def _generations_line(user_attrs: Mapping[str, object], number: int) -> list[str]:
    """Where the trial's generated answers are (generation tasks, after finalize), if anywhere."""
    path = generations_file(user_attrs, number)
    return [] if path is None else [f"What it generated on the held-out slices (JSON Lines): `{path}`", ""]


def study_note(study: optuna.Study, best: FrozenTrial | None) -> str:
    """The study's note: which trial is chosen, and why the dashboard's own 'best' may differ."""
    if best is None:
        names = gate_record.read_study_gates(study.user_attrs).names
        blocker = ranking.what_blocks(study.get_trials(deepcopy=False), names)
        reason = blocker.describe() if blocker else "no completed search trial yet"
        return f"## No chosen recipe yet\n\n{reason}\n"
    return (
        f"## Chosen recipe: trial {best.number}\n\n"
        f"`{best.user_attrs.get('recipe_summary', '')}`\n\n"
        "See the note on that trial for its scores next to every baseline and its gate margins. "
        "Served by `search dashboard`, the *Best Trial* box shows this trial. Trials in grey "
        "are infeasible: their user attr `gate_status` says which gate failed and by how "
        "much. Baselines have a note saying so.\n"
    )


def write_best_note(study: optuna.Study) -> FrozenTrial | None:
    """Write the chosen trial's note and the study note; returns the chosen trial (or None)."""
    save_note = _save_note()

    best = chosen_trial(study)
    save_note(study, study_note(study, best))
    if best is not None:
        # optuna.Trial is the handle save_note takes; notes live in study system attrs,
        # so this works for a finished trial too.
        save_note(optuna.Trial(study, best._trial_id), best_note(study, best))
    return best


def _tasks(study: optuna.Study, trial: FrozenTrial) -> list[str]:
    names = study.user_attrs.get("tasks")
    if isinstance(names, list) and names:
        return [str(n) for n in names]
    return list(trial.user_attrs.get("scores_search", {}))


def _row(name: str, scores: Mapping[str, float], tasks: Sequence[str]) -> str:
    values = [scores.get(t) for t in tasks]
    known = [float(v) for v in values if v is not None]
    cells = ["" if v is None else f"{float(v):.4f}" for v in values]
    lowest = f"{min(known):.4f}" if known else ""
    return f"| {name} | " + " | ".join(cells) + f" | {lowest} |"
