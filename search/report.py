"""One self-contained HTML report of a study (plotly; opens without a network).

It reads only what the driver stored on the trials (see docs/ARCHITECTURE.md,
"What a trial stores"), so it works on any finished or running study.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import optuna
import plotly.graph_objects as go
from optuna.trial import FrozenTrial, TrialState
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from merges.recipe import ROLES, Recipe


@dataclass(frozen=True)
class Figure:
    title: str
    figure: go.Figure
    caption: str


def build_report(study: optuna.Study) -> str:
    """The report as one HTML string with plotly.js inlined."""
    trials = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    best = _final_or_best(study, trials)
    figures = [
        _history(study, trials),
        _task_scores(study, trials, best),
        _search_vs_heldout(trials),
        _recipe_heatmap(study, best),
        _importances(study),
    ]
    if len(study.directions) > 1:
        figures.append(_pareto(study, trials))
    return _page(study, best, [f for f in figures if f is not None])


def write_report(study: optuna.Study, path: str | Path) -> Path:
    """Write the report atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(build_report(study), encoding="utf-8")
    os.replace(tmp, path)
    return path


# -- figures ------------------------------------------------------------------------


def _objective(trial: FrozenTrial) -> float:
    raw = trial.user_attrs.get("objective_raw")
    if raw is not None:
        return float(raw)
    return float(trial.values[0]) if trial.values else math.nan


def _final_or_best(study: optuna.Study, trials: Sequence[FrozenTrial]) -> FrozenTrial | None:
    final = study.user_attrs.get("final_trial")
    if final is not None:
        return study.trials[int(final)]
    feasible = [t for t in trials if t.user_attrs.get("feasible")]
    if not feasible:
        return None
    sign = 1.0 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else -1.0
    return max(feasible, key=lambda t: sign * _objective(t))


def _label(trial: FrozenTrial) -> str:
    name = trial.user_attrs.get("baseline")
    return f"#{trial.number} {name}" if name else f"#{trial.number}"


def _history(study: optuna.Study, trials: Sequence[FrozenTrial]) -> Figure:
    fig = go.Figure()
    search = [t for t in trials if t.user_attrs.get("kind") != "baseline"]
    baselines = [t for t in trials if t.user_attrs.get("kind") == "baseline"]
    for feasible, colour, name in ((True, "#1f77b4", "feasible"), (False, "#d62728", "infeasible")):
        group = [t for t in search if bool(t.user_attrs.get("feasible")) is feasible]
        fig.add_trace(
            go.Scatter(
                x=[t.number for t in group], y=[_objective(t) for t in group], mode="markers",
                name=name, marker={"color": colour, "size": 7},
                text=[t.user_attrs.get("recipe_summary", "") for t in group],
            )
        )
    fig.add_trace(
        go.Scatter(
            x=[t.number for t in baselines], y=[_objective(t) for t in baselines], mode="markers+text",
            name="baselines", marker={"symbol": "diamond", "size": 11, "color": "#2ca02c"},
            text=[t.user_attrs.get("baseline", "") for t in baselines], textposition="top center",
        )
    )
    maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    xs, ys, best = [], [], None
    for t in sorted(search, key=lambda t: t.number):
        if t.user_attrs.get("feasible"):
            value = _objective(t)
            if best is None or (value > best if maximize else value < best):
                best = value
        if best is not None:
            xs.append(t.number)
            ys.append(best)
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name="best feasible", line={"color": "black"}))
    fig.update_layout(xaxis_title="trial", yaxis_title="objective (unpenalised)")
    return Figure("Optimisation history", fig, "Every trial's objective; infeasible trials (a gate missed) in red, baselines as diamonds.")


def _task_scores(study: optuna.Study, trials: Sequence[FrozenTrial], best: FrozenTrial | None) -> Figure:
    tasks: list[str] = list(study.user_attrs.get("tasks", []))
    rows: list[tuple[str, Mapping[str, float]]] = []
    if best is not None:
        rows.append((f"best {_label(best)}", best.user_attrs.get("scores_search", {})))
    for t in trials:
        if t.user_attrs.get("kind") == "baseline":
            rows.append((t.user_attrs.get("baseline", _label(t)), t.user_attrs.get("scores_search", {})))
    fig = go.Figure()
    for name, scores in rows:
        fig.add_trace(go.Bar(name=name, x=tasks, y=[scores.get(task) for task in tasks]))
    for gate in study.user_attrs.get("gate_specs", []):
        if gate.get("min") is not None and gate["task"] in tasks:
            index = tasks.index(gate["task"])
            fig.add_shape(
                type="line", x0=index - 0.45, x1=index + 0.45, y0=gate["min"], y1=gate["min"],
                line={"color": "red", "dash": "dash"},
            )
    fig.update_layout(barmode="group", yaxis_title="score on search slices")
    return Figure("Per-task scores: best recipe vs sources and baselines", fig, "Dashed red lines are the per-task minimum gates.")


def _search_vs_heldout(trials: Sequence[FrozenTrial]) -> Figure | None:
    finalists = [t for t in trials if t.user_attrs.get("scores_heldout")]
    if not finalists:
        return None
    fig = go.Figure()
    lo, hi = 1.0, 0.0
    for t in finalists:
        search, held = t.user_attrs.get("scores_search", {}), t.user_attrs["scores_heldout"]
        tasks = [task for task in held if task in search]
        xs, ys = [search[k] for k in tasks], [held[k] for k in tasks]
        lo, hi = min([lo, *xs, *ys]), max([hi, *xs, *ys])
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers+text", text=tasks, name=_label(t), textposition="bottom center"))
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="no gap", line={"dash": "dot", "color": "grey"}))
    fig.update_layout(xaxis_title="search slice", yaxis_title="held-out slice")
    return Figure("Search vs held-out scores of the finalists", fig, "Points below the diagonal lost score on held-out data.")


def _recipe_heatmap(study: optuna.Study, best: FrozenTrial | None) -> Figure | None:
    if best is None or "recipe" not in best.user_attrs:
        return None
    recipe = Recipe.from_dict(best.user_attrs["recipe"])
    if not recipe.tensor_params:
        return None
    labels = _source_labels(study, recipe)
    names = list(recipe.tensor_params)
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=names, horizontal_spacing=0.12)
    groups = [f"layers {a}-{b - 1}" for a, b in recipe.groups]
    role_rows = [r for r in ("attention", "mlp", "norm") if r in ROLES]
    for col, name in enumerate(names, start=1):
        z, y = [], []
        for s, label in enumerate(labels):
            for role in role_rows:
                z.append([recipe.tensor_values(name, g, role)[s] for g in range(len(recipe.groups))])
                y.append(f"{label} / {role}")
        fig.add_trace(go.Heatmap(z=z, x=groups, y=y, coloraxis="coloraxis"), row=1, col=col)
    fig.update_layout(height=200 + 28 * len(labels) * len(role_rows), coloraxis={"colorscale": "Viridis"})
    return Figure(f"Best recipe ({recipe.method}): values per layer group and source", fig, "Rows are source / tensor role; columns are layer groups.")


def _importances(study: optuna.Study) -> Figure | None:
    search = [
        t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.user_attrs.get("kind") != "baseline" and t.params
    ]
    if len(search) < 3 or len({tuple(sorted(t.params.items())) for t in search}) < 2:
        return None
    try:
        importances = optuna.importance.get_param_importances(study, target=_objective)
    except (RuntimeError, ValueError):  # e.g. a parameter with no spread yet
        return None
    names = list(importances)[:25][::-1]
    fig = go.Figure(go.Bar(x=[importances[n] for n in names], y=names, orientation="h"))
    fig.update_layout(height=120 + 22 * len(names), xaxis_title="importance (normalised)")
    return Figure("Parameter importances", fig, "Which genes moved the (unpenalised) objective most.")


def _pareto(study: optuna.Study, trials: Sequence[FrozenTrial]) -> Figure:
    tasks: list[str] = list(study.user_attrs.get("tasks", []))[:3]
    front = {t.number for t in study.best_trials}
    fig = go.Figure()
    for on_front in (False, True):
        group = [t for t in trials if (t.number in front) is on_front and t.values]
        x = [t.values[0] for t in group]
        y = [t.values[1] if len(t.values) > 1 else 0.0 for t in group]
        fig.add_trace(
            go.Scatter(
                x=x, y=y, mode="markers", name="Pareto front" if on_front else "other trials",
                marker={"size": 10 if on_front else 6, "color": "#d62728" if on_front else "#aaaaaa"},
                text=[_label(t) for t in group],
            )
        )
    fig.update_layout(xaxis_title=tasks[0] if tasks else "objective 0", yaxis_title=tasks[1] if len(tasks) > 1 else "objective 1")
    return Figure("Pareto front", fig, "Trials no other trial beats on every task.")


def _source_labels(study: optuna.Study, recipe: Recipe) -> list[str]:
    by_path = {str(v): k for k, v in dict(study.user_attrs.get("sources", {})).items()}
    return [by_path.get(s, Path(s).name) for s in recipe.sources]


# -- page ---------------------------------------------------------------------------

_ERROR_HOOK = """
window.__reportErrors = [];
window.addEventListener('error', function (e) {
  window.__reportErrors.push(String(e.message));
  var box = document.getElementById('report-errors');
  if (box) { box.textContent = window.__reportErrors.join('\\n'); }
});
"""


def _page(study: optuna.Study, best: FrozenTrial | None, figures: Sequence[Figure]) -> str:
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>mergesearch report: {html.escape(study.study_name)}</title>",
        f"<script>{_ERROR_HOOK}</script>",
        f"<script>{get_plotlyjs()}</script>",
        "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}"
        ".report-figure{margin:2em 0}figcaption{color:#555}</style></head><body>",
        f"<h1>Study {html.escape(study.study_name)}</h1>",
        _summary(study, best),
        "<pre id='report-errors' style='color:red'></pre>",
    ]
    for index, fig in enumerate(figures):
        fig.figure.update_layout(title=None, margin={"t": 40})
        div = fig.figure.to_html(full_html=False, include_plotlyjs=False, div_id=f"figure-{index}")
        parts.append(
            f"<figure class='report-figure' data-title='{html.escape(fig.title)}'><h2>{html.escape(fig.title)}</h2>"
            f"{div}<figcaption>{html.escape(fig.caption)}</figcaption></figure>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)


def _summary(study: optuna.Study, best: FrozenTrial | None) -> str:
    if best is None:
        return "<p><strong>No feasible trial yet</strong>: every trial misses at least one gate.</p>"
    scores = best.user_attrs.get("scores_search", {})
    held = best.user_attrs.get("scores_heldout", {})
    cells = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v:.3f}</td><td>{held.get(k, float('nan')):.3f}</td></tr>"
        for k, v in scores.items()
    )
    return (
        f"<p>Best feasible trial <strong>#{best.number}</strong>: {html.escape(best.user_attrs.get('recipe_summary', ''))}</p>"
        f"<table><tr><th>task</th><th>search</th><th>held-out</th></tr>{cells}</table>"
    )

