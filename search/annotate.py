"""What the dashboard shows beyond numbers: recipe artifacts on trials, a note on the best one.

Both go through public Optuna / optuna-dashboard APIs (``upload_artifact``,
``save_note``) so optuna-dashboard serves them as it serves any study's.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import optuna
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.trial import FrozenTrial
from optuna_dashboard import save_note


def artifact_store(artifact_dir: Path) -> FileSystemArtifactStore:
    artifact_dir.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(artifact_dir))


def attach_recipe(study: optuna.Study, trial: FrozenTrial, yaml_text: str, artifact_dir: Path) -> str:
    """Upload the trial's mergekit YAML as ``recipe-<number>.yaml``; returns the artifact id."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"recipe-{trial.number}.yaml"
        path.write_text(yaml_text, encoding="utf-8")
        return upload_artifact(
            artifact_store=artifact_store(artifact_dir),
            file_path=str(path),
            study_or_trial=trial,
            storage=study._storage,
            mimetype="application/yaml",
        )


def best_note(best: FrozenTrial, references: Sequence[FrozenTrial], tasks: Sequence[str]) -> str:
    """Markdown: why this trial is best, and how it compares with each source and baseline."""
    scores: Mapping[str, float] = best.user_attrs.get("scores_search", {})
    held: Mapping[str, float] = best.user_attrs.get("scores_heldout", {})
    margins: Mapping[str, float] = best.user_attrs.get("gate_margins", {})
    lines = [
        f"## Best feasible recipe: trial {best.number}",
        "",
        best.user_attrs.get("recipe_summary", ""),
        "",
        "It passes every release gate"
        + (" on the search and held-out slices" if held else " on the search slices")
        + " and has the highest objective among trials that do.",
        "",
        "| recipe | " + " | ".join(tasks) + " | min |",
        "| --- | " + " | ".join("---" for _ in tasks) + " | --- |",
        _row(f"**trial {best.number}** (search)", scores, tasks),
    ]
    if held:
        lines.append(_row(f"**trial {best.number}** (held-out)", held, tasks))
    for ref in references:
        name = ref.user_attrs.get("baseline", f"trial {ref.number}")
        lines.append(_row(f"{name} (search)", ref.user_attrs.get("scores_search", {}), tasks))
    if margins:
        lines += ["", "Gate margins (positive = passed by that much):", ""]
        lines += [f"- `{name}`: {value:+.3f}" for name, value in margins.items()]
    return "\n".join(lines) + "\n"


def write_best_note(study: optuna.Study, best: FrozenTrial, references: Sequence[FrozenTrial]) -> None:
    tasks = list(study.user_attrs.get("tasks", list(best.user_attrs.get("scores_search", {}))))
    save_note(optuna.Trial(study, best._trial_id), best_note(best, references, tasks))


def _row(name: str, scores: Mapping[str, float], tasks: Sequence[str]) -> str:
    values = [scores.get(t) for t in tasks]
    known = [v for v in values if v is not None]
    cells = ["" if v is None else f"{v:.3f}" for v in values]
    return f"| {name} | " + " | ".join(cells) + f" | {min(known):.3f} |" if known else f"| {name} |"
