"""``search export`` through the CLI: a YAML another machine can run, and loud warnings.

The exported YAML must name no folder of this machine: model paths are relative to the
YAML's folder (the header says to run ``mergekit-yaml`` from there), or the names given
with ``--model-name`` / ``--model-root``. ``mergekit-yaml`` itself, run from the folder the
header names, must rebuild the tensors the engine merges for that trial.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from safetensors.torch import load_file

from merges.checkpoint import open_checkpoint
from merges.engine import MergeEngine
from merges.errors import UnsupportedConfigError
from merges.mergekit_yaml import rename_models
from merges.recipe import LayerSlice, Recipe
from search import ranking
from search.cli import main
from search.config import load_study
from search.driver import run_study
from tests.checkpoints import TinyFamily
from tests.studies import gated_study, run, stored_study, write_study

MERGEKIT_YAML = shutil.which("mergekit-yaml", path=str(Path(sys.executable).parent))


def mergekit_yaml(config: Path, out: Path, *, cwd: Path) -> dict:
    assert MERGEKIT_YAML is not None
    done = subprocess.run([MERGEKIT_YAML, str(config), str(out), "--no-lazy-unpickle"], cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return load_file(out / "model.safetensors")


def engine_tensors(recipe: Recipe) -> dict:
    base = open_checkpoint(recipe.base) if recipe.base else None
    return MergeEngine(base, [open_checkpoint(p) for p in recipe.sources]).materialize(recipe)


def header(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("#")]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, llama_family: TinyFamily) -> Path:
    """A finalized linear study on the tiny family; returns its study.toml."""
    folder = tmp_path_factory.mktemp("export")
    path = write_study(folder, llama_family, trials=3)
    run(path)
    return path


def final_recipe(path: Path) -> Recipe:
    """The recipe of the finished study's final trial, as stored."""
    study = stored_study(path)
    return Recipe.from_dict(study.trials[study.user_attrs["final_trial"]].user_attrs["recipe"])


def test_default_export_is_relative_to_its_folder_and_mergekit_rebuilds_it_from_there(
    finished: Path, llama_family: TinyFamily, tmp_path: Path
) -> None:
    from tests.test_mergekit_golden import assert_same_tensors

    recipe = final_recipe(finished)
    shipped = tmp_path / "ship" / "recipe.yaml"
    assert main(["export", str(finished), "-o", str(shipped)]) == 0
    text = shipped.read_text()
    assert str(llama_family.base.parent) not in text and str(tmp_path) not in text  # nothing of this machine
    data = yaml.safe_load(text)
    models = {data["base_model"], *(s["model"] for sl in data["slices"] for s in sl["sources"])}
    assert all(not Path(m).is_absolute() for m in models)
    assert "# run from the folder that holds this file: mergekit-yaml recipe.yaml OUTPUT_FOLDER" in header(text)
    assert not any("WARNING" in line for line in header(text))
    # mergekit, run from the folder the header names, reads the family through the relative paths.
    rebuilt = mergekit_yaml(shipped, tmp_path / "out", cwd=shipped.parent)
    assert_same_tensors(engine_tensors(recipe), rebuilt, open_checkpoint(llama_family.base).layout)


def test_model_names_and_root_make_a_yaml_for_the_teams_folders(
    finished: Path, llama_family: TinyFamily, tmp_path: Path
) -> None:
    from tests.test_mergekit_golden import assert_same_tensors

    recipe = final_recipe(finished)
    exported = tmp_path / "here" / "recipe.yaml"
    # Relative names start with ./ (mergekit asks the Hub about any a/b while writing its model card).
    assert main(["export", str(finished), "-o", str(exported), "--model-name", "base=./team/base-v1",
                 "--model-name", "s1=./team/s1-final", "--model-root", "models"]) == 0
    text = exported.read_text()
    data = yaml.safe_load(text)
    assert data["base_model"] == "./team/base-v1"
    assert [s["model"] for s in data["slices"][0]["sources"]] == [
        "./models/source0", "./team/s1-final", "./models/source2"
    ]
    # "Another machine": only the YAML travels; the team's folders hold the same checkpoints.
    machine = tmp_path / "machine2"
    (machine / "team").mkdir(parents=True)
    (machine / "models").mkdir()
    (machine / "team" / "base-v1").symlink_to(llama_family.base)
    (machine / "team" / "s1-final").symlink_to(llama_family.sources[1])
    for index in (0, 2):
        (machine / "models" / f"source{index}").symlink_to(llama_family.sources[index])
    shutil.copy(exported, machine / "recipe.yaml")
    rebuilt = mergekit_yaml(machine / "recipe.yaml", tmp_path / "out", cwd=machine)
    assert_same_tensors(engine_tensors(recipe), rebuilt, open_checkpoint(llama_family.base).layout)


def test_absolute_names_say_the_yaml_runs_from_anywhere(finished: Path, tmp_path: Path) -> None:
    out = tmp_path / "recipe.yaml"
    assert main(["export", str(finished), "-o", str(out), "--model-root", "/srv/models"]) == 0
    text = out.read_text()
    assert yaml.safe_load(text)["base_model"] == "/srv/models/base"
    assert "# (every model path is absolute: run it from any folder)" in header(text)
    # A Hub id is written as given (mergekit downloads a name that is no folder where it runs).
    assert main(["export", str(finished), "-o", str(out), "--model-root", "/srv/models",
                 "--model-name", "base=org/base-model"]) == 0
    text = out.read_text()
    assert yaml.safe_load(text)["base_model"] == "org/base-model"
    assert "# run from the folder that holds this file: mergekit-yaml recipe.yaml OUTPUT_FOLDER" in header(text)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model-name", "nobody=org/x"], r"--model-name 'nobody=org/x': no model labelled 'nobody' \(labels: base, s0, s1, s2\)"),
        (["--model-name", "base"], "expected LABEL=NAME"),
        (["--model-name", "s0=org/x", "--model-name", "s1=org/x"], "would both be exported as 'org/x'"),
        (["--model-name", "s0=org/x@main"], "contains '\\+' or '@'"),
        (["--model-name", "s0=a", "--model-name", "s0=b"], "'s0' is named twice"),
    ],
)
def test_bad_model_names_are_one_line_errors(finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              args: list[str], message: str) -> None:
    out = tmp_path / "recipe.yaml"
    assert main(["export", str(finished), "-o", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert re.search(message, err), err
    assert not out.exists()


def test_exporting_an_infeasible_or_unfinalised_trial_warns_loudly(
    tmp_path: Path, llama_family: TinyFamily, capsys: pytest.CaptureFixture[str]
) -> None:
    path = gated_study(tmp_path, llama_family, trials=6)
    config = load_study(path)
    run_study(config, quiet=True, finalize_after=False)
    study = optuna.load_study(study_name=config.name, storage=config.storage)
    searched = ranking.search_trials(study.trials)
    infeasible = [t for t in searched if not ranking.is_feasible(t)]
    assert infeasible and any(ranking.is_feasible(t) for t in searched), "the gate should split the trials"
    capsys.readouterr()

    # --trial N of an infeasible trial: on the console and in the header.
    bad = infeasible[0]
    out = tmp_path / "bad.yaml"
    assert main(["export", str(path), "-o", str(out), "--trial", str(bad.number)]) == 0
    err = capsys.readouterr().err
    assert f"WARNING: trial {bad.number} is INFEASIBLE on the search slices: it fails alpha.max_regression (" in err
    assert "WARNING: the study is not finalized" in err
    assert f"# WARNING: trial {bad.number} is INFEASIBLE on the search slices" in out.read_text()

    # The best feasible trial of an unfinalised study: not infeasible, but not finalized either.
    out = tmp_path / "best.yaml"
    assert main(["export", str(path), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "INFEASIBLE" not in err and "WARNING: the study is not finalized" in err

    # After finalize the final trial exports without a warning.
    assert main(["finalize", str(path), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["export", str(path), "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert "WARNING" not in captured.err and "WARNING" not in out.read_text()


def test_rename_models_maps_every_path_and_refuses_gaps_and_collisions() -> None:
    recipe = Recipe("passthrough", "/m/base", ("/m/a", "/m/b"), ((0, 2), (2, 4)),
                    layer_slices=(LayerSlice("/m/a", 0, 2), LayerSlice("/m/b", 2, 4)))
    renamed = rename_models(recipe, {"/m/base": "org/base", "/m/a": "a", "/m/b": "../b"})
    assert renamed.base == "org/base" and renamed.sources == ("a", "../b")
    assert [p.model for p in renamed.layer_slices] == ["a", "../b"]
    with pytest.raises(UnsupportedConfigError, match=r"\['/m/b'\] have no name"):
        rename_models(recipe, {"/m/base": "x", "/m/a": "a"})
    with pytest.raises(UnsupportedConfigError, match="would both be exported as 'a'"):
        rename_models(recipe, {"/m/base": "x", "/m/a": "a", "/m/b": "a"})
