"""Per-row results (search.records) and the intervals made from them (search.confidence).

Real small studies on the tiny Llama family (inline pool, real SQLite storage): every
scored trial keeps one value per row per task whose mean is its stored task score, the
study stores which rows once, and finalize, status, the report and the chosen trial's
note show held-out intervals, the gain over the best baseline and the search - held-out gap.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fitness.intervals import Interval
from search import confidence, ranking, storage
from search.commands.status import render_status
from search.errors import SearchError
from search.finalize import FinalistRow, _choose
from search.records import (
    EXAMPLE_ROWS_ATTR,
    ROWS_SEARCH_ATTR,
    decode_rows,
    encode_rows,
    expand_row_ids,
    row_ids,
    trial_rows,
)
from tests.checkpoints import TinyFamily
from tests.studies import ROWS, TASKS, run, write_study

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def loglik_study(tmp_path_factory: pytest.TempPathFactory, llama_family: TinyFamily) -> optuna.Study:
    folder = tmp_path_factory.mktemp("loglik")
    _, study = run(write_study(folder, llama_family, trials=4, top_k=3, metric="loglik"))
    return study


def _scored(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials() if ranking.is_scored(t)]


def test_every_scored_trial_keeps_rows_whose_mean_is_its_score(loglik_study: optuna.Study) -> None:
    attrs = loglik_study.user_attrs
    scored = _scored(loglik_study)
    assert len(ranking.baseline_trials(scored)) >= 3 and len(ranking.search_trials(scored)) == 4
    for trial in scored:
        rows = trial_rows(trial, attrs, "search")
        assert rows is not None and set(rows) == set(TASKS), trial.number
        for task in TASKS:
            assert len(rows[task]) == ROWS
            # float rows: the same float64 values torch averaged (summation order may differ)
            assert float(np.mean(rows[task])) == pytest.approx(trial.user_attrs["scores_search"][task],
                                                               rel=1e-12, abs=1e-12)
    held = [t for t in scored if storage.heldout_record(attrs, t.number) is not None]
    assert len(held) >= 4  # baselines and finalists
    for trial in held:
        rows = trial_rows(trial, attrs, "heldout")
        record = storage.heldout_record(attrs, trial.number)
        assert rows is not None and record is not None
        for task in TASKS:
            assert float(np.mean(rows[task])) == pytest.approx(record.scores[task], rel=1e-12, abs=1e-12)


def test_the_study_stores_which_rows_once(loglik_study: optuna.Study) -> None:
    ids = loglik_study.user_attrs[EXAMPLE_ROWS_ATTR]
    assert set(ids) == {"search", "heldout"}
    for split in ("search", "heldout"):
        for task in TASKS:
            assert ids[split][task]["n"] == ROWS
            assert ids[split][task]["ids"] == [f"{task}-{split}.jsonl:1-{ROWS}"]
            assert expand_row_ids(ids[split][task]["ids"]) == [(f"{task}-{split}.jsonl", r) for r in range(1, ROWS + 1)]
    # per trial: only the values, in a system attribute the dashboard does not list
    trial = ranking.search_trials(loglik_study.get_trials())[0]
    assert ROWS_SEARCH_ATTR in trial.system_attrs
    assert not any("rows" in key for key in trial.user_attrs)


def test_zero_one_rows_reproduce_the_score_exactly(tmp_path: Path, llama_family: TinyFamily) -> None:
    _, study = run(write_study(tmp_path, llama_family, trials=2, top_k=1, metric="exact_match"))
    attrs = study.user_attrs
    for trial in _scored(study):
        stored = trial.system_attrs[ROWS_SEARCH_ATTR]
        assert all(text.startswith("bits:") for text in stored.values())  # 0/1 rows: one bit each
        rows = trial_rows(trial, attrs, "search")
        assert rows is not None
        for task in TASKS:
            assert float(np.mean(rows[task])) == trial.user_attrs["scores_search"][task]


def test_finalize_status_report_and_note_show_intervals(loglik_study: optuna.Study, tmp_path: Path) -> None:
    from search.annotate import best_note
    from search.report import write_report

    final = ranking.final_number(loglik_study.user_attrs)
    assert isinstance(final, int)
    lines = confidence.confidence_lines(loglik_study.get_trials(), loglik_study.user_attrs,
                                        [d.name.lower() for d in loglik_study.directions])
    text = "\n".join(lines)
    assert f"held-out confidence (trial {final}" in text
    assert "objective " in text and "gain over the best baseline (" in text and "search - held-out gap" in text
    status = render_status(loglik_study)
    assert "held-out confidence" in status and "gain over the best baseline" in status
    note = best_note(loglik_study, loglik_study.get_trials()[final])  # what the dashboard's note holds
    assert "95%" in note and "gain over the best baseline" in note and "more than noise" in note
    report = write_report(loglik_study, tmp_path / "report.html", task_higher=dict.fromkeys(TASKS, True))
    html = Path(report).read_text()
    assert "held-out confidence" in html and "gain over the best baseline" in html


def test_the_final_trial_follows_the_noise_rule(loglik_study: optuna.Study) -> None:
    attrs = loglik_study.user_attrs
    directions = [d.name.lower() for d in loglik_study.directions]
    rule = confidence.objective_rule(attrs, directions)
    assert rule is not None
    trials = loglik_study.get_trials()
    finalists = [t for t in ranking.top_feasible(ranking.search_trials(trials), directions, 3)
                 if storage.heldout_record(attrs, t.number) is not None]
    first = finalists[0]
    rows = {t.number: trial_rows(t, attrs, "heldout") for t in finalists}
    better = [t.number for t in finalists[1:] if confidence.preferred(rule, rows[t.number], rows[first.number])]
    final = ranking.final_number(attrs)
    assert final == first.number if not better else final in better
    # whether held-out decided it is stored and said (an honest label on the held-out score)
    assert attrs[confidence.FINAL_CHOICE_ATTR]["peeked"] == bool(better)
    lines = confidence.confidence_lines(trials, attrs, directions)
    assert any(line.startswith("  chosen: ") for line in lines)


@given(st.lists(st.sampled_from([0.0, 1.0]), min_size=1, max_size=70)
       | st.lists(st.floats(allow_nan=False, allow_infinity=False, width=64), min_size=1, max_size=40))
def test_row_encoding_is_exact(values: list[float]) -> None:
    decoded = decode_rows(encode_rows(values))
    assert decoded.dtype == np.float64 and decoded.tolist() == values


@given(st.lists(st.tuples(st.sampled_from(["a.jsonl", "b.jsonl"]), st.integers(1, 30)), max_size=40))
def test_row_ids_expand_to_the_rows_in_order(rows: list[tuple[str, int]]) -> None:
    ids = row_ids({"t": rows})["t"]
    assert ids["n"] == len(rows) and expand_row_ids(ids["ids"]) == rows


def test_corrupt_rows_are_a_search_error() -> None:
    with pytest.raises(SearchError, match="unknown encoding"):
        decode_rows("x:1")


def test_minimize_objective_shows_intervals_in_its_own_units() -> None:
    rule = confidence.ObjectiveRule("mean", ("a",), {"a": False}, {"a": 1.0}, {})
    rows = {"a": np.array([1.0, 2.0, 3.0, 4.0])}
    signed = confidence.heldout_interval(rule, rows)
    assert signed is not None and signed.estimate == -2.5
    shown = rule.shown(signed)
    assert isinstance(shown, Interval) and shown.estimate == 2.5 and shown.low <= 2.5 <= shown.high
    # a lower-is-better trial with smaller rows is the better one
    better = {"a": rows["a"] - 2.0}
    assert confidence.preferred(rule, better, rows) and not confidence.preferred(rule, rows, better)


def _finalist(trial: int, rows: np.ndarray) -> tuple[FinalistRow, dict[str, np.ndarray]]:
    return FinalistRow(trial, 0.9, float(rows.mean()), True, ()), {"a": rows}


def test_a_finalist_replaces_the_best_on_search_only_when_better_by_more_than_noise() -> None:
    rule = confidence.ObjectiveRule("mean", ("a",), {"a": True}, {"a": 1.0}, {})
    rng = np.random.default_rng(0)
    base = (rng.random(400) < 0.5).astype(float)
    tie = base.copy()
    tie[np.flatnonzero(base == 0)[:2]] = 1.0  # right on 2 more rows of 400: higher, within noise
    clear = np.maximum(base, (rng.random(400) < 0.5).astype(float))  # right on many more rows
    first, first_rows = _finalist(1, base)
    close, close_rows = _finalist(2, tie)
    better, better_rows = _finalist(3, clear)
    assert close.heldout_objective > first.heldout_objective
    chosen, how, peeked = _choose([first, close], {1: first_rows, 2: close_rows}, rule)
    assert chosen is first and not peeked and "best on search" in how
    chosen, how, peeked = _choose([first, close, better], {1: first_rows, 2: close_rows, 3: better_rows}, rule)
    assert chosen is better and peeked and "more than noise" in how
    # without per-row values: the best held-out number, and it says so
    chosen, how, peeked = _choose([first, close], {1: None, 2: None}, rule)
    assert chosen is close and peeked and "no held-out intervals" in how
