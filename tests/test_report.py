"""``search report`` on real tiny studies (real driver, inline pool), rendered in headless Chromium.

Each study runs once per module: baselines, a few search trials, finalize. The report is
written by the real command, loaded in Chromium with the network disabled, and every
figure must have drawn (plotly's ``main-svg`` inside its container) with no script error.
"""

from __future__ import annotations

import base64
import html
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fitness.spec import higher_is_better
from merges.mergekit_yaml import recipe_from_mergekit, rename_models
from merges.recipe import ROLES, LayerSlice, Recipe
from search import ranking, storage
from search.annotate import chosen_trial
from search.cli import main
from search.config import StudyConfig
from search.report import (
    Figure,
    build_report,
    gate_limits,
    history_figure,
    pareto_front,
    read_study,
    recipe_figure,
)
from tests.checkpoints import TinyFamily
from tests.studies import gated_study, run, write_study

optuna.logging.set_verbosity(optuna.logging.WARNING)

CHROMIUM = Path("/usr/bin/chromium")
SINGLE_FIGURES = {"history", "tasks", "heldout", "recipe", "importances"}


@dataclass(frozen=True)
class Built:
    path: Path  # study.toml
    config: StudyConfig
    study: optuna.Study
    report: Path


def build(folder: Path, path: Path) -> Built:
    config, study = run(path)
    report = folder / "report.html"
    assert main(["report", str(path), "-o", str(report)]) == 0
    return Built(path, config, study, report)


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory, llama_family: TinyFamily) -> Built:
    folder = tmp_path_factory.mktemp("single")
    return build(folder, gated_study(folder, llama_family, trials=6))


@pytest.fixture(scope="module")
def multi(tmp_path_factory: pytest.TempPathFactory, llama_family: TinyFamily) -> Built:
    folder = tmp_path_factory.mktemp("multi")
    path = gated_study(folder, llama_family, trials=6, sampler="nsga2", objective="per_task")
    return build(folder, path)


def expected_limit(built: Built) -> float:
    """The alpha gate's limit on the search split: best source score minus max_regression."""
    gate = built.config.tasks[0].gates[0]
    assert gate.max_regression is not None
    best = max(
        t.user_attrs["scores_search"]["alpha"]
        for name, t in ranking.baseline_trials(built.study.get_trials()).items() if name.startswith("source:")
    )
    return best - gate.max_regression


def render(page: Path, tmp_path: Path) -> str:
    """The DOM after Chromium ran the page's scripts (no network, virtual time)."""
    proc = subprocess.run(
        [
            str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=30000",
            # Every http(s) fetch goes to a closed port: the page must need no network.
            "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
            "--dump-dom", page.as_uri(),
        ],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "</html>" in proc.stdout, proc.stderr[-2000:]
    return proc.stdout


def figures(dom: str) -> dict[str, str]:
    """Figure key -> the DOM inside its ``<figure class="report-figure">``."""
    found = re.findall(r'<figure class="report-figure" id="section-([a-z]+)"[^>]*>(.*?)</figure>', dom, re.S)
    return dict(found)


def report_errors(dom: str) -> str:
    match = re.search(r'<pre id="report-errors"[^>]*>(.*?)</pre>', dom, re.S)
    assert match is not None, "the error box is missing"
    return html.unescape(match.group(1))


def assert_self_contained(text: str) -> None:
    assert "Plotly.newPlot" in text and len(text) > 1_000_000  # plotly.js inlined
    assert not re.search(r"<script[^>]+src=", text) and "<link" not in text


def test_single_objective_report_draws_every_figure_without_errors(single: Built, tmp_path: Path) -> None:
    text = single.report.read_text()
    assert_self_contained(text)
    dom = render(single.report, tmp_path)
    drawn = figures(dom)
    assert set(drawn) == SINGLE_FIGURES
    for key, inner in drawn.items():
        assert 'class="main-svg"' in inner, f"figure {key} did not draw"
    assert report_errors(dom) == ""
    assert not list(single.report.parent.glob("report.html.tmp-*"))
    assert f"objective {single.config.objective} (maximize);" in text  # the study's objective by name


def test_report_shows_the_chosen_trial_with_its_gates_and_exact_recipe(single: Built) -> None:
    study = single.study
    chosen = chosen_trial(study)
    final = study.user_attrs["final_trial"]
    assert chosen is not None and chosen.number == final
    text = single.report.read_text()
    assert f"data-trial='{final}'" in text and f"Chosen recipe: trial {final}" in text
    # The gate row: the configured limit and the stored margins on both splits.
    threshold = expected_limit(single)
    margin = chosen.user_attrs["gates"]["alpha.max_regression"]["margin"]
    held = storage.heldout_record(study.user_attrs, final)
    assert held is not None
    row = re.search(r"<tr><td><code>alpha\.max_regression</code></td>(.*?)</tr>", text)
    assert row is not None
    assert f"&gt;= {threshold:.4f}" in row.group(1)
    assert f"{margin:+.4f} pass" in row.group(1)
    assert f"{held.gate_margins['alpha.max_regression']:+.4f}" in row.group(1)
    # The mergekit YAML shown rebuilds exactly the stored recipe (its model paths are relative
    # to the report's folder, where the download link's recipe.yaml belongs).
    shown = re.search(r"<pre id='chosen-recipe'>(.*?)</pre>", text, re.S)
    assert shown is not None
    recipe = recipe_from_mergekit(html.unescape(shown.group(1)), base_dir=single.report.parent)
    stored = Recipe.from_dict(chosen.user_attrs["recipe"])
    paths = [stored.base, *stored.sources]
    assert rename_models(recipe, {p: os.path.normpath(p) for p in [recipe.base, *recipe.sources]}) == stored
    assert not any(str(Path(p).parent) in shown.group(1) for p in paths)  # no folder of this machine


def test_report_links_the_yaml_that_search_export_writes_beside_it(single: Built) -> None:
    text = single.report.read_text()
    link = re.search(r"<a id='download-recipe' download='recipe.yaml' href='data:application/yaml;base64,([^']+)'>",
                     text)
    assert link is not None, "no download link"
    downloaded = base64.b64decode(link.group(1)).decode("utf-8")
    exported = single.report.parent / "recipe.yaml"
    assert main(["export", str(single.path), "-o", str(exported)]) == 0
    assert downloaded == exported.read_text()


def test_figures_carry_the_stored_trials_gates_and_recipe(single: Built) -> None:
    study, config = single.study, single.config
    view = read_study(study, {t.name: higher_is_better(t.metric) for t in config.tasks})
    searched = ranking.search_trials(study.get_trials())
    feasible = sorted(t.number for t in searched if ranking.is_feasible(t))
    infeasible = sorted(t.number for t in searched if not ranking.is_feasible(t))
    assert feasible and infeasible, "the gate between the sources should split the trials"
    history = {trace.name.split(" (")[0]: trace for trace in history_figure(view).figure.data}
    assert sorted(history["feasible"].x) == feasible
    assert sorted(history["infeasible"].x) == infeasible
    baselines = ranking.baseline_trials(study.get_trials())
    assert sorted(history["baselines"].x) == sorted(t.number for t in baselines.values())
    assert list(history[f"chosen #{study.user_attrs['final_trial']}"].x) == [study.user_attrs["final_trial"]]
    # The gate limit the study stored is the configured one.
    (limit,) = gate_limits(view)
    assert limit.name == "alpha.max_regression"
    assert limit.limit == pytest.approx(expected_limit(single), abs=1e-9)
    # The heatmap holds the chosen recipe's weights, one row per source, one column per group.
    html_text = build_report(study, task_higher=view.task_higher)
    assert "figure-recipe" in html_text
    figure = recipe_figure(view)
    assert isinstance(figure, Figure) and view.chosen is not None
    recipe = Recipe.from_dict(view.chosen.user_attrs["recipe"])
    (heatmap,) = figure.figure.data
    assert list(heatmap.y) == list(config.models.sources)
    expected = [[recipe.tensor_params["weight"][g][ROLES.index("attention")][s] for g in range(len(recipe.groups))]
                for s in range(len(recipe.sources))]
    assert [list(row) for row in heatmap.z] == expected


def test_no_feasible_trial_gives_a_report_that_names_the_blocking_gate(
    tmp_path: Path, llama_family: TinyFamily
) -> None:
    # loglik is <= 0: a minimum of 1.0 is never met.
    path = write_study(tmp_path, llama_family, trials=2, gates={"beta": "{ min = 1.0 }"})
    config, study = run(path)
    text = build_report(study, task_higher={t.name: True for t in config.tasks})
    assert "No chosen recipe yet" in text
    assert "fails gate &#x27;beta.min&#x27;" in text
    assert "Not drawn: no chosen trial yet." in text  # the recipe heatmap
    assert "figure-history" in text and "figure-tasks" in text


def test_multi_objective_report_has_the_feasible_pareto_front(multi: Built, tmp_path: Path) -> None:
    dom = render(multi.report, tmp_path)
    drawn = figures(dom)
    assert "pareto" in drawn and 'class="main-svg"' in drawn["pareto"]
    assert all('class="main-svg"' in inner for inner in drawn.values())
    assert report_errors(dom) == ""
    study = multi.study
    view = read_study(study, {t.name: True for t in multi.config.tasks})
    assert view.directions == ["maximize", "maximize"]
    assert "objective per_task (maximize, maximize);" in multi.report.read_text()
    # Optuna's own front over the same search trials (it honours the stored constraints).
    scratch = optuna.create_study(directions=view.directions)
    scratch.add_trials(view.search)
    # add_trials renumbers: scratch trial i is view.search[i].
    assert {t.number for t in pareto_front(view.search, view.directions)} == {
        view.search[t.number].number for t in scratch.best_trials
    }


point = st.tuples(
    st.lists(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]), min_size=2, max_size=2),  # ties on purpose
    st.sampled_from([-0.5, 0.0, 0.5]),  # gate constraint: <= 0 passes
)


@settings(max_examples=60, deadline=None)
@given(points=st.lists(point, max_size=12), directions=st.lists(st.sampled_from(["maximize", "minimize"]),
                                                                  min_size=2, max_size=2))
def test_pareto_front_is_optunas_feasible_front(points: list[tuple[list[float], float]],
                                                directions: list[str]) -> None:
    trials = [
        optuna.trial.create_trial(values=values, user_attrs={"kind": "search"},
                                  system_attrs={"constraints": [constraint]})
        for values, constraint in points
    ]
    scratch = optuna.create_study(directions=directions)
    scratch.add_trials(trials)
    stored = scratch.get_trials()
    assert {t.number for t in pareto_front(stored, directions)} == {t.number for t in scratch.best_trials}


def test_passthrough_recipe_draws_which_source_layer_feeds_each_output_layer() -> None:
    sources = {"a": "/models/a", "b": "/models/b"}
    recipe = Recipe(
        method="passthrough", base=None, sources=("/models/a", "/models/b"), groups=((0, 2), (2, 3), (3, 4)),
        layer_slices=(LayerSlice("/models/a", 0, 2), LayerSlice("/models/b", 1, 2), LayerSlice("/models/a", 3, 4)),
    )
    study = optuna.create_study(direction="maximize")
    study.set_user_attr("sources", sources)
    study.set_user_attr("tasks", ["t"])
    study.add_trial(optuna.trial.create_trial(
        value=0.5, user_attrs={"kind": "search", "recipe": recipe.to_dict(), "scores_search": {"t": 0.5}},
        system_attrs={"constraints": []},
    ))
    view = read_study(study, {"t": True})
    figure = recipe_figure(view)
    assert isinstance(figure, Figure)
    (heatmap,) = figure.figure.data
    assert list(heatmap.y) == ["a", "b"]
    assert [list(row) for row in heatmap.text] == [["L0", "L1", "", "L3"], ["", "", "L1", ""]]


def assert_report_marks_stopped(study: optuna.Study, task_higher: dict[str, bool]) -> None:
    """A study scored in stages (tests/test_fidelity_search.py runs one and calls this): the report
    counts the trials stopped early in status's words, lists each with its stage, rows and estimate,
    and draws them at their estimate apart from the best-so-far line and the chosen star."""
    from optuna.trial import TrialState

    from search.records import STOPPED_EARLY

    trials = study.get_trials()
    stopped = [t for t in trials if ranking.kind(t) == ranking.KIND_SEARCH and t.state == TrialState.PRUNED]
    done = sum(ranking.counts_toward_budget(t) for t in trials)
    assert stopped and done > len(stopped)
    page = build_report(study, task_higher=task_higher)
    assert f"<p>{len(stopped)} of {done} search trials {html.escape(STOPPED_EARLY)}.</p>" in page
    for trial in stopped:
        record = trial.user_attrs["fidelity"]
        row = re.search(rf"<tr class='stopped' data-trial='{trial.number}'>(.*?)</tr>", page)
        assert row is not None, trial.number
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row.group(1))
        assert cells[1] == f"{record['stage']} of {record['stages']}"
        assert cells[2] == f"{sum(record['rows'].values())} (" + ", ".join(
            f"{task} {n}" for task, n in record["rows"].items()) + ")"
        assert cells[3:3 + len(record["estimate"])] == [f"{record['estimate'][t]:.4f}" for t in task_higher]
        assert html.unescape(cells[-1]) == record["stopped"]
    history = history_figure(read_study(study, task_higher))
    assert isinstance(history, Figure)
    traces = {trace.name: trace for trace in history.figure.data}
    marked = traces[f"stopped early ({len(stopped)}): estimate"]
    assert list(marked.x) == [t.number for t in stopped]
    assert list(marked.y) == pytest.approx([t.user_attrs["fidelity"]["objective"][0] for t in stopped])
    drawn_as_trials = [n for name, trace in traces.items() if name.startswith(("feasible", "infeasible", "chosen"))
                       for n in trace.x]
    best_line = traces["best feasible so far"]
    numbers = {t.number for t in stopped}
    assert not numbers & set(drawn_as_trials)
    assert not numbers & set(best_line.x)
    completed = {ranking.raw_values(t)[0] for t in ranking.search_trials(trials) if ranking.is_feasible(t)}
    assert set(best_line.y) <= completed  # the line takes completed trials' values only, never an estimate
    assert f"{STOPPED_EARLY}: grey open triangles" in history.caption
