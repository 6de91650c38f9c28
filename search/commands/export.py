"""``search export STUDY -o recipe.yaml``: the chosen recipe as a mergekit YAML."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path

from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from merges.output import Protected, check_file_target, check_output_folder, write_file
from merges.recipe import Recipe
from search import ranking, storage
from search.commands import SUMMARIES, add_study_arguments
from search.config import StudyConfig, load_study
from search.errors import SearchError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help=SUMMARIES["export"],
        description=(
            "Write a trial's recipe as a mergekit config: after `search finalize` the final trial, "
            "before it the best feasible trial on the search split, or --trial N. The header "
            "comments give the study, trial, seed, scores on the search and held-out slices and "
            "the gates. `mergekit-yaml recipe.yaml OUT/` rebuilds the checkpoint the study scored."
        ),
    )
    add_study_arguments(parser)
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="FILE",
                        help="where to write the mergekit YAML")
    parser.add_argument("--trial", type=int, default=None, metavar="N",
                        help="export trial N instead of the final / best feasible one")
    parser.add_argument("--materialize", type=Path, default=None, metavar="DIR",
                        help="also merge and save the checkpoint (safetensors + config + tokenizer) to DIR "
                             "(new or empty)")
    parser.add_argument("--overwrite", action="store_true",
                        help="let --materialize replace DIR if it holds a previous output of mergesearch "
                             "(never other files)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from merges.checkpoint import open_checkpoint
    from merges.mergekit_yaml import recipe_to_mergekit
    from merges.preflight import preflight

    config = load_study(args.study, out=args.out)
    study = storage.load_existing_study(config.name, config.storage)
    trial = choose_trial(study.get_trials(deepcopy=False), study.user_attrs, study.directions, args.trial)
    recipe = Recipe.from_dict(trial.user_attrs["recipe"])
    models = config.models
    base = open_checkpoint(models.base, allow_pickle=models.allow_pickle)
    sources = [open_checkpoint(p, allow_pickle=models.allow_pickle) for p in models.sources.values()]
    layout = preflight(base, sources)
    text = recipe_to_mergekit(recipe, layout, header=export_header(config, study.user_attrs, trial))
    protected = _check_outputs(args, config)  # before writing anything
    write_file(args.output, text, signature=RECIPE_SIGNATURE)
    print(f"wrote {args.output} (trial {trial.number})")
    if args.materialize is not None:
        import torch

        from merges.engine import MergeEngine
        from merges.save import save_checkpoint

        engine = MergeEngine(base, sources, device="cpu", dtype=getattr(torch, models.dtype))
        tensors = engine.materialize(recipe)
        save_checkpoint(tensors, args.materialize, like=base, overwrite=args.overwrite, protected=protected)
        print(f"wrote the merged checkpoint to {args.materialize}")
    return 0


def choose_trial(trials: Sequence[FrozenTrial], user_attrs: Mapping[str, object],
                 directions: Sequence[StudyDirection], number: int | None) -> FrozenTrial:
    """``--trial N``, else the final trial, else the best feasible one."""
    if number is not None:
        matches = [t for t in trials if t.number == number]
        if not matches:
            raise SearchError(f"--trial {number}: no such trial (the study has trials 0..{len(trials) - 1})")
        trial = matches[0]
        if trial.state != TrialState.COMPLETE or "recipe" not in trial.user_attrs:
            raise SearchError(f"--trial {number}: trial is {trial.state.name}, it has no scored recipe")
        return trial
    final = user_attrs.get("final_trial")
    if isinstance(final, int):
        return next(t for t in trials if t.number == final)
    words = [d.name.lower() for d in directions]
    best = ranking.best_feasible(ranking.search_trials(trials), words)
    if best is None:
        names = user_attrs.get("gates", [])
        blocker = ranking.what_blocks(trials, list(names) if isinstance(names, list) else [])
        reason = blocker.describe() if blocker else "no completed search trial yet"
        raise SearchError(f"nothing to export: {reason} (use --trial N to export a specific trial)")
    return best


def export_header(config: StudyConfig, user_attrs: Mapping[str, object], trial: FrozenTrial) -> str:
    what = trial.user_attrs.get("baseline", "search trial")
    lines = [
        "mergesearch export",
        f"study: {config.name} ({config.path})",
        f"trial: {trial.number} ({what}); seed: {config.seed}",
        f"recipe: {trial.user_attrs.get('recipe_summary', '')}",
        "scores (search slices): " + _scores(trial.user_attrs.get("scores_search", {})),
    ]
    record = storage.heldout_record(user_attrs, trial.number)
    if record is None:
        lines.append("scores (held-out slices): not re-scored (run `search finalize`)")
    else:
        lines.append("scores (held-out slices): " + _scores(record.scores))
    lines.append("gates (search): " + _gates(trial.user_attrs.get("gate_margins", {})))
    if record is not None:
        lines.append("gates (held-out): " + _gates(record.gate_margins))
    return "\n".join(lines)


def _scores(scores: object) -> str:
    if not isinstance(scores, dict) or not scores:
        return "none"
    return ", ".join(f"{task} {float(v):.4f}" for task, v in scores.items())


def _gates(margins: object) -> str:
    if not isinstance(margins, dict) or not margins:
        return "none set"
    return ", ".join(
        f"{g} {'passed' if float(m) >= 0 else 'FAILED'} ({float(m):+.4f})" for g, m in margins.items()
    )


# The first line of every exported YAML: an existing -o FILE is replaced only if it has it.
RECIPE_SIGNATURE = "# mergesearch export"


def _check_outputs(args: argparse.Namespace, config: StudyConfig) -> list[Protected]:
    """Refuse a bad -o FILE or --materialize DIR up front; returns the folders DIR must spare."""
    output = check_file_target(args.output, signature=RECIPE_SIGNATURE)
    models = config.models
    protected = [
        Protected("study folder", config.path.parent),
        Protected("study output folder", config.output),
        Protected("base checkpoint", Path(models.base)),
        *(Protected(f"source checkpoint {label!r}", Path(p)) for label, p in models.sources.items()),
    ]
    if args.materialize is not None:
        folder = check_output_folder(args.materialize, overwrite=args.overwrite, protected=protected)
        if folder.resolve() in output.resolve().parents:
            raise SearchError(f"-o {args.output} is inside --materialize {args.materialize}; write it elsewhere")
    return protected
