"""One self-contained HTML report of a study (plotly.js inlined; opens without a network).

It reads only what the driver stored (docs/ARCHITECTURE.md, "What a trial stores"; held-out
records in study user attrs ``heldout:<number>``) and ranks with :mod:`search.ranking`, so
it shows the same chosen trial as ``search export`` and the dashboard note
(:func:`search.annotate.chosen_trial`). It works on a running study too.

Gate limits come from what the study stored (:mod:`search.gate_record`): the study's gates
for the dashed lines, the chosen trial's own record for its gate table. A study from an
older version, without stored limits, is drawn without them and says so.

Trials stopped early by multi-fidelity scoring (``study.fidelity``: state PRUNED, scored on a
prefix of the rows, ``search.records.stopped_trial``) are counted in the words status uses
(``records.stopped_early``), listed with their stage, rows and estimate, and drawn in the
history at their estimate as stopped: never on the best-so-far line, never chosen.
"""

from __future__ import annotations

import base64
import html
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import optuna
import plotly.graph_objects as go
from optuna.trial import FrozenTrial, TrialState
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from fitness.fidelity import pareto_layers
from fitness.gates import GateLimit
from merges.output import check_file_target, write_file
from merges.recipe import ROLES, Recipe
from search import confidence, gate_record, ranking, storage
from search.annotate import chosen_trial
from search.definition import DEFINITION_KEY
from search.generations import generations_file
from search.lm_eval_splits import splits_html
from search.records import StoppedTrial, stopped_early, stopped_trial
from search.warm_start import WARM_ATTR, best_warm_trial

FEASIBLE = "#1f77b4"
INFEASIBLE = "#d62728"
BASELINE = "#2ca02c"
CHOSEN = "#ff7f0e"
STOPPED = "#7f7f7f"
RECIPE_FILENAME = "recipe.yaml"  # the download's name; `search report` writes its paths for that file beside the report


@dataclass(frozen=True)
class Figure:
    key: str  # stable id: the figure's div is ``figure-<key>``
    title: str
    figure: go.Figure
    caption: str


@dataclass(frozen=True)
class Omitted:
    """A figure the study cannot draw yet, and why (shown in its place)."""

    key: str
    title: str
    reason: str


@dataclass(frozen=True)
class StudyView:
    """The stored study, read once."""

    study: optuna.Study
    trials: list[FrozenTrial]
    directions: list[str]
    tasks: list[str]
    task_higher: Mapping[str, bool]
    search: list[FrozenTrial]  # completed search trials
    failed: list[FrozenTrial]
    baselines: dict[str, FrozenTrial]
    chosen: FrozenTrial | None
    gates: gate_record.StudyGates
    stopped: list[StoppedTrial]  # search trials stopped early (multi-fidelity), by number
    done: int  # search trials done (ranking.counts_toward_budget: complete, stopped, failed)

    @property
    def multi(self) -> bool:
        return len(self.directions) > 1

    def heldout(self, trial: FrozenTrial) -> storage.HeldoutRecord | None:
        return storage.heldout_record(self.study.user_attrs, trial.number)


def read_study(study: optuna.Study, task_higher: Mapping[str, bool]) -> StudyView:
    trials = study.get_trials(deepcopy=False)
    names = study.user_attrs.get("tasks")
    tasks = [str(n) for n in names] if isinstance(names, list) else list(task_higher)
    return StudyView(
        study=study,
        trials=trials,
        directions=[d.name.lower() for d in study.directions],
        tasks=tasks,
        task_higher=dict(task_higher),
        search=ranking.search_trials(trials),
        failed=[t for t in trials if t.state == TrialState.FAIL and ranking.kind(t) == ranking.KIND_SEARCH],
        baselines=ranking.baseline_trials(trials),
        chosen=chosen_trial(study),
        gates=gate_record.read_study_gates(study.user_attrs),
        stopped=[s for t in trials if ranking.kind(t) == ranking.KIND_SEARCH and (s := stopped_trial(t)) is not None],
        done=sum(ranking.counts_toward_budget(t) for t in trials),
    )


def build_report(
    study: optuna.Study, *, task_higher: Mapping[str, bool], recipe_text: str | None = None
) -> str:
    """The report as one HTML string.

    ``task_higher``: task -> whether a higher score is better (from the study config).
    ``recipe_text``: the chosen trial's mergekit YAML, shown under the summary.
    """
    view = read_study(study, task_higher)
    parts: list[Figure | Omitted] = [
        history_figure(view),
        task_scores_figure(view),
        heldout_figure(view),
        recipe_figure(view),
        importance_figure(view),
    ]
    if view.multi:
        parts.append(pareto_figure(view))
    return _page(view, parts, recipe_text)


# In the <head> of every report (see _page): an existing -o FILE is replaced only if it has it.
REPORT_SIGNATURE = "<title>mergesearch report"


def write_report(
    study: optuna.Study, path: str | Path, *, task_higher: Mapping[str, bool],
    recipe_text: str | None = None,
) -> Path:
    """Write the report atomically and durably; an existing ``path`` only if it is a report."""
    check_file_target(path, signature=REPORT_SIGNATURE)  # before the (slow) build
    text = build_report(study, task_higher=task_higher, recipe_text=recipe_text)
    write_file(path, text, signature=REPORT_SIGNATURE)
    return Path(path)


# -- stored values --------------------------------------------------------------------


def objective_value(view: StudyView, trial: FrozenTrial) -> float:
    """The unpenalised objective; with several objectives their direction-signed mean."""
    if view.multi:
        return ranking.score(trial, view.directions)
    values = ranking.raw_values(trial)
    return values[0] if values else math.nan


def gate_limits(view: StudyView) -> list[GateLimit]:
    """Each gate's limit on the search split, as the study stored it ([] when not stored)."""
    return list(view.gates.limits or [])


def _label(trial: FrozenTrial) -> str:
    name = trial.user_attrs.get("baseline")
    return f"#{trial.number} {name}" if name else f"#{trial.number}"


def _hover(trial: FrozenTrial) -> str:
    scores = trial.user_attrs.get("scores_search", {})
    lines = [f"<b>{html.escape(_label(trial))}</b>", html.escape(trial.user_attrs.get("recipe_summary", ""))]
    lines += [f"{html.escape(k)}: {float(v):.4f}" for k, v in scores.items()]
    lines += [f"gate {html.escape(gate_record.describe(g))}" for g in gate_record.read_trial_gates(trial.user_attrs)]
    return "<br>".join(lines)


# -- figures --------------------------------------------------------------------------


def history_figure(view: StudyView) -> Figure | Omitted:
    title = "Optimisation history"
    if not view.search and not view.baselines:
        return Omitted("history", title, "no completed trial yet")
    fig = go.Figure()
    for feasible, colour, name in ((True, FEASIBLE, "feasible"), (False, INFEASIBLE, "infeasible")):
        group = [t for t in view.search if ranking.is_feasible(t) is feasible]
        fig.add_trace(go.Scatter(
            x=[t.number for t in group], y=[objective_value(view, t) for t in group], mode="markers",
            name=f"{name} ({len(group)})",
            marker={"color": colour, "size": 8, "symbol": "circle" if feasible else "x"},
            hovertext=[_hover(t) for t in group], hoverinfo="text",
        ))
    if view.stopped:  # at their estimate, apart from the completed trials and the best-so-far line
        fig.add_trace(go.Scatter(
            x=[s.number for s in view.stopped], y=[_stopped_objective(view, s) for s in view.stopped],
            mode="markers", name=f"stopped early ({len(view.stopped)}): estimate",
            marker={"color": STOPPED, "size": 8, "symbol": "triangle-down-open"},
            hovertext=[_stopped_hover(s) for s in view.stopped], hoverinfo="text",
        ))
    baselines = list(view.baselines.values())
    fig.add_trace(go.Scatter(
        x=[t.number for t in baselines], y=[objective_value(view, t) for t in baselines],
        mode="markers", name="baselines",
        marker={"symbol": "diamond", "size": 11, "color": BASELINE, "line": {"width": 1, "color": "black"}},
        hovertext=[_hover(t) for t in baselines], hoverinfo="text",
    ))
    xs, ys, best = [], [], -math.inf
    for trial in sorted(view.search, key=lambda t: t.number):
        if ranking.is_feasible(trial):
            best = max(best, ranking.score(trial, view.directions))
        if best > -math.inf:
            xs.append(trial.number)
            ys.append(best if view.multi or view.directions[0] == "maximize" else -best)
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name="best feasible so far",
                             line={"color": "black", "shape": "hv"}))
    if view.chosen is not None:
        fig.add_trace(go.Scatter(
            x=[view.chosen.number], y=[objective_value(view, view.chosen)], mode="markers",
            name=f"chosen #{view.chosen.number}",
            marker={"symbol": "star", "size": 18, "color": CHOSEN, "line": {"width": 1, "color": "black"}},
            hovertext=[_hover(view.chosen)], hoverinfo="text",
        ))
    ytitle = "mean of the signed objectives" if view.multi else "objective (unpenalised)"
    fig.update_layout(xaxis_title="trial number", yaxis_title=ytitle, height=420)
    failed = f" {len(view.failed)} search trial(s) failed and are not drawn." if view.failed else ""
    stopped = (f" {stopped_early(len(view.stopped), view.done)}: grey open triangles at the "
               "objective estimated on the rows they were scored on, never on the best-so-far line."
               if view.stopped else "")
    return Figure(
        "history", title, fig,
        "Every completed trial's objective. Infeasible trials (a gate failed) are red crosses, "
        "baselines green diamonds, the chosen trial a star." + failed + stopped,
    )


def _stopped_objective(view: StudyView, stopped: StoppedTrial) -> float:
    """A stopped trial's estimated objective, as :func:`objective_value` draws a completed one."""
    values = stopped.objective
    if not values:
        return math.nan
    return ranking.signed_mean(values, view.directions) if view.multi else values[0]


def _stopped_rows(stopped: StoppedTrial) -> str:
    return ", ".join(f"{task} {rows}" for task, rows in stopped.rows.items())


def _stopped_hover(stopped: StoppedTrial) -> str:
    lines = [f"<b>#{stopped.number} stopped early</b> after stage {stopped.stage} of {stopped.stages}",
             f"scored on {sum(stopped.rows.values())} rows ({html.escape(_stopped_rows(stopped))})"]
    lines += [f"{html.escape(task)}: {value:.4f} (estimate)" for task, value in stopped.estimate.items()]
    lines.append(html.escape(stopped.reason))
    return "<br>".join(lines)


def task_scores_figure(view: StudyView) -> Figure | Omitted:
    title = "Per-task scores: chosen recipe vs sources and baselines"
    if view.chosen is None and not view.baselines:
        return Omitted("tasks", title, "no chosen trial and no baseline yet")
    rows: list[tuple[str, Mapping[str, float], str]] = []  # (name, scores, "chosen"/"held"/"")
    if view.chosen is not None:
        rows.append((f"chosen #{view.chosen.number} (search)", view.chosen.user_attrs.get("scores_search", {}),
                     "chosen"))
        record = view.heldout(view.chosen)
        if record is not None:
            rows.append((f"chosen #{view.chosen.number} (held-out)", record.scores, "held"))
    ordered = sorted(view.baselines.items(), key=lambda item: (not item[0].startswith("source:"), item[1].number))
    rows += [(name, trial.user_attrs.get("scores_search", {}), "") for name, trial in ordered]
    fig = go.Figure()
    # Bars for scores that start at 0 (accuracies); dodged markers otherwise (log-likelihoods
    # are negative, perplexities large: a bar from 0 would hide their differences).
    bars = all(float(v) >= 0 for _, scores, _ in rows for v in scores.values())
    for name, scores, kind in rows:
        values = [scores.get(task) for task in view.tasks]
        text = ["" if v is None else f"{float(v):.3f}" for v in values]
        colour = {"color": CHOSEN} if kind else {}
        if bars:
            pattern = {"pattern": {"shape": "/"}} if kind == "held" else {}
            fig.add_trace(go.Bar(name=name, x=view.tasks, y=values, marker={**colour, **pattern},
                                 text=text, textposition="outside"))
        else:
            symbol = {"chosen": "star", "held": "star-open"}.get(kind, "circle")
            fig.add_trace(go.Scatter(name=name, x=view.tasks, y=values, mode="markers", hovertext=text,
                                     marker={"size": 14, "symbol": symbol, **colour}))
    limits = gate_limits(view)
    for gate in limits:
        index = view.tasks.index(gate.task) if gate.task in view.tasks else None
        if index is None:
            continue
        fig.add_shape(type="line", x0=index - 0.48, x1=index + 0.48, y0=gate.limit, y1=gate.limit,
                      line={"color": "red", "dash": "dash", "width": 2})
        sign = ">=" if gate.higher_is_better else "<="
        fig.add_annotation(x=index, y=gate.limit, text=f"{gate.name} {sign} {gate.limit:.3f}",
                           showarrow=False, yshift=10, font={"color": "red", "size": 11},
                           bgcolor="rgba(255,255,255,0.85)")
    if not bars:
        shown = [float(v) for _, scores, _ in rows for v in scores.values()] + [g.limit for g in limits]
        pad = 0.1 * (max(shown) - min(shown) or 1.0)
        fig.update_yaxes(range=[min(shown) - pad, max(shown) + pad])
    fig.update_layout(barmode="group", scattermode="group", height=460,
                      yaxis_title="score (search split unless marked)",
                      legend={"orientation": "h", "y": -0.15})
    if limits:
        gates = "Dashed red lines are the gates (limits on the search split, as stored)."
    elif view.gates.names:
        gates = f"Gates {', '.join(view.gates.names)}: {view.gates.missing}, so they are not drawn."
    else:
        gates = "The study has no gates."
    return Figure("tasks", title, fig,
                  f"Per task: the chosen recipe, each source alone and every baseline. {gates}")


def heldout_figure(view: StudyView) -> Figure | Omitted:
    title = "Search vs held-out scores of the finalists"
    finalists = [(t, view.heldout(t)) for t in view.search]
    finalists = [(t, r) for t, r in finalists if r is not None]
    if not finalists:
        return Omitted("heldout", title, "no trial re-scored on held-out yet (run `search finalize`)")
    fig = go.Figure()
    points: list[float] = []
    for trial, record in finalists:
        search = trial.user_attrs.get("scores_search", {})
        tasks = [task for task in view.tasks if task in search and task in record.scores]
        xs = [float(search[task]) for task in tasks]
        ys = [record.scores[task] for task in tasks]
        points += xs + ys
        chosen = view.chosen is not None and trial.number == view.chosen.number
        mark = "" if record.feasible else " (fails a gate on held-out)"
        fig.add_trace(go.Scatter(
            x=xs, y=ys, mode="markers+text", text=tasks, textposition="bottom center",
            name=f"#{trial.number}{' chosen' if chosen else ''}{mark}",
            marker={"size": 14 if chosen else 9, "symbol": "star" if chosen else "circle"},
        ))
    if not points:
        return Omitted("heldout", title, "the finalists share no task between their search and held-out scores")
    lo, hi = min(points), max(points)
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="same score",
                             line={"dash": "dot", "color": "grey"}))
    fig.update_layout(xaxis_title="search slice", yaxis_title="held-out slice", height=440)
    return Figure("heldout", title, fig,
                  "One point per finalist and task. For higher-is-better scores, points below the "
                  "diagonal lost score on the held-out slice.")


def recipe_figure(view: StudyView) -> Figure | Omitted:
    title = "Chosen recipe per layer group and source"
    if view.chosen is None or "recipe" not in view.chosen.user_attrs:
        return Omitted("recipe", title, "no chosen trial yet")
    recipe = Recipe.from_dict(view.chosen.user_attrs["recipe"])
    labels = _source_labels(view, recipe.sources)
    if recipe.layer_slices:
        return _slices_figure(view, recipe, title)
    if not recipe.tensor_params:
        return Omitted("recipe", title, f"method {recipe.method!r} has no per-source parameters")
    names = list(recipe.tensor_params)
    fig = make_subplots(rows=len(names), cols=1, subplot_titles=names, vertical_spacing=0.12)
    columns, rows_per_name = _heatmap_layout(recipe)
    height = 0
    for row, name in enumerate(names, start=1):
        roles = rows_per_name[name]
        z, y, text = [], [], []
        for s, label in enumerate(labels):
            for role in roles:
                values = [recipe.tensor_values(name, g, role if c not in ("embed", "head") else c)[s]
                          for c, g in columns]
                z.append(values)
                text.append([f"{v:.2f}" for v in values])
                y.append(label if len(roles) == 1 else f"{label} / {role}")
        fig.add_trace(go.Heatmap(
            z=z, x=[_column_name(recipe, c, g) for c, g in columns], y=y, text=text,
            texttemplate="%{text}", coloraxis="coloraxis",
            hovertemplate=name + " %{y}, %{x}: %{z:.4f}<extra></extra>",
        ), row=row, col=1)
        height += 60 + 32 * len(y)
    fig.update_yaxes(autorange="reversed")  # sources top to bottom in study order
    # One colour scale for all parameters, so equal colours mean equal values.
    fig.update_layout(height=120 + height, coloraxis={"colorscale": "Viridis"})
    shared = ", ".join(
        f"{name} = {_global_text(recipe, name)}" for name in recipe.global_params
    )
    caption = (f"Method {recipe.method}. Rows are sources (per tensor role when they differ); "
               "columns are layer groups, plus embeddings and head where they have their own values.")
    if shared:
        caption += f" Shared parameters: {shared}."
    return Figure("recipe", title, fig, caption)


def _heatmap_layout(recipe: Recipe) -> tuple[list[tuple[str, int]], dict[str, list[str]]]:
    """Columns (kind, group) and, per parameter, the in-layer roles that need their own rows."""
    last = len(recipe.groups) - 1
    inner = ("attention", "mlp", "norm")
    rows: dict[str, list[str]] = {}
    has_embed = has_head = False
    for name in recipe.tensor_params:
        cells = [[recipe.tensor_values(name, g, r) for r in inner] for g in range(len(recipe.groups))]
        differ = any(len(set(row)) > 1 for row in cells)
        rows[name] = list(inner) if differ else ["attention"]
        has_embed |= recipe.tensor_values(name, 0, "embed") != recipe.tensor_values(name, 0, "attention")
        has_head |= recipe.tensor_values(name, last, "head") != recipe.tensor_values(name, last, "attention")
    columns = [("layers", g) for g in range(len(recipe.groups))]
    if has_embed:
        columns.insert(0, ("embed", 0))
    if has_head:
        columns.append(("head", last))
    return columns, rows


def _column_name(recipe: Recipe, kind: str, group: int) -> str:
    if kind != "layers":
        return kind
    start, end = recipe.groups[group]
    return f"layer {start}" if end - start == 1 else f"layers {start}-{end - 1}"


def _global_text(recipe: Recipe, name: str) -> str:
    values = {recipe.global_params[name][g][ROLES.index(r)]
              for g in range(len(recipe.groups)) for r in ROLES}
    if len(values) == 1:
        value = next(iter(values))
        return str(value) if isinstance(value, bool) else f"{float(value):.3g}"
    numbers = [float(v) for v in values]
    return f"{min(numbers):.3g} to {max(numbers):.3g} (varies by group)"


def _slices_figure(view: StudyView, recipe: Recipe, title: str) -> Figure:
    """Passthrough: which source layer feeds each output layer."""
    models = list(dict.fromkeys(s.model for s in recipe.layer_slices))
    labels = _source_labels(view, tuple(models))
    n_out = sum(s.end - s.start for s in recipe.layer_slices)
    z = [[math.nan] * n_out for _ in models]
    text = [[""] * n_out for _ in models]
    out = 0
    for piece in recipe.layer_slices:
        row = models.index(piece.model)
        for layer in range(piece.start, piece.end):
            z[row][out] = piece.scale
            text[row][out] = f"L{layer}"
            out += 1
    fig = go.Figure(go.Heatmap(z=z, x=[f"out {i}" for i in range(n_out)], y=labels, text=text,
                               texttemplate="%{text}", colorscale="Viridis", colorbar={"title": "scale"}))
    fig.update_layout(height=160 + 40 * len(models))
    return Figure("recipe", title, fig, "Passthrough: each output layer's source model and source layer (L<n>).")


def importance_figure(view: StudyView) -> Figure | Omitted:
    title = "Parameter importances"
    trials = [t for t in view.search if t.params]
    if len(trials) < 2 or len({tuple(sorted(t.params.items())) for t in trials}) < 2:
        return Omitted("importances", title, "needs at least two completed search trials with different genes")
    # Only search trials: baselines carry no genes and would empty the search space.
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "new study created" line
    try:
        scratch = optuna.create_study(directions=["maximize"])
    finally:
        optuna.logging.set_verbosity(verbosity)
    for trial in trials:
        scratch.add_trial(optuna.trial.create_trial(
            params=trial.params, distributions=trial.distributions,
            value=ranking.score(trial, view.directions),
        ))
    try:
        importances = optuna.importance.get_param_importances(scratch)
    except (RuntimeError, ValueError) as exc:  # e.g. every gene constant so far
        return Omitted("importances", title, f"cannot be computed yet: {exc}")
    names = list(importances)[:25][::-1]
    fig = go.Figure(go.Bar(x=[importances[n] for n in names], y=names, orientation="h",
                           marker={"color": FEASIBLE}))
    fig.update_layout(height=140 + 24 * len(names), xaxis_title="importance (normalised, PED-ANOVA)")
    return Figure("importances", title, fig,
                  "Which genes moved the unpenalised objective most, over the completed search trials.")


def pareto_figure(view: StudyView) -> Figure | Omitted:
    title = "Pareto front"
    scored = [t for t in view.search if ranking.raw_values(t)]
    if not scored:
        return Omitted("pareto", title, "no completed search trial yet")
    names = view.tasks if len(view.tasks) == len(view.directions) else [
        f"objective {i}" for i in range(len(view.directions))
    ]
    front = {t.number for t in pareto_front(scored, view.directions)}
    pairs = list(itertools.combinations(range(len(view.directions)), 2))[:6]
    fig = make_subplots(rows=1, cols=len(pairs), horizontal_spacing=0.08)
    groups = (
        ("Pareto front (feasible)", [t for t in scored if t.number in front], INFEASIBLE, "circle", 11),
        ("other feasible", [t for t in scored if t.number not in front and ranking.is_feasible(t)],
         FEASIBLE, "circle", 7),
        ("infeasible", [t for t in scored if not ranking.is_feasible(t)], "#aaaaaa", "x", 7),
        ("baselines", [t for t in view.baselines.values() if ranking.raw_values(t)], BASELINE, "diamond", 10),
    )
    for col, (i, j) in enumerate(pairs, start=1):
        for name, group, colour, symbol, size in groups:
            fig.add_trace(go.Scatter(
                x=[ranking.raw_values(t)[i] for t in group], y=[ranking.raw_values(t)[j] for t in group],
                mode="markers", name=name, legendgroup=name, showlegend=col == 1,
                marker={"color": colour, "symbol": symbol, "size": size},
                hovertext=[_hover(t) for t in group], hoverinfo="text",
            ), row=1, col=col)
        fig.update_xaxes(title_text=names[i], row=1, col=col)
        fig.update_yaxes(title_text=names[j], row=1, col=col)
    fig.update_layout(height=420)
    return Figure("pareto", title, fig,
                  f"{len(front)} feasible trial(s) that no other feasible trial beats on every objective "
                  f"({', '.join(f'{n}: {d}' for n, d in zip(names, view.directions, strict=True))}).")


def pareto_front(trials: Sequence[FrozenTrial], directions: Sequence[str]) -> list[FrozenTrial]:
    """Feasible trials not dominated by another feasible trial (raw objectives)."""
    import numpy as np

    signs = [1.0 if d == "maximize" else -1.0 for d in directions]
    feasible = [t for t in trials if ranking.is_feasible(t)]
    if not feasible:
        return []
    signed = np.array([[s * v for s, v in zip(signs, ranking.raw_values(t), strict=True)] for t in feasible])
    return [t for t, layer in zip(feasible, pareto_layers(signed), strict=True) if layer == 0]


def _source_labels(view: StudyView, paths: Sequence[str]) -> list[str]:
    sources = view.study.user_attrs.get("sources", {})
    by_path = {str(v): str(k) for k, v in dict(sources).items()} if isinstance(sources, dict) else {}
    return [by_path.get(p, Path(p).name) for p in paths]


# -- page ---------------------------------------------------------------------------------

# Records script errors (and failed plot promises) where a reader and the tests see them.
_ERROR_HOOK = """
window.__reportErrors = [];
function __reportError(message) {
  window.__reportErrors.push(String(message));
  var box = document.getElementById('report-errors');
  if (box) { box.textContent = window.__reportErrors.join('\\n'); box.hidden = false; }
}
window.addEventListener('error', function (e) { __reportError(e.message); });
window.addEventListener('unhandledrejection', function (e) { __reportError(e.reason); });
"""

_STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em auto;max-width:1150px;
  padding:0 1em;color:#222}
h1{margin-bottom:.2em} h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0} td,th{border:1px solid #ccc;padding:.25em .7em;
  text-align:right} th:first-child,td:first-child{text-align:left}
.pass{color:#1a7f37} .fail{color:#cf222e;font-weight:600} .muted{color:#666}
.report-figure,.report-omitted{margin:2em 0} figcaption{color:#555;margin-top:.3em} pre{background:#f6f8fa;padding:.8em;overflow:auto;
  font-size:12px} #report-errors{color:#cf222e}
"""


def _page(view: StudyView, parts: Sequence[Figure | Omitted], recipe_text: str | None) -> str:
    name = html.escape(view.study.study_name)
    out = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>mergesearch report: {name}</title>",
        f"<script>{_ERROR_HOOK}</script>",
        f"<script>{get_plotlyjs()}</script>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>mergesearch study <code>{name}</code></h1>",
        "<pre id='report-errors' hidden></pre>",
        _overview(view),
        _stopped_section(view),
        splits_html(view.study.user_attrs),
        _summary(view, recipe_text),
    ]
    for part in parts:
        if isinstance(part, Omitted):
            out.append(
                f"<section class='report-omitted' id='section-{part.key}'><h2>{html.escape(part.title)}</h2>"
                f"<p class='muted'>Not drawn: {html.escape(part.reason)}.</p></section>"
            )
            continue
        part.figure.update_layout(title=None, margin={"t": 50, "l": 70, "r": 30, "b": 60},
                                  template="plotly_white")
        div = part.figure.to_html(full_html=False, include_plotlyjs=False, div_id=f"figure-{part.key}",
                                  config={"displaylogo": False, "responsive": True})
        out.append(
            f"<figure class='report-figure' id='section-{part.key}'><h2>{html.escape(part.title)}</h2>"
            f"{div}<figcaption>{html.escape(part.caption)}</figcaption></figure>"
        )
    out.append("</body></html>")
    return "\n".join(out)


def _overview(view: StudyView) -> str:
    attrs = view.study.user_attrs
    feasible = sum(ranking.is_feasible(t) for t in view.search)
    definition = attrs.get(DEFINITION_KEY)
    name = definition.get("objective") if isinstance(definition, Mapping) else None  # older studies: none
    directions = ", ".join(view.directions)
    objective = (f"objective {name} ({directions})" if name else
                 f"objective{'s' if view.multi else ''} {directions}")
    return (
        "<p class='muted'>"
        f"sampler {html.escape(str(attrs.get('sampler', '?')))}, seed {html.escape(str(attrs.get('seed', '?')))}, "
        f"{html.escape(objective)}; "
        f"{len(view.search)} completed search trial(s) ({feasible} feasible), {len(view.failed)} failed, "
        f"{len(view.baselines)} baseline(s); tasks: {html.escape(', '.join(view.tasks))}</p>"
    )


def _stopped_section(view: StudyView) -> str:
    """The count of trials stopped early, and each with its stage, rows and estimate."""
    if not view.stopped:
        return ""
    head = "<tr><th>trial</th><th>stage</th><th>rows scored</th>" + "".join(
        f"<th>{html.escape(task)} (estimate)</th>" for task in view.tasks) + "<th>objective (estimate)</th><th>why stopped</th></tr>"
    rows = [
        f"<tr class='stopped' data-trial='{s.number}'><td>{s.number}</td><td>{s.stage} of {s.stages}</td>"
        f"<td>{sum(s.rows.values())} ({html.escape(_stopped_rows(s))})</td>"
        + "".join(_cell(s.estimate.get(task)) for task in view.tasks)
        + f"{_cell(_stopped_objective(view, s) if s.objective else None)}<td>{html.escape(s.reason)}</td></tr>"
        for s in view.stopped
    ]
    return (f"<section id='stopped-trials'><p>{html.escape(stopped_early(len(view.stopped), view.done))}.</p>"
            "<details><summary>the trials stopped early: each scored on a prefix of the study's row order, "
            "its scores the means of those rows</summary>"
            f"<table>{head}{''.join(rows)}</table></details></section>")


def _summary(view: StudyView, recipe_text: str | None) -> str:
    best = view.chosen
    if best is None:
        blocker = ranking.what_blocks(view.trials, view.gates.names)
        reason = blocker.describe() if blocker else "no completed search trial yet"
        return ("<section id='chosen'><h2>No chosen recipe yet</h2>"
                f"<pre>{html.escape(reason)}</pre></section>")
    final = view.study.user_attrs.get("final_trial") == best.number
    held = view.heldout(best)
    why = (f"final trial, among the finalists that pass every gate on held-out: {confidence.RULE}"
           if final else "best feasible search trial (not finalized yet)")
    lines = confidence.confidence_lines(view.trials, view.study.user_attrs, view.directions)
    intervals = "" if not lines else f"<pre id='chosen-confidence'>{html.escape(chr(10).join(lines))}</pre>"
    sources = [(n, t) for n, t in view.baselines.items() if n.startswith("source:")]
    head = "<tr><th>task</th><th>search</th><th>held-out</th>" + "".join(
        f"<th>{html.escape(n)}</th>" for n, _ in sources) + "</tr>"
    rows = []
    scores = best.user_attrs.get("scores_search", {})
    for task in view.tasks:
        cells = [_cell(scores.get(task)), _cell(held.scores.get(task) if held else None)]
        cells += [_cell(t.user_attrs.get("scores_search", {}).get(task)) for _, t in sources]
        rows.append(f"<tr><td>{html.escape(task)}</td>{''.join(cells)}</tr>")
    gates = []
    for gate in gate_record.read_trial_gates(best.user_attrs):
        bound = _bound(gate, view.gates.limit(gate.name))
        held_margin = held.gate_margins.get(gate.name) if held else None
        gates.append(
            f"<tr><td><code>{html.escape(gate.name)}</code></td><td>{html.escape(bound)}</td>{_margin(gate.margin)}"
            f"{_margin(held_margin)}</tr>"
        )
    gate_table = (
        "<table id='chosen-gates'><tr><th>gate</th><th>limit (search)</th><th>margin (search)</th>"
        f"<th>margin (held-out)</th></tr>{''.join(gates)}</table>" if gates else "<p>The study has no gates.</p>"
    )
    recipe = _warm_table(view, best) + (
        f"<p>{_download_link(recipe_text)}</p>"
        f"<details><summary>mergekit YAML (what <code>search export</code> writes)</summary>"
        f"<pre id='chosen-recipe'>{html.escape(recipe_text)}</pre></details>" if recipe_text else ""
    )
    generated = generations_file(view.study.user_attrs, best.number)
    generations = "" if generated is None else (
        f"<p id='chosen-generations'><a href='{html.escape(Path(generated).as_uri())}'>What it generated</a> "
        f"on the held-out slices (JSON Lines, one record per example): <code>{html.escape(generated)}</code></p>"
    )
    return (
        f"<section id='chosen' data-trial='{best.number}'><h2>Chosen recipe: trial {best.number}</h2>"
        f"<p>{html.escape(why)}.<br><code>{html.escape(best.user_attrs.get('recipe_summary', ''))}</code></p>"
        f"<table id='chosen-scores'>{head}{''.join(rows)}</table>{intervals}{generations}{gate_table}{recipe}</section>"
    )


def _bound(gate: gate_record.TrialGate, stored: GateLimit | None) -> str:
    """The limit this trial was checked against: ``>= 0.4500`` (from the trial's own record)."""
    if gate.limit is None or gate.score is None:
        return gate_record.TRIAL_NOT_STORED
    # the direction: stored on the study, else implied by the signed margin
    higher = stored.higher_is_better if stored is not None else (gate.score - gate.limit) * gate.margin >= 0
    text = f"{'>=' if higher else '<='} {gate.limit:.4f}"
    if stored is not None and stored.reference is not None and stored.limit == gate.limit:
        text += f" (source {stored.reference} {stored.reference_score:.4f} {'-' if higher else '+'} {stored.setting:g})"
    return text


def _warm_table(view: StudyView, chosen: FrozenTrial) -> str:
    """With a warm start: the best warm trial (an enqueued recipe) against the chosen trial."""
    found = best_warm_trial(view.trials, view.directions)
    if found is None:
        return ""
    warm, count = found
    rows = [
        f"<tr><td>{html.escape(name)}</td><td>{trial.number}</td>{_cell(objective_value(view, trial))}</tr>"
        for name, trial in ((f"best of {count} warm trial(s): {warm.user_attrs[WARM_ATTR]}", warm),
                            ("chosen", chosen))
    ]
    return ("<table id='warm-start'><tr><th>warm start</th><th>trial</th><th>search objective</th></tr>"
            f"{''.join(rows)}</table>")


def _download_link(recipe_text: str) -> str:
    """A link that saves the YAML as ``recipe.yaml``: a data URI, so it works offline too."""
    data = base64.b64encode(recipe_text.encode("utf-8")).decode("ascii")
    return (f"<a id='download-recipe' download='{RECIPE_FILENAME}' href='data:application/yaml;base64,{data}'>"
            f"Download {RECIPE_FILENAME}</a> (its header says how to run <code>mergekit-yaml</code>; "
            "model paths are as <code>search report</code> wrote them: relative to this report's folder "
            "unless it was given <code>--model-name</code> / <code>--model-root</code>)")


def _cell(value: float | None) -> str:
    return "<td class='muted'>-</td>" if value is None else f"<td>{float(value):.4f}</td>"


def _margin(value: float | None) -> str:
    if value is None:
        return "<td class='muted'>-</td>"
    mark = "pass" if value >= 0 else "fail"
    return f"<td class='{mark}'>{value:+.4f} {mark}</td>"
