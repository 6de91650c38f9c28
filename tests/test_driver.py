"""The driver on tiny Llama checkpoints: gates, failures, constraints, CMA generations, seeds.

Studies run in-process with the inline pool on the ``llama_family`` fixture and small
synthetic slices (scored with ``loglik``, which varies continuously between recipes).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import optuna
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from optuna.trial import FrozenTrial, TrialState
from optuna_dashboard._serializer import serialize_frozen_trial
from transformers import AutoModelForCausalLM, AutoTokenizer

from fitness.scoring import score_slice
from fitness.slices import load_task
from search import ranking
from search.commands.export import choose_trial
from search.commands.status import render_status
from search.config import load_study
from search.driver import run_study
from search.errors import SearchError
from search.samplers import visible_trials
from tests.checkpoints import TinyFamily
from tests.studies import stored_study, write_study

optuna.logging.set_verbosity(optuna.logging.WARNING)



def search_trials(study: optuna.Study) -> list[FrozenTrial]:
    return [t for t in study.get_trials() if t.user_attrs.get("kind") == "search"]


def test_unpassable_gate_gives_no_best_and_status_names_the_gate(
    tmp_path: Path, llama_family: TinyFamily
) -> None:
    # loglik is <= 0, so a minimum of 1.0 can never be met.
    path = write_study(tmp_path, llama_family, trials=3, gates={"beta": "{ min = 1.0 }"})
    result = run_study(load_study(path), quiet=True)
    assert result.done == 3
    assert result.finalized is not None and result.finalized.final_trial is None
    study = stored_study(path)
    trials = study.get_trials()
    assert ranking.best_feasible(trials, ["maximize"]) is None
    assert all(not t.user_attrs["feasible"] for t in ranking.search_trials(trials))
    blocker = ranking.what_blocks(trials, ["beta.min"])
    assert blocker is not None and blocker.gate == "beta.min"
    closest = min(ranking.search_trials(trials), key=lambda t: 1.0 - t.user_attrs["scores_search"]["beta"])
    assert blocker.trial == closest.number
    assert blocker.shortfall == pytest.approx(1.0 - closest.user_attrs["scores_search"]["beta"])
    text = render_status(study, budget=3)
    assert "no feasible trial" in text and "'beta.min'" in text
    assert f"{blocker.shortfall:.4g}" in text
    with pytest.raises(SearchError, match="beta.min"):
        choose_trial(trials, study.user_attrs, study.directions, None)


def flaky_scorer(model: torch.nn.Module, batch: object, examples: Sequence[object]) -> list[float]:
    """A user scorer that raises for merged models: those whose first head weight is none of
    the sources' and above their median (so every source passes and about half the mixes fail)."""
    value = float(model.lm_head.weight[0, 0])
    sources = json.loads(os.environ["FLAKY_SCORER_SOURCES"])
    if value not in sources and value > sorted(sources)[len(sources) // 2]:
        raise ValueError(f"flaky scorer refuses lm_head[0,0] = {value:.6f}")
    return [0.5] * len(examples)


def test_trial_whose_scorer_raises_is_failed_with_its_reason_and_the_study_goes_on(
    tmp_path: Path, llama_family: TinyFamily, monkeypatch: pytest.MonkeyPatch
) -> None:
    heads = [
        float(AutoModelForCausalLM.from_pretrained(p).lm_head.weight[0, 0].detach()) for p in llama_family.sources
    ]
    monkeypatch.setenv("FLAKY_SCORER_SOURCES", json.dumps(heads))
    path = write_study(tmp_path, llama_family, trials=8, metric="tests.test_driver:flaky_scorer")
    result = run_study(load_study(path), quiet=True)
    study = stored_study(path)
    searched = search_trials(study)
    failed = [t for t in searched if t.state == TrialState.FAIL]
    complete = [t for t in searched if t.state == TrialState.COMPLETE]
    assert result.done == 8 and len(searched) == 8
    assert failed and complete, "the median threshold should split the trials"
    for trial in failed:
        assert "flaky scorer refuses" in trial.user_attrs["failure"]
        assert "scoring task 'alpha' failed: " in trial.user_attrs["failure"]
        assert "scorer 'tests.test_driver:flaky_scorer'" in trial.user_attrs["failure"]
        assert trial.values is None
    for trial in complete:
        assert trial.user_attrs["scores_search"] == {"alpha": 0.5, "beta": 0.5}
    status = render_status(study, budget=8)
    assert f"{len(failed)} failed" in status and "flaky scorer refuses" in status


def test_loop_timings_account_for_this_runs_search_trials(tmp_path: Path, llama_family: TinyFamily) -> None:
    path = write_study(tmp_path, llama_family, trials=4)
    config = load_study(path)
    first = run_study(config, quiet=True)
    # a resumed run reports only its own trials
    second = run_study(load_study(path, trials=7), quiet=True)
    searched = sorted(search_trials(stored_study(path)), key=lambda t: t.number)
    assert [first.timings.trials, second.timings.trials] == [4, 3] and len(searched) == 7
    for timings, trials in ((first.timings, searched[:4]), (second.timings, searched[4:])):
        assert timings.merge_s == pytest.approx(sum(t.user_attrs["timings"]["merge_s"] for t in trials))
        assert timings.score_s == pytest.approx(sum(t.user_attrs["timings"]["score_s"] for t in trials))
        assert timings.sample_s > 0 and timings.store_s > 0 and timings.dispatch_s >= 0
        # inline, the loop's wall time holds the merges, the scoring and the driver's work
        assert timings.wall_s >= timings.driver_s + timings.merge_s + timings.score_s


def source_scores(tmp_path: Path, family: TinyFamily, task: str) -> list[float]:
    """The sources' search scores on ``task`` (from a study with no search trials)."""
    folder = tmp_path / "probe"
    folder.mkdir()
    path = write_study(folder, family, trials=0)
    run_study(load_study(path), quiet=True)
    baselines = ranking.baseline_trials(stored_study(path).get_trials())
    return sorted(t.user_attrs["scores_search"][task] for n, t in baselines.items() if n.startswith("source:"))


def test_stored_constraints_are_what_the_dashboard_reads(tmp_path: Path, llama_family: TinyFamily) -> None:
    # A gate halfway between the sources' scores: some candidates pass, some fail.
    alpha = source_scores(tmp_path, llama_family, "alpha")
    threshold = (alpha[0] + alpha[-1]) / 2
    path = write_study(tmp_path, llama_family, trials=6, gates={"alpha": f"{{ min = {threshold!r} }}"})
    run_study(load_study(path), quiet=True)
    study = stored_study(path)
    study_system_attrs = study._storage.get_study_system_attrs(study._study_id)
    seen = set()
    for trial in study.get_trials():
        if trial.state != TrialState.COMPLETE:
            continue
        shown = serialize_frozen_trial(study._study_id, trial, study_system_attrs)["constraints"]
        margin = trial.user_attrs["gates"]["alpha.min"]["margin"]
        assert shown == [-margin if margin else 0.0]
        dashboard_feasible = all(c <= 0 for c in shown)
        assert dashboard_feasible == trial.user_attrs["feasible"] == ranking.is_feasible(trial)
        assert dashboard_feasible == (trial.user_attrs["scores_search"]["alpha"] >= threshold)
        # Exactly one format: no "constraints:<key>" entries that Optuna would add to the list.
        assert list(trial.constraints) == ["0"]
        seen.add(dashboard_feasible)
    assert seen == {True, False}


def test_cmaes_asks_whole_generations_and_penalises_infeasible(
    tmp_path: Path, llama_family: TinyFamily
) -> None:
    # Generation 0 does not depend on the scores: a first run without gates gives its beta
    # scores, and a gate at their median splits it into feasible and infeasible trials.
    (tmp_path / "probe").mkdir()
    probe = write_study(tmp_path / "probe", llama_family, trials=4, sampler="cmaes", population=4)
    run_study(load_study(probe), quiet=True)
    beta = sorted(t.user_attrs["scores_search"]["beta"] for t in search_trials(stored_study(probe)))
    path = write_study(
        tmp_path, llama_family, trials=8, sampler="cmaes", population=4,
        gates={"beta": f"{{ min = {(beta[1] + beta[2]) / 2!r} }}"},
    )
    run_study(load_study(path), quiet=True)
    study = stored_study(path)
    searched = search_trials(study)
    generations = [t.system_attrs.get("cma:generation") for t in searched]
    assert generations == [0, 0, 0, 0, 1, 1, 1, 1]
    penalty = study.user_attrs["cma_penalty"]
    assert {t.user_attrs["feasible"] for t in searched} == {True, False}
    # Every trial is told its real objective; only the sampler's view penalises.
    seen = {t.number: t for t in visible_trials(study.get_trials(), position=None, horizon=None,
                                                directions=["maximize"], scale=penalty)}
    assert set(seen) == {t.number for t in searched}
    for trial in searched:
        scores = trial.user_attrs["scores_search"]
        assert trial.value == math.fsum(scores.values()) / len(scores)
        if trial.user_attrs["feasible"]:
            assert seen[trial.number].value == trial.value
        else:
            violation = sum(max(0.0, c) for c in trial.constraints.values())
            assert seen[trial.number].value == trial.value - penalty * (1 + violation)
    # No baseline entered a generation.
    assert all(
        "cma:generation" not in t.system_attrs for t in study.get_trials() if t.user_attrs["kind"] == "baseline"
    )


def test_a_seeded_study_gives_the_same_trials_twice(tmp_path: Path, llama_family: TinyFamily) -> None:
    runs = []
    for name in ("one", "two"):
        folder = tmp_path / name
        folder.mkdir()
        path = write_study(folder, llama_family, trials=4, sampler="cmaes", population=4, seed=7)
        run_study(load_study(path), quiet=True)
        runs.append([(t.params, t.user_attrs.get("scores_search")) for t in stored_study(path).get_trials()])
    assert runs[0] == runs[1]
    searched = [p for p, _ in runs[0] if p]
    assert len(searched) == 4 and len({json.dumps(p, sort_keys=True) for p in searched}) == 4


def test_source_baseline_scores_exactly_the_source(tmp_path: Path, llama_family: TinyFamily) -> None:
    path = write_study(tmp_path, llama_family, trials=0)
    config = load_study(path)
    run_study(config, quiet=True)
    study = stored_study(path)
    baselines = ranking.baseline_trials(study.get_trials())
    assert set(baselines) == {"source:s0", "source:s1", "source:s2", "uniform_linear"}
    tokenizer = AutoTokenizer.from_pretrained(llama_family.base)
    for index, source in enumerate(llama_family.sources):
        model = AutoModelForCausalLM.from_pretrained(source).eval()
        for task in config.tasks:
            data = load_task(task, tokenizer)
            direct = score_slice(model, data.search)
            assert baselines[f"source:s{index}"].user_attrs["scores_search"][task.name] == direct


def test_malformed_study_fails_in_validation_with_the_key_path(
    tmp_path: Path, llama_family: TinyFamily
) -> None:
    path = write_study(tmp_path, llama_family, trials=2, method="ties",
                       genome_extra="density = { min = 0.2, max = 1.5 }")
    proc = subprocess.run(
        [sys.executable, "-m", "search.cli", "start", str(path), "--quiet"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "genome.density.max" in lines[0] and "1.5" in lines[0]
    assert not (tmp_path / "out" / "study.db").exists()


def test_export_writes_the_final_recipe_and_its_materialized_checkpoint(
    tmp_path: Path, llama_family: TinyFamily, capsys: pytest.CaptureFixture[str]
) -> None:
    from search.cli import main

    path = write_study(tmp_path, llama_family, trials=3, method="ties",
                       genome_extra="density = { min = 0.3, max = 1.0 }")
    config = load_study(path)
    run_study(config, quiet=True)
    study = stored_study(path)
    final = study.user_attrs["final_trial"]
    assert isinstance(final, int)
    recipe = tmp_path / "export" / "recipe.yaml"
    merged = tmp_path / "merged"
    assert main(["export", str(path), "-o", str(recipe), "--materialize", str(merged)]) == 0
    text = recipe.read_text()
    assert f"# trial: {final} (search trial); seed: 0" in text
    assert "merge_method: ties" in text and "# scores (held-out slices): alpha" in text
    trial = study.get_trials()[final]
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged)
    for task in config.tasks:
        assert score_slice(model, load_task(task, tokenizer).search) == trial.user_attrs["scores_search"][task.name]
    # --trial picks another trial; a baseline is exportable too.
    source = ranking.baseline_trials(study.get_trials())["source:s1"]
    assert main(["export", str(path), "-o", str(recipe), "--trial", str(source.number)]) == 0
    assert "(source:s1)" in recipe.read_text()
    assert main(["export", str(path), "-o", str(recipe), "--trial", "999"]) == 2
    assert "--trial 999: no such trial" in capsys.readouterr().err


def _stored_trial(number: int, value: float, constraints: list[float], kind: str = "search") -> FrozenTrial:
    trial = optuna.trial.create_trial(
        value=value, user_attrs={"kind": kind, "objective_raw": [value], "scores_search": {"t": value}},
        system_attrs={"constraints": constraints},
    )
    trial.number = number
    return trial


@settings(deadline=None)  # no wall-clock limit: the machine may be busy
@given(
    st.lists(
        st.tuples(st.floats(-10, 10), st.lists(st.floats(-1, 1), min_size=2, max_size=2)),
        min_size=1, max_size=12,
    )
)
def test_ranking_puts_feasible_first_and_best_is_never_infeasible(
    rows: list[tuple[float, list[float]]]
) -> None:
    trials = [_stored_trial(i, value, constraints) for i, (value, constraints) in enumerate(rows)]
    order = ranking.ranked(trials, ["maximize"])
    feasible = [all(c <= 0 for c in cons) for _, cons in rows]
    flags = [feasible[t.number] for t in order]
    assert flags == sorted(flags, reverse=True)  # every feasible trial before every infeasible
    best = ranking.best_feasible(trials, ["maximize"])
    if any(feasible):
        assert best is not None and feasible[best.number]
        assert best.value == max(v for (v, _), ok in zip(rows, feasible, strict=True) if ok)
        assert ranking.what_blocks(trials, ["a", "b"]) is None
    else:
        assert best is None
        blocker = ranking.what_blocks(trials, ["a", "b"])
        assert blocker is not None
        closest = min(sum(c for c in cons if c > 0) for _, cons in rows)
        assert ranking.total_violation(trials[blocker.trial]) == closest
        assert blocker.shortfall == max(rows[blocker.trial][1]) > 0
