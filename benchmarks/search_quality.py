"""Search quality (issue 15's target): the chosen recipe's score on rows no choice looked at.

For each seed, ``search start`` runs the study (default: the demo, ``studies/logistics/study.toml``)
three times, each in its own output folder under a temp dir:

* ``default_b``  — the study's own sampler with budget B (``--trials B``; default: the study's ``trials``),
* ``default_2b`` — the same sampler with budget 2B,
* ``random_b``   — random search (``--sampler random``) with budget B,

with ``--seed`` set to the seed (0, 1, ...). Each run ends with finalize, which chooses the
final recipe (search scores, then held-out) and only then scores it on the test split
(``search.test_split``). The figure is that test score: the objective in its own units
(``per_task`` studies: the mean of the direction-signed task scores). A study without a test
split is refused (its held-out score is what chose the recipe).

Each finished run prints its figure at once (stderr) and, with ``--runs FILE``, appends one JSON
line ``{"seed", "arm", "sampler", "test", "heldout", "trials_b", "trials", "wall_s", "study"}`` to
FILE, so a partial run is never lost and several invocations (other seeds, other arms, a candidate
default) combine: ``--combine FILE...`` runs nothing and prints the summary of those lines (for the
same seed, arm and sampler the later line wins; one arm's runs must share a sampler).
The last line is one JSON object, per arm in seed order::

    {"seeds_run": [...], "default_b": [...], "default_2b": [...], "random_b": [...],
     "heldout_default_b": [...], ..., "sampler_default_b": ["cmaes"], ...,
     "default_beats_random": "4/5", "mean_2b_minus_b": 0.02, "mean_default_b": ..., "seeds": 5}

    python benchmarks/search_quality.py [--study PATH] [--seeds 5 | --seed-list 1,2,3,4]
        [--arms default_b,default_2b,random_b] [--default-sampler gp] [--cma-lr-adapt] [--cma-sigma0 X]
        [--population N] [--trials B]
        [--runs runs.jsonl] [--keep DIR]
    python benchmarks/search_quality.py --combine runs.jsonl more.jsonl
    python benchmarks/search_quality.py --refinalize KEPT --keep COPIES [--seed-list ...] [--runs FILE]
        [--b-from-2b]
    python benchmarks/search_quality.py --screen-rules KEPT [--seed-list ...] [--screen-cache DIR]

``--default-sampler NAME`` runs the default arms with that sampler (a candidate default) instead
of the study's own; ``--cma-lr-adapt`` runs CMA-ES default arms with Optuna's learning-rate
adaptation (``search.samplers.CMA_LR_ADAPT`` set in each run's process; sampler ``cmaes+lr_adapt``
in the records); ``--cma-sigma0 X`` runs them with CMA-ES's initial step size X in the [0, 1]-normalised
space (``search.samplers.CMA_SIGMA0``; sampler ``cmaes+sigma0=X``); ``--population N`` runs them with
population N instead of the study file's (sampler ``cmaes+popN``). ``--refinalize`` of such studies
needs the same flags (the kept folders are named by the sampler).

Two modes search nothing and read the studies a ``--keep DIR`` run left (never writing them; a
study kept by another checkout gets its recipes' checkpoint paths pointed at this study's):

* ``--refinalize DIR`` finalizes a copy of each kept study with this checkout's finalize and
  reports its figures like a run (a candidate finalize rule on the very same searches); with
  ``--b-from-2b`` the ``default_b`` arm is the kept ``default_2b`` study cut to its first B
  search trials: a search draws each position from the trials before it alone (``search.samplers``),
  so those are the trials its B run draws and scores, and one 2B run gives both arms;
* ``--screen-rules DIR`` scores the ``--screen-top`` (12) best feasible search trials of each kept
  ``default_b`` / ``default_2b`` study on held-out and test (``--screen-cache DIR`` keeps those
  rows for a rerun) and prints one JSON object: per finalize rule (``SCREEN_RULES``) choosing
  among the top 5 and the top 12, the test objective of its pick per arm and seed, the means and
  2B - B, and the mean test objective of the search's best 1, 3, 5 and 12. Test rows only
  measure the rules here; ``oracle`` (the best test score) is the ceiling
  of any choice among those trials. Every run is a separate ``python -m search.cli start`` process (nothing
shared between runs). Issue 15's target: default beats random at equal budget in >= 4 of 5
seeds, and 2B's mean test score is >= 0.02 above B's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO_STUDY = ROOT / "studies" / "logistics" / "study.toml"
ARMS = ("default_b", "default_2b", "random_b")
POPULATION_PATCH = ("import dataclasses; import search.config as config; import search.commands.start as start; "
                    "_load = config.load_study; "
                    "load = lambda *a, **k: dataclasses.replace(_load(*a, **k), population={population}); "
                    "config.load_study = start.load_study = load; ")
"""Run-process code that makes every study file read say ``population = N`` (``--population``)."""


def candidate_patches(lr_adapt: bool, population: int | None, sigma0: float | None = None) -> str:
    """Run-process code (after ``import sys``) that sets a candidate default: CMA-ES's learning-rate
    adaptation (``--cma-lr-adapt``: ``search.samplers.CMA_LR_ADAPT``), its initial step size
    (``--cma-sigma0``: ``search.samplers.CMA_SIGMA0``), the study file's population overridden
    (``--population``: the study's definition records it)."""
    code = ""
    if lr_adapt or sigma0 is not None:
        code += "import search.samplers as samplers; "
    if lr_adapt:
        code += "samplers.CMA_LR_ADAPT = True; "
    if sigma0 is not None:
        code += f"samplers.CMA_SIGMA0 = {float(sigma0)!r}; "
    if population is not None:
        code += POPULATION_PATCH.format(population=population)
    return code


def start_entry(lr_adapt: bool, population: int | None, sigma0: float | None = None) -> list[str]:
    """How a run starts ``search start``: ``-m search.cli``, or a one-line driver that first sets a
    candidate default (:func:`candidate_patches`)."""
    patches = candidate_patches(lr_adapt, population, sigma0)
    if not patches:
        return ["-m", "search.cli"]
    return ["-c", "import sys; " + patches + "from search.cli import main; sys.exit(main(sys.argv[1:]))"]


def sampler_label(sampler: str, lr_adapt: bool, population: int | None, sigma0: float | None = None) -> str:
    """The records' sampler (and the kept folders' names): ``cmaes``, ``cmaes+lr_adapt``, ``cmaes+pop16``,
    ``cmaes+sigma0=0.25``."""
    return (sampler + ("+lr_adapt" if lr_adapt else "") + ("" if population is None else f"+pop{population}")
            + ("" if sigma0 is None else f"+sigma0={float(sigma0):g}"))


def arm_arguments(arm: str, budget: int, sampler: str) -> list[str]:
    """The ``search start`` overrides of one arm (``sampler``: the default arms' sampler)."""
    trials = 2 * budget if arm == "default_2b" else budget
    return ["--trials", str(trials), "--sampler", "random" if arm == "random_b" else sampler]


def final_scores(study_file: Path, out: Path) -> tuple[float, float]:
    """The final trial's (test, held-out) objective, read from the finished study."""
    import optuna

    from fitness.objective import objective_values
    from search import ranking
    from search.config import load_study
    from search.records import heldout_record
    from search.test_split import read_test_record, read_test_state

    config = load_study(study_file, out=out)
    study = optuna.load_study(study_name=config.name, storage=config.storage)
    attrs = study.user_attrs
    final = attrs.get(ranking.FINAL_TRIAL_ATTR)
    state = read_test_state(attrs)
    test = None if not isinstance(final, int) else read_test_record(attrs, final)
    held = None if not isinstance(final, int) else heldout_record(attrs, final)
    if test is None or held is None or state is None or state.get("trial") != final:
        raise SystemExit(f"{out}: no final trial scored on the test split (final trial: {final}, "
                         f"test state: {state})")

    def objective(scores: dict[str, float]) -> float:
        values = objective_values(scores, config.tasks, config.objective)
        if len(values) == 1:
            return float(values[0])
        signed = [v if d == "maximize" else -v
                  for v, d in zip(values, [d.name.lower() for d in study.directions], strict=True)]
        return sum(signed) / len(signed)

    return objective(test.scores), objective(held.scores)


def refinalize(study_file: Path, kept: Path, out: Path, seed: int, sampler: str, env: dict[str, str],
               budget: int | None = None, population: int | None = None, lr_adapt: bool = False,
               sigma0: float | None = None) -> None:
    """Finalize a copy (``out``) of a kept study with this checkout's finalize; the kept one is
    never written. ``search finalize`` takes no ``--seed`` or ``--sampler``, so a one-line driver
    passes them (the study's definition names the seed and sampler it ran). ``budget``: the copy
    keeps only the search trials at positions below it (:func:`truncate_search`); ``population``: the
    one the kept study ran with (``--population``; its definition is checked against the file's);
    ``lr_adapt``, ``sigma0``: set as in the kept run's process (finalize draws no genes; set all the same
    so the copy is finalized exactly as that run's own finalize was)."""
    if not (kept / "study.db").is_file():
        raise SystemExit(f"--refinalize: {kept} holds no study.db (run the arm with --keep first)")
    if out.exists():
        raise SystemExit(f"--refinalize: {out} exists (give another --keep folder)")
    shutil.copytree(kept, out)
    relocate_recipes(out / "study.db", load_study_family(study_file))
    if budget is not None:
        truncate_search(out / "study.db", budget)
    driver = ("import sys; " + candidate_patches(lr_adapt, population, sigma0)
              + "import search.config as config; from search.finalize import finalize_study; "
              "finalize_study(config.load_study(sys.argv[1], out=sys.argv[2], seed=int(sys.argv[3]), "
              "sampler=sys.argv[4]), quiet=True)")
    subprocess.run([sys.executable, "-c", driver, str(study_file), str(out), str(seed), sampler], check=True, env=env)


def truncate_search(database: Path, budget: int) -> None:
    """Delete a copied study's search trials at positions >= ``budget`` (they are its last
    trials: a run never interrupted numbers them in position order after the baselines) and
    the finalize and test records of the trials deleted; record the budget as the run's."""
    import sqlite3

    from search.samplers import POSITION

    with sqlite3.connect(database) as connection:
        cut = [number for number, trial_id in connection.execute(
            "SELECT t.number, t.trial_id FROM trials t JOIN trial_user_attributes a ON a.trial_id = t.trial_id "
            "WHERE a.key = ? AND CAST(a.value_json AS INTEGER) >= ?", (POSITION, budget))]
        total = connection.execute("SELECT COUNT(*) FROM trials").fetchone()[0]
        if not cut or sorted(cut) != list(range(total - len(cut), total)):
            raise SystemExit(f"{database}: positions >= {budget} are not the study's last trials (an interrupted run?)")
        tables = [name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                  if name != "trials" and any(column[1] == "trial_id" for column in
                                              connection.execute(f"PRAGMA table_info({name})"))]
        ids = "SELECT trial_id FROM trials WHERE number >= ?"
        for table in tables:
            connection.execute(f"DELETE FROM {table} WHERE trial_id IN ({ids})", (min(cut),))
        connection.execute("DELETE FROM trials WHERE number >= ?", (min(cut),))
        for number in cut:
            connection.execute("DELETE FROM study_user_attributes WHERE key IN (?, ?)",
                               (f"heldout:{number}", f"test:{number}"))
        run = json.loads(connection.execute("SELECT value_json FROM study_user_attributes WHERE key = 'run'").fetchone()[0])
        connection.execute("UPDATE study_user_attributes SET value_json = ? WHERE key = 'run'",
                           (json.dumps({**run, "budget": budget}),))


def load_study_family(study_file: Path) -> Path:
    """The folder holding the study's base checkpoint (the demo: its ``family/``)."""
    from search.config import load_study

    return Path(load_study(study_file).models.base).parent


def relocate_recipes(database: Path, family: Path) -> None:
    """Point a copied study's trial recipes at ``family`` (a study kept by another checkout
    names that checkout's checkpoint paths; the checkpoints are the same files, which the
    study's definition checks by fingerprint, not path)."""
    import sqlite3

    with sqlite3.connect(database) as connection:
        row = connection.execute("SELECT value_json FROM trial_user_attributes WHERE key = 'recipe' LIMIT 1").fetchone()
        if row is None:
            return
        old = Path(json.loads(row[0])["base"]).parent
        if old != family:
            connection.execute("UPDATE trial_user_attributes SET value_json = replace(value_json, ?, ?) "
                               "WHERE key = 'recipe'", (json.dumps(str(old) + "/")[:-1], json.dumps(str(family) + "/")[:-1]))


SCREEN_RULES = ("current", "heldout", "pooled", "pooled_gated", "oracle")
"""Finalize rules ``--screen-rules`` compares (see :func:`screen_choice`)."""


def screen_study(study_file: Path, kept: Path, seed: int, sampler: str, top: int, pool: object) -> dict:
    """The ``top`` best feasible search trials of a kept study (never written) with their search,
    held-out and test rows: held-out and test scored here where the study has none."""
    import optuna

    from search import ranking
    from search.config import load_study
    from search.pool import evaluate_all
    from search.records import trial_rows
    from search.test_split import TEST_SPLIT, read_test_record, record_rows

    config = load_study(study_file, out=kept, seed=seed, sampler=sampler)
    study = optuna.load_study(study_name=config.name, storage=f"sqlite:///{kept / 'study.db'}")
    trials, attrs = study.get_trials(deepcopy=False), study.user_attrs
    directions = [d.name.lower() for d in study.directions]
    search = ranking.search_trials(trials)
    best = ranking.top_feasible(search, directions, top)
    family = json.dumps(str(load_study_family(study_file)) + "/")[:-1]

    def recipe(trial: object) -> dict:  # a study kept by another checkout names its checkpoint paths
        text = json.dumps(trial.user_attrs["recipe"])
        old = json.dumps(str(Path(trial.user_attrs["recipe"]["base"]).parent) + "/")[:-1]
        return json.loads(text.replace(old, family))

    def rows(split: str, stored: dict[int, dict | None]) -> dict[int, dict]:
        todo = [t for t in best if stored.get(t.number) is None]
        for trial, outcome in zip(todo, evaluate_all(pool, [recipe(t) for t in todo], split), strict=True):
            if outcome.rows is None:
                raise SystemExit(f"{kept}: trial {trial.number} on {split}: {outcome.error or 'no per-row values'}")
            stored[trial.number] = {task: list(v) for task, v in outcome.rows.items()}
        return stored

    held = rows("heldout", {t.number: (None if (r := trial_rows(t, attrs, "heldout")) is None
                                       else {k: v.tolist() for k, v in r.items()}) for t in best})
    test = rows(TEST_SPLIT, {t.number: (None if (r := record_rows(read_test_record(attrs, t.number))) is None
                                        else {k: v.tolist() for k, v in r.items()}) for t in best})
    return {"n_search": len(search), "trials": [
        {"number": t.number, "search": {k: v.tolist() for k, v in trial_rows(t, attrs, "search").items()},
         "heldout": held[t.number], "test": test[t.number]} for t in best]}


def screen_choice(screened: dict, rule_name: str, k: int, objective: object) -> dict:
    """The trial a finalize rule picks among the top ``k`` (rows as :func:`screen_study` gives):

    * ``current``: ``search.finalize``'s rule (``search.confidence.RULE``; held-out gates not applied);
    * ``heldout``: the best held-out objective;
    * ``pooled``: the best objective over search and held-out rows together (twice the rows);
    * ``pooled_gated``: ``current``'s rule on those pooled rows: the best on search unless another
      finalist is better on them by more than noise (the paired 95% interval excludes 0), then the
      best pooled among those;
    * ``oracle``: the best *test* objective (no rule can know it: the ceiling of any choice).
    """
    import numpy as np

    from search.finalize import FinalistRow, _choose

    top = screened["trials"][:k]

    def value(rows: dict) -> float:
        return objective.of(rows)

    def pooled(t: dict) -> dict:
        return {task: t["search"][task] + t["heldout"][task] for task in t["search"]}

    if rule_name in ("current", "pooled_gated"):
        rows = (lambda t: t["heldout"]) if rule_name == "current" else pooled
        rule, make = objective.rule, (lambda r: {t: np.asarray(v, dtype=float) for t, v in r.items()})
        finalists = [FinalistRow(i, 0.0, value(rows(t)), True, ()) for i, t in enumerate(top)]
        chosen, _, _ = _choose(finalists, {i: make(rows(t)) for i, t in enumerate(top)}, rule)
        return top[chosen.trial]
    if rule_name == "heldout":
        return max(top, key=lambda t: value(t["heldout"]))
    if rule_name == "pooled":
        return max(top, key=lambda t: value(pooled(t)))
    return max(top, key=lambda t: value(t["test"]))


class SignedObjective:
    """The study objective of per-row values, signed (larger is better), as finalize ranks."""

    def __init__(self, rule: object) -> None:
        self.rule = rule

    def of(self, rows: dict) -> float:
        """The objective of stored rows (task -> list of values)."""
        import numpy as np

        return self({task: np.asarray(values, dtype=float) for task, values in rows.items()})

    def __call__(self, rows: dict) -> float:
        import numpy as np

        from fitness.intervals import aggregate

        signed = self.rule.signed(rows)
        objective, weights = self.rule.aggregation()
        return float(aggregate({t: np.array([v.mean()]) for t, v in signed.items()}, objective, weights, True)[0])


def screen_rules(study_file: Path, kept_dir: Path, seeds: list[int], sampler: str, top: int,
                 cache: Path | None) -> dict:
    """``--screen-rules``: per rule and number of finalists, the test objective of the pick per arm and seed."""
    import optuna

    from search import confidence
    from search.config import load_study
    from search.plan import worker_setup
    from search.pool import make_pool

    config = load_study(study_file)
    pool = None
    screened: dict[tuple[str, int], dict] = {}
    objective = None
    for arm in ("default_b", "default_2b"):
        for seed in seeds:
            kept = kept_dir / f"{arm}-{sampler}" / f"seed-{seed}"
            stored = None if cache is None else cache / f"{arm}-{sampler}-seed-{seed}.json"
            if stored is not None and stored.is_file():
                screened[(arm, seed)] = json.loads(stored.read_text())
            else:
                if not (kept / "study.db").is_file():
                    raise SystemExit(f"--screen-rules: {kept} holds no study.db (run the arm with --keep first)")
                pool = pool or make_pool(worker_setup(config), config.execution)
                screened[(arm, seed)] = screen_study(study_file, kept, seed, sampler, top, pool)
                if stored is not None:
                    stored.parent.mkdir(parents=True, exist_ok=True)
                    stored.write_text(json.dumps(screened[(arm, seed)]))
                print(f"screened {kept}", file=sys.stderr, flush=True)
            if objective is None:
                study = optuna.load_study(study_name=config.name, storage=f"sqlite:///{kept / 'study.db'}")
                rule = confidence.objective_rule(study.user_attrs, [d.name.lower() for d in study.directions])
                objective = SignedObjective(rule)
    result: dict = {"seeds": seeds, "top": top}
    for rule_name in SCREEN_RULES:
        for k in (5, top):
            picks = {arm: [round(objective.of(screen_choice(screened[(arm, s)], rule_name, k, objective)["test"]), 6)
                           for s in seeds] for arm in ("default_b", "default_2b")}
            gain = sum(b2 - b for b, b2 in zip(picks["default_b"], picks["default_2b"], strict=True)) / len(seeds)
            result[f"{rule_name}_top{k}"] = {**picks, "mean_default_b": round(sum(picks["default_b"]) / len(seeds), 6),
                                            "mean_default_2b": round(sum(picks["default_2b"]) / len(seeds), 6),
                                            "mean_2b_minus_b": round(gain, 6)}
    # how good the search's own ranking is: the mean test objective of its best k trials
    result["mean_test_of_search_top"] = {
        arm: {k: round(sum(sum(objective.of(t["test"]) for t in screened[(arm, s)]["trials"][:k]) / k
                           for s in seeds) / len(seeds), 6) for k in (1, 3, 5, top)}
        for arm in ("default_b", "default_2b")}
    if pool is not None:
        pool.close()
    return result


def read_runs(paths: list[Path]) -> list[dict]:
    """Per-run records from JSON-lines files (later lines win for the same seed, arm and sampler)."""
    runs: dict[tuple[int, str, str], dict] = {}
    for path in paths:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                run = json.loads(line)
                runs[(int(run["seed"]), str(run["arm"]), str(run["sampler"]))] = run
            except (ValueError, KeyError, TypeError) as error:
                raise SystemExit(f"{path}:{number}: not a run record ({error})") from None
    return [runs[key] for key in sorted(runs)]


def summarise(runs: list[dict]) -> dict:
    """The one-line summary: per arm, the test (and held-out) objectives in seed order."""
    seeds = sorted({run["seed"] for run in runs})
    for arm in ARMS:
        samplers = sorted({run["sampler"] for run in runs if run["arm"] == arm})
        if len(samplers) > 1:  # two candidates' runs in one summary would mix their figures
            raise SystemExit(f"arm {arm}: runs of several samplers ({', '.join(samplers)}); combine each apart")
    by = {(run["seed"], run["arm"]): run for run in runs}
    summary: dict = {"seeds_run": seeds}
    for arm in ARMS:
        summary[arm] = [by[(s, arm)]["test"] for s in seeds if (s, arm) in by]
        summary[f"seeds_{arm}"] = [s for s in seeds if (s, arm) in by]
    for arm in ARMS:
        summary[f"heldout_{arm}"] = [by[(s, arm)]["heldout"] for s in seeds if (s, arm) in by]
    for arm in ARMS:
        summary[f"sampler_{arm}"] = sorted({by[(s, arm)]["sampler"] for s in seeds if (s, arm) in by})
    paired = [s for s in seeds if (s, "default_b") in by and (s, "random_b") in by]
    summary["default_beats_random"] = f"{sum(by[(s, 'default_b')]['test'] > by[(s, 'random_b')]['test'] for s in paired)}/{len(paired)}"
    both = [s for s in seeds if (s, "default_b") in by and (s, "default_2b") in by]
    if both:
        gain = sum(by[(s, "default_2b")]["test"] - by[(s, "default_b")]["test"] for s in both) / len(both)
        summary["mean_2b_minus_b"] = round(gain, 6)
    for arm in ARMS:
        values = summary[arm]
        summary[f"mean_{arm}"] = round(sum(values) / len(values), 6) if values else None
    summary["trials_b"] = sorted({run["trials_b"] for run in runs})
    summary["study"] = sorted({run["study"] for run in runs})
    summary["seeds"] = len(seeds)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, default=DEMO_STUDY)
    parser.add_argument("--seeds", type=int, default=5, help="run seeds 0 .. N-1 (unless --seed-list)")
    parser.add_argument("--seed-list", default=None, help="comma-separated seeds to run, e.g. 1,2,3,4")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated arms to run (of {', '.join(ARMS)})")
    parser.add_argument("--default-sampler", default=None,
                        help="sampler of the default arms (a candidate default; default: the study's own)")
    parser.add_argument("--cma-lr-adapt", action="store_true",
                        help="CMA-ES default arms with learning-rate adaptation (a candidate default)")
    parser.add_argument("--cma-sigma0", type=float, default=None, metavar="X",
                        help="CMA-ES default arms with initial step size X in the [0, 1]-normalised space "
                             "(a candidate; default: Optuna's 1/6)")
    parser.add_argument("--population", type=int, default=None,
                        help="CMA-ES / NSGA-II default arms with this population instead of the study's (a candidate)")
    parser.add_argument("--trials", type=int, default=None, help="budget B (default: the study's trials)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the studies in this folder (default: a temp dir)")
    parser.add_argument("--runs", type=Path, default=None,
                        help="append each finished run as one JSON line to this file (a partial run is never lost)")
    parser.add_argument("--combine", type=Path, nargs="+", default=None,
                        help="run nothing: print the summary of these --runs files (several invocations' runs)")
    parser.add_argument("--refinalize", type=Path, default=None,
                        help="search nothing: finalize (with this checkout's finalize) a copy of each study a "
                             "--keep DIR holds, and report those figures (a finalize rule on the same searches)")
    parser.add_argument("--screen-rules", type=Path, default=None, metavar="KEEP_DIR",
                        help="search nothing: score the best trials of the kept default_b / default_2b studies "
                             "on held-out and test, and print the test objective each finalize rule picks")
    parser.add_argument("--b-from-2b", action="store_true",
                        help="--refinalize: the default_b arm from the kept default_2b study's first B search trials")
    parser.add_argument("--screen-top", type=int, default=12, help="--screen-rules: how many best trials (default 12)")
    parser.add_argument("--screen-cache", type=Path, default=None,
                        help="--screen-rules: keep each study's scored rows here (a rerun reads them)")
    args = parser.parse_args()

    if args.combine:
        print(json.dumps(summarise(read_runs(args.combine))))
        return

    from search.config import load_study
    from search.test_split import has_test_split

    arms = [arm.strip() for arm in args.arms.split(",") if arm.strip()]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"--arms: unknown {', '.join(unknown)} (known: {', '.join(ARMS)})")
    seeds = ([int(s) for s in args.seed_list.split(",") if s.strip()] if args.seed_list
             else list(range(args.seeds)))
    config = load_study(args.study, sampler=args.default_sampler)
    if not has_test_split(config.tasks):
        raise SystemExit(f"{args.study}: no test split (set `test` on every task); the held-out score chose the recipe")
    if args.screen_rules is not None:
        print(json.dumps(screen_rules(args.study, args.screen_rules, seeds, config.sampler, args.screen_top,
                                      args.screen_cache)), flush=True)
        return
    if args.cma_lr_adapt and config.sampler != "cmaes":
        raise SystemExit(f"--cma-lr-adapt: the default arms' sampler is {config.sampler}, not cmaes")
    if args.cma_sigma0 is not None and (config.sampler != "cmaes" or not args.cma_sigma0 > 0):
        raise SystemExit(f"--cma-sigma0: {args.cma_sigma0} for sampler {config.sampler} (cmaes, > 0)")
    if args.population is not None and (config.sampler not in ("cmaes", "nsga2") or args.population < 2):
        raise SystemExit(f"--population: {args.population} for sampler {config.sampler} (cmaes or nsga2, >= 2)")
    if args.b_from_2b and args.refinalize is None:
        raise SystemExit("--b-from-2b: only with --refinalize (it reads kept default_2b studies)")
    budget = args.trials or config.trials
    work = args.keep or Path(tempfile.mkdtemp(prefix="search-quality-"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    runs: list[dict] = []
    for seed in seeds:
        for arm in arms:
            sampler = "random" if arm == "random_b" else config.sampler
            lr_adapt = args.cma_lr_adapt and arm != "random_b"
            population = None if arm == "random_b" else args.population
            sigma0 = None if arm == "random_b" else args.cma_sigma0
            label = sampler_label(sampler, lr_adapt, population, sigma0)
            out = work / f"{arm}-{label}" / f"seed-{seed}"
            started = time.perf_counter()
            kept = None if args.refinalize is None else args.refinalize / out.relative_to(work)
            cut = args.b_from_2b and arm == "default_b"
            if cut:
                kept = args.refinalize / f"default_2b-{label}" / f"seed-{seed}"
            if kept is not None:
                refinalize(args.study, kept, out, seed, sampler, env, budget if cut else None, population,
                           lr_adapt, sigma0)
            else:
                command = [sys.executable, *start_entry(lr_adapt, population, sigma0), "start", str(args.study), "--out", str(out),
                           "--seed", str(seed), "--quiet", *arm_arguments(arm, budget, sampler)]
                subprocess.run(command, check=True, env=env)
            test, held = final_scores(args.study, out)
            wall = time.perf_counter() - started
            run = {"seed": seed, "arm": arm, "sampler": label, "test": round(test, 6), "heldout": round(held, 6),
                   "trials_b": budget, "trials": 2 * budget if arm == "default_2b" else budget,
                   "wall_s": round(wall, 1), "study": str(args.study)}
            if kept is not None:
                run["refinalized"] = str(kept) + (f" (its first {budget} search trials)" if cut else "")
            runs.append(run)
            if args.runs is not None:
                with args.runs.open("a") as stream:
                    stream.write(json.dumps(run) + "\n")
            print(f"seed {seed} {arm} ({label}): test {test:.4f}, held-out {held:.4f} ({wall:.0f} s)",
                  file=sys.stderr, flush=True)
    print(json.dumps(summarise(runs)), flush=True)


if __name__ == "__main__":
    main()
