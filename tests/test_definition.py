"""A study remembers what defines it and refuses to go on under another definition.

Real studies on the tiny Llama family (inline pool, SQLite): a changed seed, sampler,
method, data file or checkpoint is refused before any trial runs, naming the change; more
trials, other gates, top_k or execution settings continue the study.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from search.config import load_study
from search.definition import (
    DEFINITION_KEY,
    DefinitionChangedError,
    check_definition,
    describe_changes,
    study_definition,
)
from search.driver import run_study
from tests.checkpoints import TinyFamily
from tests.studies import stored_study, write_study

optuna.logging.set_verbosity(optuna.logging.WARNING)

NEW_STUDY_HINT = "use a new --out"


def test_definition_ignores_budget_gates_top_k_execution_and_locations(
    tmp_path: Path, llama_family: TinyFamily
) -> None:
    base = study_definition(load_study(write_study(tmp_path, llama_family, trials=1)))
    extended = load_study(write_study(
        tmp_path, llama_family, trials=30, top_k=5, gates={"alpha": "{ min = -100.0 }"},
    ))
    extended = replace(extended, execution=replace(extended.execution, workers=3, batch_size=4),
                       output=tmp_path / "elsewhere")
    assert study_definition(extended) == base
    assert json.loads(json.dumps(base)) == base  # stored as JSON and compared as read back


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"seed": 1}, "seed: 0 -> 1"),
        ({"sampler": "tpe"}, 'sampler: "random" -> "tpe"'),
        ({"method": "ties"}, 'genome.method: "linear" -> "ties"'),
        ({"objective": "min"}, 'objective: "mean" -> "min"'),
        ({"tasks": ("alpha",)}, "tasks.beta."),
    ],
)
def test_each_defining_setting_is_named_when_it_changes(
    tmp_path: Path, llama_family: TinyFamily, change: dict, named: str
) -> None:
    before = study_definition(load_study(write_study(tmp_path, llama_family, trials=1)))
    after = study_definition(load_study(write_study(tmp_path, llama_family, trials=1, **change)))
    assert any(named in line for line in describe_changes(before, after)), describe_changes(before, after)


def test_changed_data_file_and_checkpoint_are_named(tmp_path: Path, llama_family: TinyFamily) -> None:
    config = load_study(write_study(tmp_path, llama_family, trials=1))
    before = study_definition(config)
    data = config.tasks[0].search
    data.write_text(data.read_text().replace("w1", "w2", 1))
    copy = tmp_path / "s0-copy"
    copy.mkdir()
    source = Path(next(iter(config.models.sources.values())))
    for item in source.iterdir():
        (copy / item.name).write_bytes(item.read_bytes())
    (copy / "config.json").write_text((source / "config.json").read_text() + "\n")
    moved = replace(config, models=replace(config.models, sources={**config.models.sources, "s0": copy}))
    changes = describe_changes(before, study_definition(moved))
    assert any(line.startswith(f"tasks.alpha.search_data.{data.name}: ") for line in changes), changes
    assert any(line.startswith("models.sources.s0.config_sha256: ") for line in changes), changes
    assert any(line.startswith("models.sources.s0.files.config.json: ") for line in changes), changes
    # The same checkpoint in another folder is the same model.
    (copy / "config.json").write_text((source / "config.json").read_text())
    assert not [c for c in describe_changes(before, study_definition(moved)) if c.startswith("models")]


def test_changed_seed_is_refused_and_a_longer_budget_continues(tmp_path: Path, llama_family: TinyFamily) -> None:
    path = write_study(tmp_path, llama_family, trials=1)
    run_study(load_study(path), quiet=True)
    assert stored_study(path).user_attrs[DEFINITION_KEY]["seed"] == 0
    before = len(stored_study(path).trials)

    write_study(tmp_path, llama_family, trials=1, seed=7)
    with pytest.raises(DefinitionChangedError) as caught:
        run_study(load_study(path), quiet=True)
    message = str(caught.value)
    assert "seed: 0 -> 7" in message and NEW_STUDY_HINT in message and "--trials" in message
    study = stored_study(path)
    assert len(study.trials) == before and study.user_attrs["seed"] == 0  # nothing written

    write_study(tmp_path, llama_family, trials=2, top_k=1)  # back to seed 0, more budget
    assert run_study(load_study(path), quiet=True).done == 2


def test_method_change_with_a_bigger_budget_runs_no_trial_of_the_new_method(
    tmp_path: Path, llama_family: TinyFamily
) -> None:
    path = write_study(tmp_path, llama_family, trials=1, method="ties")
    run_study(load_study(path), quiet=True)
    write_study(tmp_path, llama_family, trials=50, method="dare_ties")
    with pytest.raises(DefinitionChangedError, match='genome.method: "ties" -> "dare_ties"'):
        run_study(load_study(path), quiet=True)
    methods = {t.user_attrs["recipe"]["method"] for t in stored_study(path).trials if "recipe" in t.user_attrs}
    assert "dare_ties" not in methods


def test_study_from_before_definitions_is_checked_on_what_it_kept(tmp_path: Path, llama_family: TinyFamily) -> None:
    config = load_study(write_study(tmp_path, llama_family, trials=1))
    study = optuna.create_study(study_name="old", storage=f"sqlite:///{tmp_path / 'old.db'}")
    study.set_user_attr("seed", 0)
    study.set_user_attr("sampler", "tpe")  # what older drivers stored
    definition = study_definition(config)
    with pytest.raises(DefinitionChangedError, match='sampler: "tpe" -> "random"'):
        check_definition(study, definition, "old.db")
    assert DEFINITION_KEY not in study.user_attrs
    study.set_user_attr("sampler", "random")
    check_definition(study, definition, "old.db", store=False)
    assert DEFINITION_KEY not in study.user_attrs
    check_definition(study, definition, "old.db")
    assert study.user_attrs[DEFINITION_KEY] == json.loads(json.dumps(definition))


_KEYS = st.text("abcxyz", min_size=1, max_size=3)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner, max_size=3),
    max_leaves=12,
)


@settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])  # a shared, busy machine
@given(st.dictionaries(_KEYS, _JSON, max_size=4), st.dictionaries(_KEYS, _JSON, max_size=4))
def test_changes_are_empty_exactly_when_the_definitions_are_equal(a: dict, b: dict) -> None:
    assert (describe_changes(a, b) == []) == (a == b)
    assert describe_changes(a, a) == []


def test_an_lm_eval_include_folder_is_fingerprinted_with_its_subfolders(tmp_path: Path) -> None:
    # lm-eval indexes **/*.yaml under the include path, so a task file two folders down
    # defines the study as much as one at the top (and __pycache__ does not).
    import shutil

    from tests.test_lm_eval import TASKS, study_copy

    tasks = tmp_path / "tasks"
    shutil.copytree(TASKS, tasks)
    config = load_study(study_copy(tmp_path, **{str(TASKS): str(tasks)}))
    before = study_definition(config)
    (tasks / "__pycache__").mkdir(exist_ok=True)
    (tasks / "__pycache__" / "ignored.py").write_text("# compiled elsewhere\n", encoding="utf-8")
    assert study_definition(config) == before
    nested = tasks / "more" / "deeper"
    nested.mkdir(parents=True)
    (nested / "extra.yaml").write_text("task: extra\n", encoding="utf-8")
    changes = describe_changes(before, study_definition(config))
    assert any("more/deeper/extra.yaml" in change for change in changes), changes
