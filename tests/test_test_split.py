"""The test split (``search.test_split``): scored once after finalize's choice, never chosen on.

A real tiny study (real driver, inline pool, real SQLite storage) with a ``test`` file per
task; then the test files are replaced by other rows and ``search finalize`` runs again:
the chosen trial, its held-out record and every search value stay the same, only the test
scores change. Config and validate errors name the key.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import optuna
import pytest
import torch

from search import ranking
from search.commands.status import render_status
from search.commands.validate import check_data
from search.confidence import confidence_lines
from search.config import load_study
from search.errors import StudyConfigError
from search.finalize import finalize_study
from search.records import heldout_record
from search.test_split import NO_TEST_SPLIT, TEST_ATTR, read_test_record
from tests.checkpoints import TinyFamily
from tests.studies import ROWS, run, write_study

optuna.logging.set_verbosity(optuna.logging.WARNING)


def write_test_rows(path: Path, *, seed: int, taken: set[str]) -> None:
    """Word prompts as tests.studies writes them, none of them a search or held-out prompt."""
    gen = torch.Generator().manual_seed(seed)
    lines: list[str] = []
    while len(lines) < ROWS:
        words = torch.randint(4, 60, (4,), generator=gen).tolist()
        prompt = " ".join(f"w{w - 4}" for w in words[:3])
        if prompt in taken:
            continue
        taken.add(prompt)
        lines.append(json.dumps({"prompt": prompt, "answer": f"w{words[3] - 4}"}))
    path.write_text("\n".join(lines) + "\n")


def prompts(path: Path) -> set[str]:
    return {json.loads(line)["prompt"] for line in path.read_text().splitlines()}


def with_test(path: Path, *, seed: int, tasks: tuple[str, ...] | None = None) -> dict[str, Path]:
    """Add ``test = ...`` to the tasks of a tests.studies study (all tasks by default)."""
    text = path.read_text()
    files: dict[str, Path] = {}

    def add(match: re.Match[str]) -> str:
        task, heldout = match.group(1), Path(match.group(2))
        if tasks is not None and task not in tasks:
            return match.group(0)
        search = heldout.with_name(heldout.name.replace("-heldout", "-search"))
        files[task] = heldout.with_name(f"{task}-test.jsonl")
        write_test_rows(files[task], seed=seed + len(files), taken=prompts(search) | prompts(heldout))
        return match.group(0) + f'test = "{files[task]}"\n'

    path.write_text(re.sub(r'name = "([^"]+)"\nsearch = "[^"]+"\nheldout = "([^"]+)"\n', add, text))
    return files


def test_changing_the_test_rows_changes_no_choice(tmp_path: Path, llama_family: TinyFamily) -> None:
    path = write_study(tmp_path, llama_family, trials=4, top_k=3)
    files = with_test(path, seed=100)
    config, study = run(path)
    attrs = study.user_attrs
    final = attrs[ranking.FINAL_TRIAL_ATTR]
    assert isinstance(final, int)
    state = attrs[TEST_ATTR]
    assert state["trial"] == final and state["error"] is None and state["baseline"]
    first = read_test_record(attrs, final)
    assert first is not None and set(first.scores) == {"alpha", "beta"} and first.rows
    assert read_test_record(attrs, state["baseline_trial"]) is not None
    # Only the final trial and the best baseline were scored on test.
    assert sorted(k for k in attrs if k.startswith("test:")) == sorted(
        {f"test:{final}", f"test:{state['baseline_trial']}"})
    assert attrs["example_rows"]["test"]["alpha"]["n"] == ROWS
    heldout_before = {k: v for k, v in attrs.items() if k.startswith("heldout:")}
    values_before = [t.values for t in study.get_trials()]
    lines = confidence_lines(study.get_trials(), attrs, ["maximize"])
    assert any(line.startswith("test split (trial") for line in lines)
    assert any("gain over the best baseline on held-out" in line and "on test" in line for line in lines)
    assert any("search -> held-out -> test" in line for line in lines)
    assert any(line.strip().startswith("tasks: alpha") for line in lines)

    for task, file in files.items():  # other test rows: the choice must not move
        taken = prompts(file.with_name(f"{task}-search.jsonl")) | prompts(file.with_name(f"{task}-heldout.jsonl"))
        write_test_rows(file, seed=200, taken=taken)
    result = finalize_study(load_study(path), quiet=True)
    assert result.final_trial == final
    again = optuna.load_study(study_name=config.name, storage=config.storage)
    attrs2 = again.user_attrs
    assert attrs2[ranking.FINAL_TRIAL_ATTR] == final
    assert {k: v for k, v in attrs2.items() if k.startswith("heldout:")} == heldout_before
    assert [t.values for t in again.get_trials()] == values_before
    second = read_test_record(attrs2, final)
    assert second is not None and second.scores != first.scores  # the new rows were scored
    assert attrs2[TEST_ATTR]["data"] != state["data"]
    assert "test split (trial" in render_status(again)
    from search.annotate import best_note
    from search.report import write_report

    assert "test split (trial" in best_note(again, again.get_trials()[final])  # the dashboard's note
    report = write_report(again, tmp_path / "report.html", task_higher={"alpha": True, "beta": True})
    assert "test split (trial" in Path(report).read_text()


def test_a_study_without_test_rows_says_so_in_one_line(tmp_path: Path, llama_family: TinyFamily) -> None:
    path = write_study(tmp_path, llama_family, trials=2)
    _, study = run(path)
    lines = confidence_lines(study.get_trials(), study.user_attrs, ["maximize"])
    assert [line for line in lines if "test" in line] == [f"test: {NO_TEST_SPLIT}"]
    assert study.user_attrs[TEST_ATTR] is None
    assert not any(k.startswith("test:") for k in study.user_attrs)
    assert heldout_record(study.user_attrs, study.user_attrs[ranking.FINAL_TRIAL_ATTR]) is not None


def test_every_task_needs_a_test_file_once_one_has(tmp_path: Path, llama_family: TinyFamily) -> None:
    path = write_study(tmp_path, llama_family, trials=1)
    with_test(path, seed=100, tasks=("alpha",))
    with pytest.raises(StudyConfigError, match=r"tasks\[1\]\.test: missing: task 'alpha' names a test file"):
        load_study(path)


def test_validate_names_the_test_key(tmp_path: Path, llama_family: TinyFamily) -> None:
    path = write_study(tmp_path, llama_family, trials=1)
    files = with_test(path, seed=100)
    files["beta"].unlink()
    with pytest.raises(StudyConfigError, match=r"tasks\[1\]\.test: data file .*beta-test\.jsonl does not exist"):
        check_data(load_study(path))
    # A test row that is also a held-out row is refused, naming the file and row.
    heldout = files["alpha"].with_name("alpha-heldout.jsonl")
    files["beta"].write_text(files["alpha"].read_text())
    files["alpha"].write_text(heldout.read_text().splitlines()[3] + "\n")
    with pytest.raises(StudyConfigError, match=r"alpha-test\.jsonl: row 1: .*held-out and test must not overlap"):
        check_data(load_study(path))
    files["alpha"].write_text(files["beta"].read_text())
    rows = check_data(load_study(path))
    assert rows["alpha"] == {"search": ROWS, "heldout": ROWS, "test": ROWS}


def test_the_demo_ships_test_rows_its_training_never_answered(demo_family_root: Path) -> None:
    """The shipped test slices are what studies.demo_family.test_rows regenerates (replaying the
    training draws; no float involved), disjoint from search and held-out, checksummed."""
    from studies.demo_family.build import slice_text
    from studies.demo_family.shipped import REQUIRED_FILES, shipped_family
    from studies.demo_family.tasks import SLICE_ROWS, TASKS, split_tasks
    from studies.demo_family.test_rows import undrawn_cases, unseen_slices

    family = shipped_family()  # every file, test slices included, matches family.json
    assert all(f"data/{task}/test.jsonl" in REQUIRED_FILES for task in TASKS)
    splits = split_tasks(0)
    tests = unseen_slices(splits, seed=0)
    undrawn = undrawn_cases(splits, seed=0)
    for task in TASKS:
        assert family.data(task, "test").read_text() == slice_text(tests[task])
        assert len(tests[task]) == min(SLICE_ROWS, len(undrawn[task])) > 0
        tested = {e.prompt for e in tests[task]}
        assert len(tested) == len(tests[task])
        assert not tested & {e.prompt for e in (*splits[task].search, *splits[task].heldout)}
        never = {splits[task].train_current[i].prompt for i in undrawn[task]}
        assert tested <= never
    assert {t: len(v) for t, v in tests.items()} == {"shipping": 143, "refunds": 94, "catalog": 200}
    config = load_study(family.root.parent / "study.toml")
    assert [t.test for t in config.tasks] == [family.data(t, "test") for t in TASKS]
