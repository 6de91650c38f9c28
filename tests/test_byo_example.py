"""The "Bring your own fine-tunes" example (studies/byo) works as the README shows it.

Tiny random stand-ins take the place of the user's base and three fine-tunes; the shipped
study file and data rows are copied next to them unchanged, then the real CLI validates
the study and runs it for two search trials. The data rows are also scored with each
metric the README shows them with, and the example scorer is checked against a direct
one-example-at-a-time computation.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState
from transformers import AutoModelForCausalLM, AutoTokenizer

from fitness.scoring import score_examples, score_slice
from fitness.slices import load_task
from fitness.spec import TaskSpec
from search.config import load_study
from search.errors import StudyConfigError
from tests.checkpoints import make_family

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "studies" / "byo"
README = REPO / "README.md"
SOURCES = ("intents", "policy", "replies")


@pytest.fixture(scope="module")
def byo_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped study and data, unchanged, next to stand-ins at the paths it names."""
    root = tmp_path_factory.mktemp("byo")
    family = make_family(root / "family")
    models = root / "models"
    models.mkdir()
    shutil.move(family.base, models / "base")
    for label, source in zip(SOURCES, family.sources, strict=True):
        shutil.move(source, models / label)
    shutil.copy(EXAMPLE / "study.toml", root / "study.toml")
    shutil.copytree(EXAMPLE / "data", root / "data")
    return root / "study.toml"


def search_cli(*args: str) -> subprocess.CompletedProcess[str]:
    # cwd = the repository, so `studies.byo.scorers` (the study's metric) is importable
    return subprocess.run([sys.executable, "-m", "search.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def test_the_example_study_validates_and_runs_two_trials(byo_study: Path) -> None:
    validated = search_cli("validate", str(byo_study))
    assert validated.returncode == 0, validated.stderr
    assert "): valid" in validated.stdout
    for line in ("intents: exact_match", "policy: choice", "replies: studies.byo.scorers:token_accuracy",
                 "gates (3): intents.max_regression, policy.max_regression, replies.min"):
        assert line in validated.stdout, validated.stdout

    started = search_cli("start", str(byo_study), "--trials", "2", "--quiet")
    assert started.returncode == 0, started.stderr
    config = load_study(byo_study)
    trials = optuna.load_study(study_name=config.name, storage=config.storage).get_trials()
    kinds = [t.user_attrs.get("kind") for t in trials if t.state == TrialState.COMPLETE]
    assert kinds.count("baseline") == 5 and kinds.count("search") == 2
    for trial in trials:
        assert trial.state == TrialState.COMPLETE, trial.user_attrs.get("failure")
        scores = trial.user_attrs["scores_search"]
        assert set(scores) == {"intents", "policy", "replies"}
        assert all(0.0 <= value <= 1.0 for value in scores.values())


def _rows(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize(
    ("data", "fields", "metric", "low", "high"),
    [
        ("intents.jsonl", {}, "exact_match", 0.0, 1.0),
        ("policy.jsonl", {"prompt_field": "question", "choices_field": "options", "label_field": "correct"},
         "choice", 0.0, 1.0),
        ("replies/search.jsonl", {"prompt_field": "customer", "answer_field": "reply"}, "loglik",
         -float("inf"), 0.0),
        ("general.jsonl", {}, "perplexity", 1.0, float("inf")),
        ("replies/search.jsonl", {"prompt_field": "customer", "answer_field": "reply"},
         "studies.byo.scorers:token_accuracy", 0.0, 1.0),
    ],
)
def test_each_data_format_loads_and_scores_with_its_metric(
    byo_study: Path, data: str, fields: dict[str, str], metric: str, low: float, high: float
) -> None:
    base = byo_study.parent / "models" / "base"
    path = byo_study.parent / "data" / data
    spec = TaskSpec(name="t", search=path, metric=metric, **fields)  # type: ignore[arg-type]
    task = load_task(spec, AutoTokenizer.from_pretrained(base))
    assert task.search.n + task.heldout.n == len(_rows(path))
    score = score_slice(AutoModelForCausalLM.from_pretrained(base), task.search)
    assert low <= score <= high


def test_token_accuracy_on_padded_batches_equals_one_example_at_a_time(byo_study: Path) -> None:
    source = byo_study.parent / "models" / "replies"
    model = AutoModelForCausalLM.from_pretrained(source).eval()
    spec = TaskSpec(name="replies", search=byo_study.parent / "data" / "replies" / "search.jsonl",
                    heldout=byo_study.parent / "data" / "replies" / "heldout.jsonl", prompt_field="customer",
                    answer_field="reply", metric="studies.byo.scorers:token_accuracy")
    data = load_task(spec, AutoTokenizer.from_pretrained(source), batch_size=3).heldout
    assert len(data.batches) == 2  # rows of different lengths share a padded batch
    scored = score_examples(model, data)
    for example, value in zip(data.examples, scored, strict=True):
        ids = [*example.prompt_ids, *example.answer_ids, data.end_token_id]
        with torch.inference_mode():
            predicted = model(torch.tensor([ids])).logits[0].argmax(dim=-1)
        start = len(example.prompt_ids)
        # predictions of the answer's tokens and of the end token after it
        hits = predicted[start - 1: len(ids) - 1] == torch.tensor(ids[start:])
        assert value == pytest.approx(hits.double().mean().item())


def _byo_section() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("## Bring your own fine-tunes")
    return text[start:text.index("\n## ", start + 1)]


def test_readme_rows_and_scorer_are_the_shipped_ones() -> None:
    section = _byo_section()
    shipped = {
        json.dumps(row, sort_keys=True)
        for path in (EXAMPLE / "data").rglob("*.jsonl") for row in _rows(path)
    }
    shown = re.findall(r"```json\n(.*?)```", section, re.DOTALL)
    assert len(shown) >= 4
    for block in shown:
        for line in block.strip().splitlines():
            assert json.dumps(json.loads(line), sort_keys=True) in shipped, f"README row not shipped: {line}"
    code = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    source_lines = {line.strip() for line in (EXAMPLE / "scorers.py").read_text().splitlines()}
    assert code, "the section shows no scorer"
    for line in "".join(code).splitlines():
        assert line.strip() in source_lines, f"README scorer line not in studies/byo/scorers.py: {line}"
    toml = re.findall(r"```toml\n(.*?)```", section, re.DOTALL)
    assert toml and toml[0] == (EXAMPLE / "study.toml").read_text(encoding="utf-8"), (
        "the section's first TOML block must be studies/byo/study.toml as shipped"
    )


def test_a_lower_is_better_task_cannot_join_a_mean_objective(byo_study: Path) -> None:
    """What the README says about perplexity next to the example's tasks."""
    text = byo_study.read_text().replace('metric = "studies.byo.scorers:token_accuracy"', 'metric = "perplexity"')
    variant = byo_study.with_name("perplexity.toml")
    variant.write_text(text)
    with pytest.raises(StudyConfigError, match=r"study\.objective: mode 'mean' cannot combine"):
        load_study(variant)
    per_task = variant.with_name("per_task.toml")
    per_task.write_text(text.replace('objective = "mean"', 'objective = "per_task"')
                        .replace('sampler = "cmaes"', 'sampler = "tpe"'))
    config = load_study(per_task)
    assert config.objective == "per_task" and config.tasks[2].metric == "perplexity"


def test_validate_names_a_scorer_it_cannot_import(byo_study: Path) -> None:
    variant = byo_study.with_name("typo.toml")
    variant.write_text(byo_study.read_text().replace("studies.byo.scorers:", "studies.byo.scorer:"))
    with pytest.raises(StudyConfigError, match=r"typo\.toml: tasks\[2\]\.metric: metric "
                       r"'studies\.byo\.scorer:token_accuracy': cannot import module 'studies\.byo\.scorer'"):
        load_study(variant)
