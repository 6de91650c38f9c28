"""lm-eval-harness tasks in memory: the study keys, the document split, named errors, and
identical per-document results to lm-eval run on the checkpoint `search export --materialize`
writes (the reference mergekit-evolve's disk path would compute).

Real lm-eval 0.4.13 (skipped when not installed), the shipped demo family, and the task YAMLs
of studies/logistics_lmeval/tasks (a multiple_choice, a generate_until and a loglikelihood
task over the demo family's own rows; nothing is downloaded).
"""

from __future__ import annotations

import dataclasses
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fitness.errors import FitnessError
from fitness.lm_eval_task import DocumentSplit, compact_indices, expand_indices, split_documents
from search.config import load_study
from search.errors import StudyConfigError

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "studies" / "logistics_lmeval" / "study.toml"
TASKS = REPO / "studies" / "logistics_lmeval" / "tasks"
FAMILY = REPO / "studies" / "logistics" / "family"
NAMES = {"refunds_mc": "logistics_refunds_mc", "shipping_gen": "logistics_shipping_gen",
         "catalog_ll": "logistics_catalog_ll"}

needs_lm_eval = pytest.mark.skipif(
    subprocess.run([sys.executable, "-c", "import lm_eval"], capture_output=True).returncode != 0,
    reason="lm-eval is not installed (pip install -e '.[lm-eval]')",
)


def study_copy(folder: Path, *, limit: int = 40, trials: int = 16, **replace: str) -> Path:
    """The shipped lm-eval study with absolute paths, a smaller ``limit`` and text replacements."""
    text = STUDY.read_text(encoding="utf-8")
    text = text.replace('"../logistics/family', f'"{FAMILY}').replace('lm_eval_include = "tasks"',
                                                                      f'lm_eval_include = "{TASKS}"')
    text = text.replace("limit = 40", f"limit = {limit}").replace("trials = 16", f"trials = {trials}")
    text = text.replace('output = "runs/logistics_lmeval"', f'output = "{folder / "run"}"')
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    path = folder / "study.toml"
    path.write_text(text, encoding="utf-8")
    return path


# -- the study file (light: no lm-eval import) -----------------------------------------------


def test_the_study_keys_become_an_lm_eval_spec_with_the_yaml_first_metric_as_default(tmp_path: Path) -> None:
    config = load_study(study_copy(tmp_path))
    tasks = {t.name: t for t in config.tasks}
    assert tasks["refunds_mc"].metric == "lm_eval/acc"
    assert tasks["refunds_mc"].lm_eval is not None and tasks["refunds_mc"].lm_eval.include == TASKS
    # no lm_eval_metric: the first metric of the task's YAML (read as text)
    assert tasks["shipping_gen"].metric == "lm_eval/exact_match"
    assert [t.gates[0].min for t in config.tasks] == [0.3, 0.3, 0.3]


def test_loading_the_study_does_not_import_lm_eval(tmp_path: Path) -> None:
    path = study_copy(tmp_path)
    code = f"import sys; from search.config import load_study; load_study({str(path)!r}); print('lm_eval' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"


def test_data_keys_on_an_lm_eval_task_are_named(tmp_path: Path) -> None:
    path = study_copy(tmp_path, **{'lm_eval_metric = "acc"\nlimit = 40': 'lm_eval_metric = "acc"\nsearch = "x.jsonl"'})
    with pytest.raises(StudyConfigError, match=r"tasks\[0\]\.search: is not used by an lm-eval task"):
        load_study(path)


def test_a_missing_include_folder_is_named(tmp_path: Path) -> None:
    path = study_copy(tmp_path)
    path.write_text(path.read_text().replace(str(TASKS), str(tmp_path / "nope"), 1))
    with pytest.raises(StudyConfigError, match=r"tasks\[0\]\.lm_eval_include: .*nope is not a folder"):
        load_study(path)


def test_perplexity_is_minimised_and_accuracy_maximised(tmp_path: Path) -> None:
    from fitness.spec import higher_is_better

    block = ('lm_eval = "logistics_catalog_ll"      # loglikelihood: is the answer the greedy continuation\n'
             f'lm_eval_include = "{TASKS}"\nlm_eval_metric = "acc"')
    path = study_copy(tmp_path, **{block: block.replace('"acc"', '"perplexity"')})
    with pytest.raises(StudyConfigError, match=r"study.objective: mode 'mean' cannot combine higher-is-better "
                                               r"tasks \(refunds_mc, shipping_gen\) with lower-is-better tasks \(catalog_ll\)"):
        load_study(path)
    tasks = {t.name: t for t in load_study(study_copy(tmp_path)).tasks}
    assert higher_is_better(tasks["catalog_ll"].metric) and higher_is_better(tasks["refunds_mc"].metric)
    assert not higher_is_better("lm_eval/perplexity") and not higher_is_better("lm_eval/bits_per_byte,none")


def test_every_lm_eval_key_has_a_readme_row_and_is_in_its_example() -> None:
    from search.config import LM_EVAL_TASK_KEYS

    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("#### lm-eval-harness tasks"):text.index("#### Gates")]
    example = section[section.index("```toml"):section.index("```", section.index("```toml") + 3)]
    keys = [key for key in LM_EVAL_TASK_KEYS if key.startswith("lm_eval")]
    assert [key for key in keys if f"| `{key}` |" not in section] == []
    assert [key for key in keys if f"\n{key} = " not in example] == []


# -- the split ----------------------------------------------------------------------------------


@given(n=st.integers(2, 500), seed=st.integers(0, 2**31), fraction=st.floats(0.05, 0.95),
       limit=st.one_of(st.none(), st.integers(1, 50)))
def test_the_split_is_disjoint_sorted_seeded_and_limited(n: int, seed: int, fraction: float, limit: int | None) -> None:
    try:
        split = split_documents(n, seed=seed, heldout_fraction=fraction, limit=limit)
    except FitnessError as exc:
        assert "both splits need at least one document" in str(exc)
        assert round(n * fraction) in (0, n)
        return
    search, heldout = split["search"], split["heldout"]
    assert search == sorted(search) and heldout == sorted(heldout)
    assert not set(search) & set(heldout) and set(search) | set(heldout) <= set(range(n))
    assert split == split_documents(n, seed=seed, heldout_fraction=fraction, limit=limit)
    if limit is None:
        assert len(heldout) == round(n * fraction) and len(search) + len(heldout) == n
    else:
        full = split_documents(n, seed=seed, heldout_fraction=fraction, limit=None)
        assert set(search) <= set(full["search"]) and len(search) == min(limit, len(full["search"]))


@given(st.sets(st.integers(0, 300)))
def test_compact_indices_round_trip(indices: set[int]) -> None:
    ordered = sorted(indices)
    text = compact_indices(ordered)
    assert expand_indices(text) == ordered
    runs = sum(1 for i in ordered if i - 1 not in indices)
    assert (text.count(",") + 1 == runs) if ordered else text == ""  # one part per run of consecutive indices


def test_malformed_stored_indices_are_named() -> None:
    with pytest.raises(FitnessError, match=r"document indices: 'x' in '1,x' is not N or N-M"):
        expand_indices("1,x")
    with pytest.raises(FitnessError, match=r"document indices: '2' in '3-5,2' is out of order"):
        expand_indices("3-5,2")
    split = DocumentSplit("t", 10, (0, 1, 2, 5), (3, 4, 9))
    assert split.to_attr() == {"lm_eval": "t", "documents": 10, "search": "0-2,5", "heldout": "3-4,9"}
    assert DocumentSplit.from_attr(split.to_attr()) == split
    # the metric's aggregation is recorded beside the split, not part of it (a resume compares documents)
    averaged = DocumentSplit("t", 10, (0, 1, 2, 5), (3, 4, 9), "acc,none", "mean")
    assert averaged == split and DocumentSplit.from_attr(averaged.to_attr()).aggregation == "mean"
    assert averaged.no_rows_reason("x") is None and split.no_rows_reason("x") is None


# -- lm-eval itself -----------------------------------------------------------------------------


def _own_documents(folder: Path) -> Path:
    """The shipped task YAMLs and the family's rows in ``folder``, laid out as in the repository
    (``tasks/logistics_data.py`` reads ``../../logistics/family/data``, outside the include folder)."""
    tasks = folder / "studies" / "logistics_lmeval" / "tasks"
    shutil.copytree(TASKS, tasks, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(FAMILY / "data", folder / "studies" / "logistics" / "family" / "data")
    return tasks


@needs_lm_eval
def test_the_study_records_its_document_split_and_a_resume_must_split_the_same(tmp_path: Path) -> None:
    from fitness.lm_eval_task import document_split
    from search.definition import DefinitionChangedError
    from search.finalize import finalize_study
    from search.lm_eval_splits import SPLITS_KEY, split_lines, stored_splits
    from search.plan import open_driver_study, plan_study
    from search.report import build_report

    tasks = _own_documents(tmp_path / "own")
    path = study_copy(tmp_path, limit=6, **{f'lm_eval_include = "{TASKS}"': f'lm_eval_include = "{tasks}"'})
    config = load_study(path)
    plan = plan_study(config)
    study, storage = open_driver_study(plan)
    storage.flush()
    expected = {t.name: document_split(t) for t in config.tasks}
    assert stored_splits(study.user_attrs) == expected
    refunds = study.user_attrs[SPLITS_KEY]["refunds_mc"]
    assert refunds["lm_eval"] == "logistics_refunds_mc" and refunds["documents"] == 400
    assert len(expand_indices(refunds["search"])) == len(expand_indices(refunds["heldout"])) == 6
    assert split_lines(study.user_attrs)[0] == "lm-eval task refunds_mc (logistics_refunds_mc): 6 search docs, " \
                                                "6 held-out docs (of 400)"
    page = build_report(study, task_higher={t.name: True for t in config.tasks})
    assert "lm-eval task catalog_ll (logistics_catalog_ll): 6 search docs, 6 held-out docs (of 400)" in page
    assert f"search: {refunds['search']}" in page
    from search.commands.status import render_status

    assert split_lines(study.user_attrs)[0] in render_status(study).splitlines()

    study, storage = open_driver_study(plan)  # a resume with the same documents goes on
    storage.flush()
    assert stored_splits(study.user_attrs) == expected

    # Rows added to the data behind the YAML (not in the include folder, so not in the definition):
    refunds_rows = tmp_path / "own" / "studies" / "logistics" / "family" / "data" / "refunds" / "search.jsonl"
    lines = refunds_rows.read_text(encoding="utf-8").splitlines(keepends=True)
    refunds_rows.write_text("".join(lines + lines[:5]), encoding="utf-8")
    with pytest.raises(DefinitionChangedError, match=r"split its lm-eval documents differently: task 'refunds_mc': "
                                                     r"400 documents -> 405, search docs 6 -> 6 \(\d+ indices differ\)"):
        open_and_flush(plan)
    with pytest.raises(DefinitionChangedError, match=r"task 'refunds_mc': 400 documents -> 405"):
        finalize_study(config)  # before any worker scores held-out documents


def open_and_flush(plan) -> None:  # noqa: ANN001
    from search.plan import open_driver_study

    open_driver_study(plan)[1].flush()




@needs_lm_eval
def test_a_metric_lm_eval_does_not_average_has_no_rows_and_the_reason_names_it(tmp_path: Path) -> None:
    """catalog_ll scored by perplexity: lm-eval's registry aggregates it with `perplexity`, not `mean`:
    no interval, and no multi-fidelity stages (the study file may ask for them: validate refuses)."""
    from fitness.lm_eval_task import check_lm_eval_task
    from search.confidence import objective_rule
    from search.lm_eval_splits import SPLITS_KEY

    block = ('lm_eval = "logistics_catalog_ll"      # loglikelihood: is the answer the greedy continuation\n'
             f'lm_eval_include = "{TASKS}"\nlm_eval_metric = "acc"')
    path = study_copy(tmp_path, **{block: block.replace('"acc"', '"perplexity"'),
                                   'objective = "mean"': 'objective = "per_task"', 'sampler = "cmaes"': 'sampler = "nsga2"',
                                   "top_k = 3": "fidelity = { first_stage = 4 }\ntop_k = 3"})
    config = load_study(path)
    assert config.fidelity is not None  # lm-eval tasks may be staged when lm-eval averages their metric
    tasks = {t.name: t for t in config.tasks}
    reason = ("task 'catalog_ll': lm-eval aggregates its metric perplexity,none with 'perplexity', "
              "not a mean of per-document values")
    with pytest.raises(FitnessError, match=re.escape(reason) + r", so it cannot be scored in stages \(study.fidelity\)"):
        check_lm_eval_task(tasks["catalog_ll"], staged=True)
    split = DocumentSplit("logistics_catalog_ll", 400, (0,), (1,), "perplexity,none", "perplexity")  # as recorded
    assert split.no_rows_reason("catalog_ll") == reason
    refunds = DocumentSplit("logistics_refunds_mc", 400, (0,), (1,), "acc,none", "mean")  # as the run above records
    attrs = {"definition": {"objective": "per_task", "tasks": {
                 "refunds_mc": {"metric": "lm_eval/acc", "lm_eval": {"task": "logistics_refunds_mc"}},
                 "catalog_ll": {"metric": "lm_eval/perplexity", "lm_eval": {"task": "logistics_catalog_ll"}}}},
             SPLITS_KEY: {"refunds_mc": refunds.to_attr(), "catalog_ll": split.to_attr()}}
    rule = objective_rule(attrs, ["maximize", "minimize"])
    assert rule is not None and rule.no_interval == {"catalog_ll": reason}


@needs_lm_eval
def test_unknown_task_and_metric_are_named_by_validate(tmp_path: Path) -> None:
    from search.commands.validate import check_data

    unknown_task = study_copy(tmp_path, **{'"logistics_refunds_mc"': '"logistics_refund_mc"'})
    with pytest.raises(StudyConfigError, match=r"tasks\[0\]: task 'refunds_mc': lm_eval: unknown task "
                                               r"'logistics_refund_mc'.*did you mean 'logistics_refunds_mc'"):
        check_data(load_study(unknown_task))
    unknown_metric = study_copy(tmp_path, **{'lm_eval_metric = "acc"\nlimit = 40\ngates = { min = 0.3 }\n\n'
                                             '[[tasks]]\nname = "shipping_gen"':
                                             'lm_eval_metric = "f1"\nlimit = 40\ngates = { min = 0.3 }\n\n'
                                             '[[tasks]]\nname = "shipping_gen"'})
    with pytest.raises(StudyConfigError, match=r"tasks\[0\]: task 'refunds_mc': lm_eval_metric: task "
                                               r"'logistics_refunds_mc' has no metric 'f1' \(it has: acc,none, acc_norm,none\)"):
        check_data(load_study(unknown_metric))


@needs_lm_eval
@pytest.mark.slow
def test_in_memory_results_equal_lm_eval_on_the_exported_checkpoint(tmp_path: Path) -> None:
    """Baselines and one search trial, finalized; trial 4 is the default_ties merge. Per task: the
    trial's stored score, the worker's in-memory run and `lm_eval --model hf pretrained=DIR` on the
    checkpoint `search export --materialize` wrote agree document by document, and the per-document
    values the trial stored are lm-eval's own, whose mean is the score."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from fitness.lm_eval_task import LmEvalTask
    from merges.recipe import Recipe
    from search.cli import main
    from search.confidence import confidence_lines
    from search.driver import worker_setup
    from search.records import trial_rows
    from search.storage import load_existing_study
    from search.worker import TrialWorker

    path = study_copy(tmp_path, limit=12, trials=1)
    assert main(["start", str(path)]) == 0
    config = load_study(path)
    study = load_existing_study(config.name, config.storage)
    trial = next(t for t in study.get_trials() if t.user_attrs.get("baseline") == "default_ties")
    out = tmp_path / "merged"
    assert main(["export", str(path), "-o", str(tmp_path / "recipe.yaml"), "--trial", str(trial.number),
                 "--materialize", str(out)]) == 0

    worker = TrialWorker(worker_setup(config))
    outcome = worker.evaluate(Recipe.from_dict(trial.user_attrs["recipe"]), "search")
    assert outcome.error is None and outcome.scores == trial.user_attrs["scores_search"]
    manager = TaskManager(include_path=str(TASKS), include_defaults=False)
    for name, lm_task in NAMES.items():
        data = worker.tasks[name]
        assert isinstance(data, LmEvalTask)
        ours = data.run("search", log_samples=True)
        disk = simple_evaluate(model="hf", model_args=f"pretrained={out}", tasks=[lm_task], task_manager=manager,
                               samples={lm_task: data.split["search"]}, batch_size=config.execution.batch_size,
                               device="cpu", bootstrap_iters=0, log_samples=True)
        assert disk is not None
        assert ours.score == disk["results"][lm_task][data.key] == trial.user_attrs["scores_search"][name]
        theirs = disk["samples"][lm_task]
        assert [s["doc_id"] for s in ours.samples] == [s["doc_id"] for s in theirs] == data.split["search"]
        for mine, ref in zip(ours.samples, theirs, strict=True):
            assert mine["filtered_resps"] == ref["filtered_resps"], (name, mine["doc_id"])
            assert {m: mine[m] for m in mine["metrics"]} == {m: ref[m] for m in ref["metrics"]}
        # per-document values: lm-eval's own (its filter's samples on disk), their mean is the score
        metric, filter_key = data.key.split(",")
        assert data.aggregation == "mean"
        values = [float(s[metric]) for s in theirs if s["filter"] == filter_key]
        assert list(outcome.rows[name]) == ours.rows == values and len(values) == len(data.split["search"])
        assert abs(math.fsum(values) / len(values) - ours.score) <= 1e-12
        assert trial_rows(trial, {})[name].tolist() == values  # stored like every task's rows
    assert set(outcome.row_ids) == set(NAMES)
    # a multi-fidelity stage: some search documents, in the order asked, each with its full-run value
    stage = {name: [7, 0, 3, 11] for name in NAMES}
    staged = worker.evaluate(Recipe.from_dict(trial.user_attrs["recipe"]), "search", rows=stage)
    assert staged.error is None and staged.rows is not None
    for name in NAMES:
        assert list(staged.rows[name]) == [outcome.rows[name][i] for i in stage[name]], name
    # with few-shot examples: a stage's prompts are the full run's (lm-eval draws them document by document)
    spec = next(t for t in config.tasks if t.name == "refunds_mc")
    assert spec.lm_eval is not None
    fewshot = LmEvalTask(dataclasses.replace(spec, lm_eval=dataclasses.replace(spec.lm_eval, num_fewshot=2)),
                         worker.tasks["refunds_mc"].lm)  # type: ignore[union-attr]
    full = fewshot.run("search", log_samples=True)
    part = fewshot.run("search", log_samples=True, rows=[9, 2, 5])
    assert full.rows is not None and part.rows == [full.rows[i] for i in (9, 2, 5)]
    prompts = {s["doc_id"]: s["arguments"] for s in full.samples}
    assert all(s["arguments"] == prompts[s["doc_id"]] for s in part.samples)
    assert "\n\n" in part.samples[0]["arguments"][0][0]  # two examples precede the question
    assert study.user_attrs["example_rows"]["search"] == outcome.row_ids
    assert outcome.row_ids["refunds_mc"]["n"] == 12
    # finalize re-scored the finalists and baselines on held-out: the tasks get 95% intervals
    lines = confidence_lines(study.get_trials(), study.user_attrs, [d.name.lower() for d in study.directions])
    assert any(line.startswith("  tasks: refunds_mc ") for line in lines), lines
    assert not any("no intervals" in line for line in lines), lines


def test_a_chat_template_the_base_tokenizer_lacks_is_named_by_validate(tmp_path: Path) -> None:
    from search.commands.validate import check_data

    path = study_copy(tmp_path, **{'lm_eval_metric = "acc"\nlimit = 40\ngates = { min = 0.3 }\n\n[[tasks]]\nname = "shipping_gen"':
                                   'lm_eval_metric = "acc"\nlimit = 40\nchat_template = true\ngates = { min = 0.3 }\n\n'
                                   '[[tasks]]\nname = "shipping_gen"'})
    with pytest.raises(StudyConfigError, match=r"tasks\[0\]\.chat_template: the base tokenizer .* has no chat template"):
        check_data(load_study(path))


def test_without_lm_eval_installed_validate_gives_the_install_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from search.commands.validate import check_data

    config = load_study(study_copy(tmp_path))
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # find_spec then reports it missing
    with pytest.raises(StudyConfigError, match=r"tasks\[0\]: task 'refunds_mc': lm-eval tasks need "
                                               r"lm_eval\[hf\]==0\.4\.13 \(lm_eval not installed\); install it "
                                               r"with: pip install -e \"\.\[lm-eval\]\""):
        check_data(config)
