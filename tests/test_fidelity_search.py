"""Multi-fidelity scoring in the search (``study.fidelity``): config, stage slices, the loop,
what samplers see, and a SIGKILL mid-stage resumed without scoring a row twice.

The pure part (row order, stage sizes, the stopping rule) is tested in tests/test_fidelity.py.
Studies here are the tiny family's (tests.studies: 2 tasks x 12 search rows), stages of
4, 8, 16 and 24 rows.
"""

from __future__ import annotations

import json
import os
import random
import signal
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
import torch
from optuna.trial import TrialState

from fitness.fidelity import FidelityConfig
from search import ranking, sqlite_trials
from search.cli import main
from search.commands.status import render_status
from search.config import load_study
from search.driver import run_study
from search.errors import SearchError, StudyConfigError
from search.records import (
    decode_rows_prefix,
    encode_prefix,
    encode_rows,
    trial_prefix_rows,
    trial_rows,
)
from search.samplers import POSITION, visible_trials
from search.staged import FIDELITY_ATTR, PROMOTED_ATTR
from tests.checkpoints import TinyFamily
from tests.studies import stored_study, write_study
from tests.test_driver import search_trials
from tests.test_report import assert_report_marks_stopped
from tests.test_resume import cli, count_call_and_kill_at

STAGES = "fidelity = { first_stage = 4, growth = 2.0 }"


def staged_study(folder: Path, family: TinyFamily, *, fidelity: str = STAGES, **kwargs: object) -> Path:
    path = write_study(folder, family, **kwargs)  # type: ignore[arg-type]
    text = path.read_text().replace("top_k = ", f"{fidelity}\ntop_k = ", 1)
    path.write_text(text)
    return path


# -- config -------------------------------------------------------------------------------


def test_config_reads_fidelity_and_names_the_key_of_each_error(tmp_path: Path, llama_family: TinyFamily) -> None:
    assert load_study(write_study(tmp_path, llama_family, trials=2)).fidelity is None
    config = load_study(staged_study(tmp_path, llama_family, trials=2,
                                     fidelity="fidelity = { first_stage = 6 }"))
    assert config.fidelity == FidelityConfig(first_stage=6, growth=3.0, confidence=0.95)
    assert config.fidelity.rule == "test"  # absent: the paired test only, as before the rule existed
    ranked = load_study(staged_study(tmp_path, llama_family, trials=2,
                                     fidelity='fidelity = { first_stage = 6, growth = 2.0, rule = "rank" }'))
    assert ranked.fidelity == FidelityConfig(first_stage=6, growth=2.0, confidence=0.95, rule="rank")
    shared = load_study(staged_study(tmp_path, llama_family, trials=2,
                                     fidelity='fidelity = { first_stage = 6, rule = "rank", promote = 0.2 }'))
    assert shared.fidelity is not None and shared.fidelity.promote == 0.2
    bad = {
        "fidelity = { first_stage = 1 }": "study.fidelity.first_stage: must be >= 2, got 1",
        "fidelity = { growth = 2.0 }": "study.fidelity.first_stage: required",
        "fidelity = { first_stage = 4, growth = 1.0 }": "study.fidelity.growth: must be > 1",
        "fidelity = { first_stage = 4, confidence = 1.0 }": "study.fidelity.confidence: must be in (0.5, 1)",
        "fidelity = { first = 4 }": "study.fidelity.first: unknown key",
        'fidelity = { first_stage = 4, rule = "asha" }': "study.fidelity.rule: must be one of 'test', 'rank', got 'asha'",
        "fidelity = { first_stage = 4, rule = 1 }": "study.fidelity.rule: expected a string",
        "fidelity = { first_stage = 4, promote = 0.2 }": "study.fidelity.promote: is the rank rule's share",
        'fidelity = { first_stage = 4, rule = "rank", promote = 1.5 }': "study.fidelity.promote: must be in (0, 1)",
        "fidelity = 4": "study.fidelity: expected a table",
    }
    for text, message in bad.items():
        with pytest.raises(StudyConfigError, match=rf"study\.toml: {__import__('re').escape(message)}"):
            load_study(staged_study(tmp_path, llama_family, trials=2, fidelity=text))
    with pytest.raises(StudyConfigError, match=r"study\.fidelity\.first_stage: tasks\[0\] \('alpha'\) uses metric "
                                               r"perplexity"):
        load_study(staged_study(tmp_path, llama_family, trials=2, metric="perplexity"))


# -- stage slices and stored rows ----------------------------------------------------------


@pytest.mark.parametrize("metric", ["loglik", "exact_match"])
def test_a_stage_scores_its_rows_as_the_whole_slice_scores_them(
    tmp_path: Path, llama_family: TinyFamily, metric: str
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fitness.scoring import score_slice_rows
    from fitness.select import select_rows
    from fitness.slices import load_task

    config = load_study(write_study(tmp_path, llama_family, trials=0, metric=metric))
    data = load_task(config.tasks[0], AutoTokenizer.from_pretrained(config.models.base), batch_size=4).search
    model = AutoModelForCausalLM.from_pretrained(llama_family.sources[0]).eval()
    _, every, _ = score_slice_rows(model, data)
    for rows in ([5, 0, 7], [11], list(range(12))[::-1]):
        _, some, _ = score_slice_rows(model, select_rows(data, rows))
        np.testing.assert_allclose(some, [every[i] for i in rows], rtol=1e-6, atol=1e-9)


def test_prefix_rows_are_stored_apart_from_full_rows() -> None:
    text = encode_prefix([1.0, 0.0, 1.0], 12)
    values, of = decode_rows_prefix(text)
    assert values.tolist() == [1.0, 0.0, 1.0] and of == 12
    assert decode_rows_prefix(encode_rows([0.5, 2.0]))[1] is None
    with pytest.raises(SearchError):
        encode_prefix([1.0] * 13, 12)
    stopped = optuna.trial.create_trial(value=1.0, state=TrialState.PRUNED,
                                        system_attrs={"rows_search": {"a": text}})
    assert trial_rows(stopped, {}) is None  # no paired comparison over every row with it
    assert trial_prefix_rows(stopped)["a"].tolist() == [1.0, 0.0, 1.0]  # type: ignore[index]



def test_stage_peers_are_each_finished_trial_s_own_rows_decoded_once() -> None:
    from fitness.fidelity import study_row_order
    from search.staged import stages_of

    task_rows = {"a": 6, "b": 6}
    stages = stages_of(FidelityConfig(first_stage=4, growth=2.0, rule="rank"), study_row_order(task_rows, 3),
                       task_rows)
    rng = np.random.default_rng(0)
    full = {task: rng.random(6) for task in task_rows}  # file order
    prefixes = [{task: rng.random(3) for task in task_rows} for _ in range(2)]  # study order, same lengths

    def finished(state: TrialState, rows: dict[str, str]) -> optuna.trial.FrozenTrial:
        return optuna.trial.create_trial(state=state, value=None if state == TrialState.PRUNED else 0.5,
                                         user_attrs={"kind": "search"}, system_attrs={"rows_search": rows})

    trials = [finished(TrialState.COMPLETE, {t: encode_rows(v) for t, v in full.items()})] + [
        finished(TrialState.PRUNED, {t: encode_prefix(v.tolist(), 6) for t, v in rows.items()}) for rows in prefixes]
    held = {"a": 2, "b": 3}
    expected = [{t: stages.in_study_order(full)[t][:n] for t, n in held.items()}] + [
        {t: rows[t][:n] for t, n in held.items()} for rows in prefixes]
    for _ in range(2):  # decoded, then from the decoded texts
        peers = stages.stage_peer_rows(trials, held)
        assert [{t: v.tolist() for t, v in p.items()} for p in peers] == [
            {t: v.tolist() for t, v in p.items()} for p in expected]
    # a stopped trial's prefix is the decoded array itself, shared by every later decision: read-only
    assert all(not v.flags.writeable for p in peers[1:] for v in p.values())

# -- the loop -------------------------------------------------------------------------------


def test_a_staged_study_stops_some_trials_and_never_shows_them_as_best(
    tmp_path: Path, llama_family: TinyFamily
) -> None:
    path = staged_study(tmp_path, llama_family, trials=8)
    result = run_study(load_study(path), quiet=True)
    assert result.done == 8 and result.finalized is not None
    study = stored_study(path)
    assert study.user_attrs[FIDELITY_ATTR]["stages"] == [4, 8, 16, 24]
    searched = search_trials(study)
    states = {t.state for t in searched}
    assert states == {TrialState.COMPLETE, TrialState.PRUNED}  # this seed stops some, keeps others
    for trial in searched:
        record = trial.user_attrs[FIDELITY_ATTR]
        if trial.state == TrialState.PRUNED:
            assert record["stopped"] and record["stage"] < record["stages"] == 4
            prefix = trial_prefix_rows(trial)
            assert prefix is not None and {t: len(v) for t, v in prefix.items()} == record["rows"]
            assert sum(record["rows"].values()) == [4, 8, 16][record["stage"] - 1]
            assert record["estimate"] == {t: pytest.approx(float(np.mean(v))) for t, v in prefix.items()}
            assert trial.values == pytest.approx(record["objective"])  # its value: the estimate
            assert trial_rows(trial, {}) is None and "scores_search" not in trial.user_attrs
            assert "constraints" in trial.system_attrs
        else:
            rows = trial_rows(trial, {})
            assert rows is not None and all(len(v) == 12 for v in rows.values())
            assert record == {"stage": 4, "stages": 4, "rows": {"alpha": 12, "beta": 12}}
            for task, values in rows.items():  # the score is the mean of every row
                assert trial.user_attrs["scores_search"][task] == pytest.approx(float(np.mean(values)), rel=1e-12)
    directions = [d.name.lower() for d in study.directions]
    chosen = ranking.chosen_trial(study.get_trials(), study.user_attrs, directions)
    assert chosen is not None and chosen.state == TrialState.COMPLETE
    assert all(t.state == TrialState.COMPLETE for t in ranking.ranked(study.get_trials(), directions))
    status = render_status(study)
    stopped = sum(t.state == TrialState.PRUNED for t in searched)
    assert f"{stopped} stopped early" in status
    after = [sum(t.user_attrs[FIDELITY_ATTR]["stage"] == s for t in searched if t.state == TrialState.PRUNED)
             for s in (1, 2, 3)]
    assert (f"stages: 4, 8, 16, 24 search rows; stopped after each: {', '.join(map(str, after))}; "
            f"scored on every row: {len(searched) - stopped}") in status.splitlines()
    config = load_study(path)
    assert render_status(sqlite_trials.read_study(config.storage, config.name)) == status  # status's own read
    # throughput and the median trial's work count the stopped trials (they are most of a staged study)
    assert "(8 finished in " in status and f"per trial (trials stopped early among them: {stopped})" in status
    assert_report_marks_stopped(study, {"alpha": True, "beta": True})  # the report's count and marks
    first_stopped = next(t.number for t in searched if t.state == TrialState.PRUNED)
    recipe = tmp_path / "stopped.yaml"
    assert main(["export", str(path), "-o", str(recipe), "--trial", str(first_stopped)]) == 2  # no release
    assert not recipe.exists()

    # What samplers see: TPE the stored PRUNED trial, the others the estimate as a complete one.
    stopped = [t for t in searched if t.state == TrialState.PRUNED]
    shown = visible_trials(study.get_trials(), position=None, horizon=None, directions=None,
                           stopped_as_complete=True)
    for trial in shown:
        if trial.number in {t.number for t in stopped}:
            assert trial.state == TrialState.COMPLETE
            assert trial.values == trial.user_attrs[FIDELITY_ATTR]["objective"]
    as_stored = visible_trials(study.get_trials(), position=None, horizon=None, directions=None)
    assert sum(t.state == TrialState.PRUNED for t in as_stored) == len(stopped)

    # a resumed run must keep the row order its trials were scored in
    study.set_user_attr(FIDELITY_ATTR, {**study.user_attrs[FIDELITY_ATTR], "order_sha256": "0" * 64})
    with pytest.raises(SearchError, match="another row order"):
        run_study(load_study(path, trials=9), quiet=True)


def test_a_gate_failed_at_the_first_stage_stops_the_trial_there(tmp_path: Path, llama_family: TinyFamily) -> None:
    # log-likelihoods are negative: no trial can reach 0
    path = staged_study(tmp_path, llama_family, trials=3, gates={"alpha": "{ min = 0.0 }"})
    run_study(load_study(path), quiet=True)
    for trial in search_trials(stored_study(path)):
        record = trial.user_attrs[FIDELITY_ATTR]
        assert trial.state == TrialState.PRUNED and record["stage"] == 1
        assert record["stopped"].startswith("gate alpha.min failed with 95% confidence")
        assert max(trial.system_attrs["constraints"]) > 0  # estimated, as the dashboard reads them


def test_cmaes_generations_fill_with_stopped_members(tmp_path: Path, llama_family: TinyFamily) -> None:
    # with the rank rule (the schedule the README recommends for CMA-ES)
    path = staged_study(tmp_path, llama_family, trials=12, sampler="cmaes", population=4,
                        fidelity='fidelity = { first_stage = 4, growth = 2.0, rule = "rank" }')
    result = run_study(load_study(path), quiet=True, finalize_after=False)
    assert result.done == 12
    study = stored_study(path)
    assert study.user_attrs[FIDELITY_ATTR]["rule"] == "rank"
    searched = search_trials(study)
    generations = [t.system_attrs["cma:generation"] for t in searched]
    assert sorted(generations) == [0] * 4 + [1] * 4 + [2] * 4  # each generation told whole
    assert any("rule rank" in t.user_attrs[FIDELITY_ATTR].get("stopped", "") for t in searched)
    for trial in searched:  # every promotion is stored (a re-run after a kill does not decide it again)
        stage = trial.user_attrs[FIDELITY_ATTR]["stage"]
        last_promoted = stage - 1 if trial.state == TrialState.PRUNED else 3
        assert trial.system_attrs.get(PROMOTED_ATTR, 0) == last_promoted



def test_the_inline_pool_runs_a_promoted_trial_s_next_stage_next_on_the_merge_it_holds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # CMA-ES queues a generation whole. A trial promoted after its stage goes on at once (depth
    # first): the model still holds its merge, and the trials queued behind it are decided with
    # it finished (queued behind them, no member of a first generation had a finished peer).
    import search.pool as pool_module
    from search.worker import TrialOutcome, WorkerSetup

    runs: list[tuple[str, list[int], bool]] = []  # recipe, rows, merged for it

    class Worker:
        def __init__(self, setup: WorkerSetup) -> None:
            self.merged: dict | None = None

        def evaluate(self, recipe: dict, split: str = "search", rows: dict | None = None) -> TrialOutcome:
            merge = rows is None or recipe != self.merged
            self.merged = recipe if rows is not None else None
            runs.append((recipe["name"], list((rows or {}).get("t", [])), merge))
            return TrialOutcome({"t": 1.0}, 0.0, 0.0, rows={"t": tuple(float(r) for r in (rows or {}).get("t", []))})

    monkeypatch.setattr(pool_module, "TrialWorker", Worker)
    monkeypatch.setattr(pool_module, "check_local_memory", lambda setup: SimpleNamespace(plan="resident"))
    pool = pool_module.InlinePool(WorkerSetup("base", (), (), "cpu", "float32", 1))
    a, b, c = {"name": "a"}, {"name": "b"}, {"name": "c"}
    pool.submit(0, a, rows={"t": [0, 1]})
    pool.submit(1, b, rows={"t": [0, 1]})
    pool.submit(2, c, rows={"t": [0, 1]})
    assert [ticket for ticket, _ in pool.wait()] == [0]
    pool.submit(0, a, rows={"t": [2, 3]})  # promoted: runs before trials 1 and 2
    out = pool.wait()
    assert [ticket for ticket, _ in out] == [0] and out[0][1].rows == {"t": (2.0, 3.0)}
    assert [ticket for ticket, _ in pool.wait()] == [1]  # trial 0 finished (stopped): the next trial
    pool.submit(3, a)  # every row (baselines, finalize): queued at the back like any new trial
    pool.submit(1, b, rows={"t": [2, 3]})  # trial 1 promoted: before both
    told = [pool.wait() for _ in range(3)]
    assert [[ticket for ticket, _ in o] for o in told] == [[1], [2], [3]]
    assert runs == [("a", [0, 1], True), ("a", [2, 3], False), ("b", [0, 1], True), ("b", [2, 3], False),
                    ("c", [0, 1], True), ("a", [], True)]
    assert pool.wait() == []


def test_per_task_studies_stop_dominated_trials(tmp_path: Path, llama_family: TinyFamily) -> None:
    path = staged_study(tmp_path, llama_family, trials=6, sampler="nsga2", objective="per_task", population=4)
    result = run_study(load_study(path), quiet=True, finalize_after=False)
    assert result.done == 6
    for trial in search_trials(stored_study(path)):
        assert trial.state in (TrialState.COMPLETE, TrialState.PRUNED)
        if trial.state == TrialState.PRUNED:  # Optuna keeps no values for a pruned multi-objective trial
            assert trial.values is None and len(trial.user_attrs[FIDELITY_ATTR]["objective"]) == 2
            assert "dominated" in trial.user_attrs[FIDELITY_ATTR]["stopped"]


# -- resume ----------------------------------------------------------------------------------


def noisy_killing_scorer(model: torch.nn.Module, batch: object, examples: Sequence[object]) -> list[float]:
    """A value per row that differs between recipes and rows (so stages promote), logs how many
    search rows it scored, and SIGKILLs its process at call $KILL_AT_CALL."""
    weight = float(model.lm_head.weight[0, 0])
    log = os.environ.get("SCORED_LOG")
    if log and any("search" in str(e.file) for e in examples):  # type: ignore[attr-defined]
        with open(log, "a") as f:
            f.write(json.dumps(len(examples)) + "\n")
    count_call_and_kill_at()
    return [weight + random.Random(f"{weight:.12f}:{e.row}").uniform(-10, 10) for e in examples]  # type: ignore[attr-defined]


@pytest.mark.slow
def test_a_study_killed_mid_stage_resumes_with_the_same_rows_and_scores_none_twice(
    tmp_path: Path, llama_family: TinyFamily, monkeypatch: pytest.MonkeyPatch
) -> None:
    metric = "tests.test_fidelity_search:noisy_killing_scorer"
    paths = {}
    for name in ("plain", "killed"):  # the rank rule: its decisions depend on what was told before
        (tmp_path / name).mkdir()
        paths[name] = staged_study(tmp_path / name, llama_family, trials=3, metric=metric,
                                   fidelity='fidelity = { first_stage = 4, growth = 2.0, rule = "rank" }')
    run_study(load_study(paths["plain"]), quiet=True, finalize_after=False)

    # 4 baselines x 2 tasks = 8 calls (batches of 16: one per task), then the first search
    # trial's stage 1 (2 rows of each task): calls 9-10; call 11 is its stage 2.
    proc = cli("start", str(paths["killed"]), "--quiet",
               env={"KILL_COUNTER_FILE": str(tmp_path / "calls"), "KILL_AT_CALL": "11"})
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err
    lost = next(t for t in search_trials(stored_study(paths["killed"])) if t.state == TrialState.RUNNING)
    held = trial_prefix_rows(lost)
    assert held is not None and {t: len(v) for t, v in held.items()} == {"alpha": 2, "beta": 2}
    assert lost.system_attrs[PROMOTED_ATTR] == 1  # stage 1 decided and stored: the re-run takes it over

    monkeypatch.setenv("SCORED_LOG", str(tmp_path / "scored.jsonl"))
    result = run_study(load_study(paths["killed"]), quiet=True, finalize_after=False)
    assert result.done == 3
    study = stored_study(paths["killed"])
    rerun = next(t for t in search_trials(study) if t.user_attrs.get("rerun_of") == lost.number)
    assert rerun.user_attrs[FIDELITY_ATTR]["carried"] == {"alpha": 2, "beta": 2}
    # Rows scored by the resumed run: exactly what its trials hold beyond the rows carried over.
    scored = sum(json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().split())
    finished = [t for t in search_trials(study) if ranking.counts_toward_budget(t)]
    held_rows = sum(sum(t.user_attrs[FIDELITY_ATTR]["rows"].values()) for t in finished)
    assert scored == held_rows - 4

    # ...and the study ends as one never interrupted: same states, values and rows per position
    def by_position(path: Path) -> dict[int, tuple[object, ...]]:
        out: dict[int, tuple[object, ...]] = {}
        for trial in search_trials(stored_study(path)):
            if ranking.counts_toward_budget(trial):
                rows = trial_rows(trial, {}) or trial_prefix_rows(trial) or {}
                out[trial.user_attrs[POSITION]] = (trial.state, trial.values, trial.params,
                                                   {t: v.tolist() for t, v in rows.items()})
        return out

    assert by_position(paths["killed"]) == by_position(paths["plain"])


@pytest.mark.slow
@pytest.mark.ray
def test_stages_run_on_the_ray_pool(tmp_path: Path, llama_family: TinyFamily) -> None:
    from dataclasses import replace

    from search.plan import worker_setup
    from search.ray_pool import RayPool

    config = load_study(staged_study(tmp_path, llama_family, trials=6, sampler="tpe"))
    pool = RayPool(worker_setup(config), replace(config.execution, backend="ray", workers=2, cpus_per_worker=1))
    try:
        result = run_study(config, quiet=True, pool=pool, finalize_after=False)
    finally:
        pool.close()
    assert result.done == 6
    for trial in search_trials(stored_study(config.path)):
        record = trial.user_attrs[FIDELITY_ATTR]
        assert trial.state == (TrialState.COMPLETE if record["stage"] == 4 else TrialState.PRUNED)
        held = trial_rows(trial, {}) or trial_prefix_rows(trial)
        assert held is not None and {t: len(v) for t, v in held.items()} == record["rows"]
