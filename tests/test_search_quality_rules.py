"""benchmarks/search_quality.py: which trial each --screen-rules finalize rule picks (constructed rows), the B
cut of a kept study, and the --population driver."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from benchmarks.search_quality import (
    DEMO_STUDY,
    POPULATION_PATCH,
    ROOT,
    SignedObjective,
    candidate_patches,
    sampler_label,
    screen_choice,
    start_entry,
)
from search import confidence


def _rows(rng: np.random.Generator, p: float, n: int = 200) -> list[float]:
    return (rng.random(n) < p).astype(float).tolist()


def test_each_rule_picks_by_its_own_rows() -> None:
    rng = np.random.default_rng(0)
    rule = confidence.ObjectiveRule("min", ("a", "b"), {"a": True, "b": True}, None, {})
    objective = SignedObjective(rule)
    # 0: best on search; 1: best on held-out by a little (within noise); 2: best on both together;
    # 3: best on test only
    chances = [(0.95, 0.70, 0.7), (0.70, 0.85, 0.7), (0.90, 0.84, 0.7), (0.60, 0.60, 0.95)]
    trials = [{"number": i, "search": {t: _rows(rng, s) for t in "ab"}, "heldout": {t: _rows(rng, h) for t in "ab"},
               "test": {t: _rows(rng, x) for t in "ab"}} for i, (s, h, x) in enumerate(chances)]
    screened = {"n_search": 4, "trials": trials}
    assert objective.of({"a": [1.0, 0.0], "b": [0.0, 0.0]}) == 0.0  # min over tasks of the means
    assert screen_choice(screened, "heldout", 4, objective)["number"] == 1
    assert screen_choice(screened, "pooled", 4, objective)["number"] == 2
    assert screen_choice(screened, "oracle", 4, objective)["number"] == 3
    assert screen_choice(screened, "oracle", 2, objective)["number"] in (0, 1)  # only the best k count
    # the shipped rule: trial 1 is better on held-out by more than noise than trial 0 (the best on search)
    assert screen_choice(screened, "current", 2, objective)["number"] == 1
    tied = {"n_search": 2, "trials": [trials[0], {**trials[0], "number": 9}]}
    assert screen_choice(tied, "current", 2, objective)["number"] == 0  # a tie keeps the best on search
    # pooled_gated: the shipped rule on search + held-out rows: trial 2 is better there by more than noise
    assert screen_choice(screened, "pooled_gated", 4, objective)["number"] == 2
    assert screen_choice(screened, "pooled_gated", 2, objective)["number"] == 0  # trial 1 is worse pooled
    # one more right answer per task is better pooled but within noise: pooled takes it, gated does not
    held = {t: list(v) for t, v in trials[0]["heldout"].items()}
    for values in held.values():
        values[values.index(0.0)] = 1.0
    nudged = {"n_search": 2, "trials": [trials[0], {**trials[0], "number": 9, "heldout": held}]}
    assert screen_choice(nudged, "pooled", 2, objective)["number"] == 9
    assert screen_choice(nudged, "pooled_gated", 2, objective)["number"] == 0


def test_truncate_search_keeps_the_first_positions_and_their_records_only(tmp_path) -> None:
    import optuna
    import pytest

    from benchmarks.search_quality import truncate_search
    from search.samplers import POSITION

    database = tmp_path / "study.db"
    study = optuna.create_study(storage=f"sqlite:///{database}", study_name="s")
    study.set_user_attr("run", {"budget": 4, "started": "then"})
    study.add_trial(optuna.trial.create_trial(value=0.5, user_attrs={"kind": "baseline"}))  # trial 0: no position
    for position in range(4):  # trials 1-4
        study.add_trial(optuna.trial.create_trial(
            params={"x": position / 4}, distributions={"x": optuna.distributions.FloatDistribution(0, 1)},
            value=position / 4, user_attrs={"kind": "search", POSITION: position}))
    for number in range(5):
        study.set_user_attr(f"heldout:{number}", {"n": number})
    study.set_user_attr("test:4", {"n": 4})
    truncate_search(database, 2)
    cut = optuna.load_study(study_name="s", storage=f"sqlite:///{database}")
    assert [(t.number, t.user_attrs.get(POSITION)) for t in cut.trials] == [(0, None), (1, 0), (2, 1)]
    assert [t.params for t in cut.trials[1:]] == [{"x": 0.0}, {"x": 0.25}]
    assert sorted(k for k in cut.user_attrs if ":" in k) == ["heldout:0", "heldout:1", "heldout:2"]
    assert cut.user_attrs["run"] == {"budget": 2, "started": "then"}
    # a study whose cut-off positions are not its last trials (a run re-ran one) is refused
    study.add_trial(optuna.trial.create_trial(value=0.1, user_attrs={"kind": "search", POSITION: 0}))
    with pytest.raises(SystemExit, match="not the study's last trials"):
        truncate_search(database, 1)


def test_population_driver_overrides_the_study_file_in_start_and_config() -> None:
    code = ("import sys; " + POPULATION_PATCH.format(population=12)
            + "print(start.load_study(sys.argv[1]).population, config.load_study(sys.argv[1]).population)")
    shown = subprocess.run([sys.executable, "-c", code, str(DEMO_STUDY)], capture_output=True, text=True,
                           check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": ""}).stdout.split()
    assert shown == ["12", "12"]  # the demo file says 16
    assert start_entry(False, None) == ["-m", "search.cli"]
    entry = start_entry(True, 16)
    assert entry[0] == "-c" and "CMA_LR_ADAPT = True" in entry[1] and "population=16" in entry[1]
    assert sampler_label("cmaes", False, 16) == "cmaes+pop16"
    assert sampler_label("cmaes", True, None) == "cmaes+lr_adapt"
    entry = start_entry(False, None, 0.25)  # --cma-sigma0 0.25
    assert entry[0] == "-c" and "samplers.CMA_SIGMA0 = 0.25;" in entry[1] and "CMA_LR_ADAPT" not in entry[1]
    assert sampler_label("cmaes", False, None, 0.25) == "cmaes+sigma0=0.25"
    code = "import sys; " + candidate_patches(True, None, 0.25) + "print(samplers.CMA_SIGMA0, samplers.CMA_LR_ADAPT)"
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                           env={"PYTHONPATH": str(ROOT), "PATH": ""}).stdout.split()
    assert shown == ["0.25", "True"]  # what --refinalize's driver runs too
