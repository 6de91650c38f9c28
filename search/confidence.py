"""How sure the reported numbers are: 95% intervals from the stored per-row results.

Every trial is scored on the same rows (``search.records``), so the chosen recipe and a
baseline are compared *paired* (``fitness.intervals``: a bootstrap over rows, each task's
rows drawn independently, the same draw for both). What finalize, ``search status``, the
report and the chosen trial's note show:

* each held-out score (the objective and every task) with its 95% interval;
* the chosen recipe's gain over the best baseline on held-out (the baseline with the best
  held-out objective), with a paired 95% interval; positive is better in the objective's
  direction;
* the search - held-out gap of the objective (positive: worse on held-out).

The objective is computed on *signed* rows (a lower-is-better task's rows negated), so
"larger is better" everywhere, as ``search.ranking.score`` does; intervals are shown back
in the objective's own units. ``per_task`` studies: the interval is of the mean of the
signed task scores (the number finalize ranks by).

A task whose score is not the mean of its rows has no interval: ``perplexity`` (the corpus
perplexity), an lm-eval task whose metric lm-eval aggregates otherwise than by its ``mean``
(corpus ``bleu``, ``f1``, perplexities: the reason names the metric and its aggregation, as
the study recorded them with its document split, ``search.lm_eval_splits``). lm-eval tasks
averaged by ``mean`` keep one value per document (``fitness.lm_eval_task``) and get intervals
like any task. Then the objective has none either and the text says why. Light: numpy, no torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fitness.errors import FitnessError
from fitness.intervals import Interval, objective_difference_interval, objective_interval, prefer
from search import ranking
from search.definition import DEFINITION_KEY
from search.lm_eval_splits import stored_splits
from search.records import heldout_record, trial_rows
from search.test_split import NO_TEST_SPLIT, read_test_record, read_test_state, record_rows

if TYPE_CHECKING:  # status imports this module without optuna (issue 12)
    from optuna.trial import FrozenTrial

NOT_A_MEAN = ("perplexity",)
"""Built-in metrics whose task score is not the mean of the rows' values."""
RULE = ("a finalist is preferred over the best-on-search finalist only when its held-out "
        "objective is better by more than noise (the paired 95% interval of the difference "
        "excludes 0); the final trial is the best on held-out among those, else the "
        "best-on-search finalist")
"""The finalist rule (``search.finalize``), said in finalize's table, the README and the note."""
FINAL_CHOICE_ATTR = "final_choice"
"""Study user attribute: how finalize chose (``{"trial", "how", "peeked"}``; peeked: held-out
scores, beyond the gates, decided the choice, so the held-out score is optimistic)."""


@dataclass(frozen=True)
class ObjectiveRule:
    """How a study's objective is made from its task scores (from the stored definition)."""

    objective: str  # "mean" | "min" | "per_task"
    tasks: tuple[str, ...]
    higher: dict[str, bool]  # task -> higher is better
    weights: dict[str, float] | None  # "mean": task weights
    no_interval: dict[str, str]  # task -> why its score has no interval

    @property
    def maximize(self) -> bool:
        """The single objective's direction (``per_task``: the signed mean, larger is better)."""
        return self.objective == "per_task" or self.higher[self.tasks[0]]

    def signed(self, rows: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """The rows of every task, lower-is-better ones negated; None when a task lacks them."""
        if any(task not in rows for task in self.tasks):
            return None
        return {task: rows[task] if self.higher[task] else -rows[task] for task in self.tasks}

    def aggregation(self) -> tuple[str, dict[str, float] | None]:
        if self.objective == "per_task":
            return "mean", None
        return self.objective, self.weights

    def shown(self, interval: Interval) -> Interval:
        """A signed interval in the objective's own units."""
        if self.maximize:
            return interval
        return Interval(-interval.estimate, -interval.high, -interval.low, interval.confidence)


def objective_rule(study_user_attrs: Mapping[str, object], directions: Sequence[str]) -> ObjectiveRule | None:
    """The objective of a study from its stored definition; None for a study stored without one."""
    definition = study_user_attrs.get(DEFINITION_KEY)
    if not isinstance(definition, Mapping) or not isinstance(definition.get("tasks"), Mapping):
        return None
    specs = definition["tasks"]
    objective = str(definition.get("objective", "mean"))
    tasks = tuple(str(t) for t in specs)
    if objective == "per_task":
        if len(directions) != len(tasks):
            return None
        higher = {t: d == "maximize" for t, d in zip(tasks, directions, strict=True)}
    else:
        higher = {t: directions[0] == "maximize" for t in tasks}
    weights = {t: float(specs[t].get("weight", 1.0)) for t in tasks} if objective == "mean" else None
    no_interval: dict[str, str] = {}
    for task in tasks:
        metric = str(specs[task].get("metric", ""))
        if metric in NOT_A_MEAN:
            no_interval[task] = f"task {task!r}: its {metric} is not a mean over rows"
        elif specs[task].get("lm_eval") is not None and (reason := _lm_eval_reason(task, study_user_attrs)):
            no_interval[task] = reason
    return ObjectiveRule(objective, tasks, higher, weights, no_interval)


def _lm_eval_reason(task: str, study_user_attrs: Mapping[str, object]) -> str | None:
    """Why an lm-eval task has no interval (its metric is not averaged); None when it has one or
    its split was recorded before aggregations were (then only its stored rows tell)."""
    try:
        split = stored_splits(study_user_attrs).get(task)
    except FitnessError as exc:  # a malformed record, named
        return f"task {task!r}: {exc}"
    return None if split is None else split.no_rows_reason(task)


def heldout_interval(rule: ObjectiveRule, rows: Mapping[str, np.ndarray] | None) -> Interval | None:
    """The objective's interval on one trial's rows, signed (larger is better); None without rows."""
    signed = None if rows is None or rule.no_interval else rule.signed(rows)
    if signed is None:
        return None
    objective, weights = rule.aggregation()
    return objective_interval(signed, objective=objective, weights=weights, higher_is_better=True)


def difference(rule: ObjectiveRule, a: Mapping[str, np.ndarray] | None,
               b: Mapping[str, np.ndarray] | None) -> Interval | None:
    """The paired interval of objective(a) - objective(b), signed (positive: a is better)."""
    if a is None or b is None or rule.no_interval:
        return None
    signed_a, signed_b = rule.signed(a), rule.signed(b)
    if signed_a is None or signed_b is None or any(len(signed_a[t]) != len(signed_b[t]) for t in rule.tasks):
        return None
    objective, weights = rule.aggregation()
    return objective_difference_interval(signed_a, signed_b, objective=objective, weights=weights,
                                         higher_is_better=True)


def preferred(rule: ObjectiveRule, a: Mapping[str, np.ndarray] | None, b: Mapping[str, np.ndarray] | None) -> bool:
    """Whether a is better than b by more than noise (``fitness.intervals.prefer``)."""
    interval = difference(rule, a, b)
    return interval is not None and prefer(interval)


@dataclass(frozen=True)
class Confidence:
    """The chosen trial's held-out numbers with their intervals (see the module docstring)."""

    trial: int
    heldout: Interval | None  # the objective, in its own units
    tasks: dict[str, Interval]  # each task's held-out score
    baseline: str | None  # the best baseline on held-out
    gain: Interval | None  # chosen - best baseline, signed (positive: better)
    gap: float | None  # search - held-out, signed objective (positive: worse on held-out)
    missing: str  # why there are no intervals ("" when there are)


def chosen_confidence(trials: Sequence[FrozenTrial], user_attrs: Mapping[str, object],
                      directions: Sequence[str]) -> Confidence | None:
    """The final trial's held-out intervals, gain over the best baseline and gap; None before finalize."""
    final = ranking.final_number(user_attrs)
    if not isinstance(final, int) or final >= len(trials):
        return None
    chosen = trials[final]
    record = heldout_record(user_attrs, final)
    rule = objective_rule(user_attrs, directions)
    if record is None or rule is None:
        return None
    rows = trial_rows(chosen, user_attrs, "heldout")
    missing = ""
    if rule.no_interval:
        missing = "; ".join(rule.no_interval.values())
    elif rows is None or rule.signed(rows) is None:
        missing = "no per-row held-out results stored (finalized before they were kept)"
    signed_heldout = _signed_objective(rule, record.scores)
    gap = None if signed_heldout is None else ranking.score(chosen, directions) - signed_heldout
    heldout = heldout_interval(rule, rows)
    tasks = {}
    if rows is not None:
        for task in rule.tasks:
            if task in rows and task not in rule.no_interval:
                tasks[task] = objective_interval({task: rows[task]}, objective="mean")
    best = best_baseline(trials, user_attrs, rule)
    best_rows = None if best is None else trial_rows(best[1], user_attrs, "heldout")
    gain = difference(rule, rows, best_rows)
    return Confidence(final, None if heldout is None else rule.shown(heldout), tasks,
                      None if best is None else best[0], gain, gap, missing)


def best_baseline(trials: Sequence[FrozenTrial], user_attrs: Mapping[str, object],
                  rule: ObjectiveRule) -> tuple[str, FrozenTrial] | None:
    """The baseline with the best held-out objective (what gains are measured against), by name."""
    best: tuple[str, FrozenTrial] | None = None
    best_value = None
    for name, trial in ranking.baseline_trials(trials).items():
        baseline = heldout_record(user_attrs, trial.number)
        value = None if baseline is None else _signed_objective(rule, baseline.scores)
        if value is not None and (best_value is None or value > best_value):
            best, best_value = (name, trial), value
    return best


def _signed_objective(rule: ObjectiveRule, scores: Mapping[str, float]) -> float | None:
    """The signed objective (larger is better) from task scores, as finalize ranks."""
    if any(task not in scores for task in rule.tasks):
        return None
    signed = {task: float(scores[task]) if rule.higher[task] else -float(scores[task]) for task in rule.tasks}
    if rule.objective == "min":
        return min(signed.values())
    if rule.objective == "mean" and rule.weights:
        total = sum(rule.weights.values())
        return sum(rule.weights[t] * signed[t] for t in rule.tasks) / total
    return sum(signed.values()) / len(signed)


def confidence_lines(trials: Sequence[FrozenTrial], user_attrs: Mapping[str, object],
                     directions: Sequence[str]) -> list[str]:
    """Plain-text lines (status, report, note): the chosen trial's held-out numbers with 95%
    intervals, its gain over the best baseline and the search - held-out gap, then its test
    numbers (:func:`test_lines`); [] before finalize."""
    found = chosen_confidence(trials, user_attrs, directions)
    if found is None:
        return test_lines(trials, user_attrs, directions)
    lines = [f"held-out confidence (trial {found.trial}, 95% paired bootstrap over rows):"]
    if found.heldout is not None:
        lines.append(f"  objective {_interval_text(found.heldout)}")
    if found.tasks:
        lines.append("  tasks: " + ", ".join(f"{t} {_interval_text(i)}" for t, i in found.tasks.items()))
    if found.gain is not None and found.baseline is not None:
        verdict = "more than noise" if prefer(found.gain) else (
            "worse by more than noise" if found.gain.high < 0 else "within noise")
        lines.append(f"  gain over the best baseline ({found.baseline}): {_interval_text(found.gain, sign=True)}"
                     f" ({verdict})")
    if found.gap is not None:
        lines.append(f"  search - held-out gap: {found.gap:+.4f} (positive: worse on held-out)")
    choice = user_attrs.get(FINAL_CHOICE_ATTR)
    if isinstance(choice, Mapping) and choice.get("trial") == found.trial:
        honest = ("held-out scores chose it, so its held-out score is optimistic" if choice.get("peeked") else
                  "held-out was used only by the gates, so its held-out score is not inflated by the choice")
        lines.append(f"  chosen: {choice.get('how')}; {honest}")
    if found.missing:
        lines.append(f"  no intervals: {found.missing}")
    return lines + test_lines(trials, user_attrs, directions)


def test_lines(trials: Sequence[FrozenTrial], user_attrs: Mapping[str, object],
               directions: Sequence[str]) -> list[str]:
    """The final trial's test-split numbers (``search.test_split``): the objective and each task
    with 95% intervals, the gain over the best baseline on test, the search -> held-out -> test
    path; one line "no test split" for a finalized study without one; [] before finalize."""
    final = ranking.final_number(user_attrs)
    if not isinstance(final, int) or final >= len(trials):
        return []
    state = read_test_state(user_attrs)
    if state is None or state.get("trial") != final:
        return [f"test: {NO_TEST_SPLIT}" if state is None else
                f"test: not scored for final trial {final} (run `search finalize`)"]
    rule = objective_rule(user_attrs, directions)
    record = read_test_record(user_attrs, final)
    if record is None:
        return [f"test: scoring trial {final} on the test split failed: {state.get('error') or 'no record'}"]
    if rule is None:  # a study stored without its definition: the scores, no objective or interval
        return [f"test split (trial {final}, scored once after the choice): "
                + ", ".join(f"{task} {score:.4f}" for task, score in record.scores.items())]
    lines = [f"test split (trial {final}, scored once after the choice; no choice looked at it; "
             "95% paired bootstrap over rows):"]
    rows = record_rows(record)
    signed_test = _signed_objective(rule, record.scores)
    interval = heldout_interval(rule, rows)
    if interval is not None:
        lines.append(f"  objective {_interval_text(rule.shown(interval))}")
    elif signed_test is not None:
        shown = signed_test if rule.maximize else -signed_test
        lines.append(f"  objective {shown:.4f} (no interval: " + (
            "; ".join(rule.no_interval.values()) or "no per-row values stored") + ")")
    if rows is not None:
        tasks = [f"{t} {_interval_text(objective_interval({t: rows[t]}, objective='mean'))}"
                 for t in rule.tasks if t in rows and t not in rule.no_interval]
        if tasks:
            lines.append("  tasks: " + ", ".join(tasks))
    baseline_trial = state.get("baseline_trial")
    baseline = None if not isinstance(baseline_trial, int) else read_test_record(user_attrs, baseline_trial)
    if baseline is not None:
        gain = difference(rule, rows, record_rows(baseline))
        name = state.get("baseline")
        if gain is not None:
            verdict = "more than noise" if prefer(gain) else (
                "worse by more than noise" if gain.high < 0 else "within noise")
            lines.append(f"  gain over the best baseline on held-out ({name}), on test: "
                         f"{_interval_text(gain, sign=True)} ({verdict})")
        else:
            base_value = _signed_objective(rule, baseline.scores)
            if base_value is not None and signed_test is not None:
                lines.append(f"  gain over the best baseline on held-out ({name}), on test: "
                             f"{signed_test - base_value:+.4f} (no interval)")
    held = heldout_record(user_attrs, final)
    signed_held = None if held is None else _signed_objective(rule, held.scores)
    if signed_test is not None and signed_held is not None:
        search = ranking.score(trials[final], directions)
        lines.append(f"  search -> held-out -> test (signed, larger is better): {search:.4f} -> {signed_held:.4f} -> "
                     f"{signed_test:.4f}; gap search - test {search - signed_test:+.4f}, held-out - test "
                     f"{signed_held - signed_test:+.4f} (positive: worse on test)")
    if state.get("error"):
        lines.append(f"  failed: {state.get('error')}")
    return lines


def _interval_text(interval: Interval, *, sign: bool = False) -> str:
    form = "+.4f" if sign else ".4f"
    return f"{interval.estimate:{form}} [{interval.low:{form}}, {interval.high:{form}}]"
