"""search.gate_record: the study's gates stored once as data, each trial's gates by name.

Round trips go through a real SQLite storage (JSON on disk). A real tiny study is then
resumed with its gate measured against another source: status, report and export must
show the limits stored, not a limit recovered as score - margin from some trial. A study
stored by an older version (gate names only, ``gate_margins`` on trials) must still open.
"""

from __future__ import annotations

import io
import math
from contextlib import redirect_stdout
from pathlib import Path

import optuna
import pytest
from hypothesis import given
from hypothesis import strategies as st
from optuna.trial import TrialState

from fitness.gates import GateResult, GateSpec, evaluate_gates, gate_limits
from search import gate_record, ranking
from search.annotate import best_note, chosen_trial
from search.cli import main
from search.commands.status import render_status
from search.config import load_study
from search.gate_record import (
    NOT_STORED,
    NOT_YET,
    TRIAL_NOT_STORED,
    TrialGate,
    read_study_gates,
    read_trial_gates,
    store_study_gates,
    trial_gate_attrs,
)
from search.report import build_report, read_study, task_scores_figure
from search.report import gate_limits as report_gate_limits
from search.storage import resolve_storage
from tests.checkpoints import TinyFamily
from tests.studies import run, write_study

optuna.logging.set_verbosity(optuna.logging.WARNING)

SOURCES = {"shipper": {"acc": 0.80, "ppl": 12.0}, "refunder": {"acc": 0.60, "ppl": 9.0}}
DIRECTIONS = {"acc": True, "ppl": False}
SPECS = [GateSpec("acc", min=0.7, max_regression=0.1), GateSpec("ppl", max_regression=1.0, against="shipper")]


def sqlite_study(tmp_path: Path, name: str = "s") -> tuple[str, optuna.Study]:
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    return url, optuna.create_study(study_name=name, storage=url)


def test_study_gates_round_trip_through_a_real_storage(tmp_path: Path) -> None:
    url, study = sqlite_study(tmp_path)
    limits = gate_limits(SPECS, SOURCES, DIRECTIONS)
    store_study_gates(study, limits)
    stored = read_study_gates(optuna.load_study(study_name="s", storage=url).user_attrs)
    assert stored.limits == limits and stored.missing == ""
    assert stored.names == ["acc.min", "acc.max_regression", "ppl.max_regression"]
    ppl = stored.limit("ppl.max_regression")
    assert ppl is not None and (ppl.reference, ppl.reference_score, ppl.limit) == ("shipper", 12.0, 13.0)
    assert not ppl.higher_is_better
    assert gate_record.describe_limit(ppl) == "ppl.max_regression: score <= 13.0000 (source shipper 12.0000 + 1)"


def test_each_trial_stores_its_gates_by_name(tmp_path: Path) -> None:
    url, study = sqlite_study(tmp_path)
    results = evaluate_gates(SPECS, {"acc": 0.65, "ppl": 12.5}, SOURCES, DIRECTIONS)
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.COMPLETE, value=0.5, user_attrs=trial_gate_attrs(results),
        system_attrs={"constraints": gate_record.constraints(results)},
    ))
    (trial,) = optuna.load_study(study_name="s", storage=url).get_trials()
    assert trial.user_attrs["gates"] == {
        "acc.min": {"score": 0.65, "limit": 0.7, "margin": pytest.approx(-0.05), "passed": False},
        "acc.max_regression": {"score": 0.65, "limit": pytest.approx(0.7), "margin": pytest.approx(-0.05),
                               "passed": False},
        "ppl.max_regression": {"score": 12.5, "limit": 13.0, "margin": 0.5, "passed": True},
    }
    assert read_trial_gates(trial.user_attrs) == [
        TrialGate(r.name, r.margin, r.passed, r.score, r.limit) for r in results
    ]
    # Optuna's unnamed list, in the same order, still decides feasibility.
    assert trial.system_attrs["constraints"] == [r.constraint for r in results]
    assert trial.user_attrs["feasible"] is False is ranking.is_feasible(trial)
    assert trial.user_attrs["gate_status"] == (
        "infeasible: acc.min fails by 0.05 (0.6500 < 0.7000); acc.max_regression fails by 0.05 (0.6500 < 0.7000); "
        "ppl.max_regression passes by 0.5 (12.5000 <= 13.0000)"
    )


def test_what_blocks_reads_each_trials_gates_by_name(tmp_path: Path) -> None:
    """A trial stored while the gates were in another order: its unnamed list would blame the wrong gate."""
    _, study = sqlite_study(tmp_path)
    earlier = [GateSpec("ppl", min=10.0), GateSpec("acc", min=0.7)]  # gates as a previous run ordered them
    results = evaluate_gates(earlier, {"acc": 0.69, "ppl": 14.0}, SOURCES, DIRECTIONS)
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.COMPLETE, value=0.5, user_attrs={"scores_search": {}, **trial_gate_attrs(results)},
        system_attrs={"constraints": gate_record.constraints(results)},
    ))
    blocker = ranking.what_blocks(study.get_trials(), ["acc.min", "ppl.min"])
    assert blocker is not None
    assert (blocker.gate, blocker.shortfall) == ("ppl.min", 4.0)
    assert blocker.trial_shortfalls == {"acc.min": pytest.approx(0.01), "ppl.min": 4.0}


_margin = st.floats(-5, 5, allow_nan=False).map(lambda m: m if m else 0.0)


@given(st.lists(st.tuples(st.floats(-5, 5, allow_nan=False), _margin, st.booleans()), max_size=4))
def test_gate_status_names_every_failed_gate_with_its_margin_and_limit(rows: list[tuple[float, float, bool]]) -> None:
    results = []
    for index, (limit, margin, higher) in enumerate(rows):
        score = limit + margin if higher else limit - margin
        results.append(GateResult(f"t{index}.min", -margin if margin else 0.0, margin, margin >= 0, score, limit,
                                  higher))
    status = trial_gate_attrs(results)["gate_status"]
    assert status.startswith("infeasible: " if any(not r.passed for r in results) else "feasible: ")
    for result in results:
        verdict = "passes" if result.passed else "fails"
        assert f"{result.name} {verdict} by {abs(result.margin):.4g} ({result.score:.4f} " in status
        assert f"{result.limit:.4f})" in status
    failed = [r.name for r in results if not r.passed]
    assert [p.split(" ")[0] for p in status.split(": ", 1)[1].split("; ")][: len(failed)] == failed


def test_older_formats_are_read_and_say_what_is_missing() -> None:
    older = read_study_gates({"gates": ["acc.min", "ppl.max_regression"]})
    assert (older.names, older.limits, older.missing) == (["acc.min", "ppl.max_regression"], None, NOT_STORED)
    assert read_study_gates({}).missing == NOT_YET
    assert read_study_gates({"gates": []}).limits == []  # a study without gates stores none
    assert read_trial_gates({"gate_margins": {"acc.min": -0.25}}) == [TrialGate("acc.min", -0.25, False)]
    assert gate_record.describe(TrialGate("acc.min", -0.25, False)) == "acc.min fails by 0.25"
    assert read_trial_gates({}) == []


# -- a real study whose gate changed between runs ---------------------------------------------


def gate_against(source: str) -> dict[str, str]:
    return {"alpha": f'{{ max_regression = 1.5, against = "{source}" }}'}


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory, llama_family: TinyFamily) -> tuple[Path, optuna.Study]:
    """Three trials gated against source s0, then the same study resumed with the gate against s1
    (gates may change on resume; no new trial: every trial keeps the limit it was checked against)."""
    folder = tmp_path_factory.mktemp("resumed")
    run(write_study(folder, llama_family, trials=3, gates=gate_against("s0")))
    return folder / "study.toml", run(write_study(folder, llama_family, trials=3, gates=gate_against("s1")))[1]


def source_score(study: optuna.Study, label: str) -> float:
    return float(ranking.baseline_trials(study.get_trials())[f"source:{label}"].user_attrs["scores_search"]["alpha"])


def test_the_study_stores_the_limit_of_its_latest_gates(resumed: tuple[Path, optuna.Study]) -> None:
    _, study = resumed
    (limit,) = read_study_gates(study.user_attrs).limits or []
    assert (limit.name, limit.kind, limit.setting, limit.reference) == ("alpha.max_regression", "max_regression",
                                                                        1.5, "s1")
    assert limit.reference_score == source_score(study, "s1")
    assert limit.limit == pytest.approx(source_score(study, "s1") - 1.5, abs=1e-12)
    # Every trial kept the limit of the run that scored it (against s0).
    for trial in ranking.search_trials(study.get_trials()):
        (gate,) = read_trial_gates(trial.user_attrs)
        assert gate.limit == pytest.approx(source_score(study, "s0") - 1.5, abs=1e-12)


def test_status_report_and_export_show_the_stored_limits(resumed: tuple[Path, optuna.Study], tmp_path: Path) -> None:
    path, study = resumed
    (stored,) = read_study_gates(study.user_attrs).limits or []
    chosen = chosen_trial(study)
    assert chosen is not None
    (own,) = read_trial_gates(chosen.user_attrs)
    recovered = float(chosen.user_attrs["scores_search"]["alpha"]) - own.margin  # score - margin
    assert not math.isclose(recovered, stored.limit, abs_tol=1e-4), "the sources should score apart"
    # status: the study's gates with the stored limit and its reference
    text = render_status(study)
    assert f"alpha.max_regression: score >= {stored.limit:.4f} (source s1 {stored.reference_score:.4f} - 1.5)" in text
    assert f"{recovered:.4f}" not in text.split("\n\n")[0]
    # report: the dashed line is the stored limit; the chosen trial's row its own
    view = read_study(study, {"alpha": True, "beta": True})
    assert report_gate_limits(view) == [stored]
    figure = task_scores_figure(view)
    assert [shape.y0 for shape in figure.figure.layout.shapes] == [stored.limit]
    page = build_report(study, task_higher=view.task_higher)
    assert f"&gt;= {own.limit:.4f}</td>" in page  # checked against s0's limit, so no s1 reference
    # export header and the note: the limit this trial was checked against, as stored on it
    out = tmp_path / "recipe.yaml"
    assert main(["export", str(path), "-o", str(out)]) == 0
    assert f"alpha.max_regression passed ({own.margin:+.4f}; {gate_record.comparison(own)})" in out.read_text()
    assert f"| `alpha.max_regression` | {own.margin:+.4f} |" in best_note(study, chosen)
    assert gate_record.comparison(own) in best_note(study, chosen)


def test_a_study_from_an_older_version_still_opens(resumed: tuple[Path, optuna.Study], tmp_path: Path) -> None:
    """The same trials stored the older way: gate names on the study, ``gate_margins`` on trials."""
    path, study = resumed
    old_path = path.with_name("old.toml")
    old_path.write_text(path.read_text().replace('name = "tiny"', 'name = "old"', 1))
    storage_url = resolve_storage(load_study(path).storage)  # the copy lives beside the study
    old = optuna.create_study(study_name="old", storage=storage_url, directions=study.directions)
    for key, value in study.user_attrs.items():
        old.set_user_attr(key, ["alpha.max_regression"] if key == "gates" else value)
    for trial in study.get_trials():
        attrs = {k: v for k, v in trial.user_attrs.items() if k != "gates"}
        if "gates" in trial.user_attrs:
            attrs["gate_margins"] = {n: g["margin"] for n, g in trial.user_attrs["gates"].items()}
        old.add_trial(optuna.trial.create_trial(
            state=trial.state, values=trial.values, params=trial.params, distributions=trial.distributions,
            user_attrs=attrs, system_attrs={k: v for k, v in trial.system_attrs.items() if k == "constraints"},
        ))
    stdout = io.StringIO()
    with redirect_stdout(stdout):
        assert main(["status", str(old_path)]) == 0
    assert f"gates: alpha.max_regression: {NOT_STORED}" in stdout.getvalue()
    assert "alpha.max_regression ok +" in stdout.getvalue()
    out = tmp_path / "old.yaml"
    assert main(["export", str(old_path), "-o", str(out)]) == 0
    assert TRIAL_NOT_STORED in out.read_text()
    report = tmp_path / "old.html"
    assert main(["report", str(old_path), "-o", str(report)]) == 0
    assert NOT_STORED in report.read_text() and TRIAL_NOT_STORED in report.read_text()
    reloaded = optuna.load_study(study_name="old", storage=storage_url)
    chosen = chosen_trial(reloaded)
    assert chosen is not None and "not stored (older version)" in best_note(reloaded, chosen)
