"""`search validate` catches what `search start` would refuse, naming the key; `start` runs it
before creating any storage; read-only commands never create a storage.

Real checkpoints (the tiny Llama family), real data files, real Optuna storages.
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest

from search.cli import main
from search.commands.validate import check_study
from search.config import load_study
from search.errors import StudyConfigError
from tests.checkpoints import TinyFamily
from tests.test_config import family_study


def _rows(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    return err


def test_a_missing_source_folder_names_its_key(
    tmp_path: Path, llama_family: TinyFamily, capsys: pytest.CaptureFixture[str]
) -> None:
    path = family_study(tmp_path, llama_family, **{str(llama_family.sources[2]): str(tmp_path / "gone")})
    assert main(["validate", str(path)]) == 2
    assert _error(capsys).startswith(
        f"error: {path}: models.sources.c: checkpoint folder {tmp_path / 'gone'} does not exist"
    )
    missing_base = family_study(tmp_path, llama_family, **{f'base = "{llama_family.base}"': 'base = "nowhere"'})
    assert main(["validate", str(missing_base)]) == 2
    assert _error(capsys).startswith(f"error: {missing_base}: models.base: checkpoint folder {tmp_path / 'nowhere'}")


def test_an_incompatible_source_names_its_key(
    tmp_path: Path, llama_family: TinyFamily, gpt2_family: TinyFamily, capsys: pytest.CaptureFixture[str]
) -> None:
    path = family_study(tmp_path, llama_family, **{str(llama_family.sources[1]): str(gpt2_family.sources[0])})
    assert main(["validate", str(path)]) == 2
    err = _error(capsys)
    assert err.startswith(f"error: {path}: models.sources.b: source 'source0' has config model_type 'gpt2'")


def test_data_rows_are_checked_against_the_fields_with_a_hint_of_the_key(
    tmp_path: Path, llama_family: TinyFamily, capsys: pytest.CaptureFixture[str]
) -> None:
    questions = [{"question": f"w{i} w{i + 1}", "answer": f"w{i + 2}"} for i in range(6)]
    path = family_study(tmp_path, llama_family)
    _rows(tmp_path / "data" / "alpha.jsonl", questions)
    assert main(["validate", str(path)]) == 2
    err = _error(capsys)
    assert f"error: {path}: tasks[0]: task 'alpha': {tmp_path}/data/alpha.jsonl: row 1: missing field 'prompt'" in err
    assert "the row has 'question', 'answer'" in err and "prompt_field" in err
    # start refuses it the same way, before anything is created
    assert main(["start", str(path), "--quiet"]) == 2
    assert "missing field 'prompt'" in _error(capsys)
    assert not (tmp_path / "runs").exists()

    # naming the field fixes it
    fixed = family_study(tmp_path, llama_family, **{
        'search = "data/alpha.jsonl"': 'search = "data/alpha.jsonl"\nprompt_field = "question"'})
    _rows(tmp_path / "data" / "alpha.jsonl", questions)  # family_study wrote the default rows again
    assert main(["validate", str(fixed)]) == 0
    assert "alpha: exact_match, weight 1, search" in capsys.readouterr().out


def test_a_later_bad_row_and_the_metric_fields_are_found(
    tmp_path: Path, llama_family: TinyFamily, capsys: pytest.CaptureFixture[str]
) -> None:
    path = family_study(tmp_path, llama_family)
    rows = [{"prompt": f"w{i} w{i + 1}", "answer": f"w{i + 2}"} for i in range(6)]
    rows[4] = {"prompt": "w1 w2", "answer": ["not", "text"]}
    _rows(tmp_path / "data" / "beta.jsonl", rows)
    assert main(["validate", str(path)]) == 2
    assert f"tasks[1]: task 'beta': {tmp_path}/data/beta.jsonl: row 5: field 'answer' must be text" in _error(capsys)

    choice = family_study(tmp_path, llama_family, **{'search = "data/alpha.jsonl"': (
        'search = "data/alpha.jsonl"\nmetric = "choice"\nchoices_field = "options"')})
    _rows(tmp_path / "data" / "beta.jsonl", rows[:4])
    assert main(["validate", str(choice)]) == 2
    err = _error(capsys)
    assert "tasks[0]: task 'alpha'" in err and "row 1: missing field 'options' (metric 'choice' reads it)" in err
    assert "choices_field" in err


def test_a_wrong_task_path_fails_start_before_any_storage_exists(
    tmp_path: Path, llama_family: TinyFamily, capsys: pytest.CaptureFixture[str]
) -> None:
    path = family_study(tmp_path, llama_family, **{"data/beta.jsonl": "data/bta.jsonl"})
    assert main(["start", str(path), "--quiet"]) == 2
    assert f"tasks[1].search: data file {tmp_path}/data/bta.jsonl does not exist" in _error(capsys)
    assert not (tmp_path / "runs").exists()


def test_an_existing_study_with_other_directions_is_refused(
    tmp_path: Path, llama_family: TinyFamily, capsys: pytest.CaptureFixture[str]
) -> None:
    path = family_study(tmp_path, llama_family)
    config = load_study(path)
    config.output.mkdir(parents=True)
    optuna.create_study(study_name="tiny", storage=config.storage, directions=["minimize"])
    with pytest.raises(StudyConfigError, match=r"study\.name: study 'tiny' in .* was created with directions "
                                               r"\['minimize'\], the study file now gives \['maximize'\]"):
        check_study(config)


@pytest.mark.parametrize("storage", ["", "journal:runs/j.log"])
def test_read_only_commands_never_create_a_storage(
    tmp_path: Path, llama_family: TinyFamily, capsys: pytest.CaptureFixture[str], storage: str
) -> None:
    replace = {'name = "tiny"': f'name = "tiny"\nstorage = "{storage}"'} if storage else {}
    path = family_study(tmp_path, llama_family, **replace)
    commands = [
        ["status", str(path)],
        ["export", str(path), "-o", str(tmp_path / "recipe.yaml")],
        ["report", str(path), "-o", str(tmp_path / "report.html")],
        ["dashboard", str(path), "--port", "0"],
        ["finalize", str(path)],
    ]
    for command in commands:
        assert main(command) == 2, command
        err = _error(capsys)
        assert "no study yet" in err and "start one with `search start STUDY.toml`" in err, (command, err)
        assert not (tmp_path / "runs").exists(), command
    assert not (tmp_path / "recipe.yaml").exists() and not (tmp_path / "report.html").exists()
    # validate reads an absent storage the same way: it creates nothing either
    assert main(["validate", str(path)]) == 0
    assert not (tmp_path / "runs").exists()
