"""``search export STUDY -o recipe.yaml``: the chosen recipe as a mergekit YAML another machine can run.

Model paths: mergekit 0.1.5 resolves a relative model path against the folder it runs in
(``ModelReference.local_path``: a path that exists there is read, any other name is fetched
from the Hugging Face Hub). So the export writes every model relative to the folder that
holds the YAML (or as the name the team uses: ``--model-name LABEL=NAME``, or
``--model-root ROOT``) and its header says to run ``mergekit-yaml`` from that folder.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from merges.lora import map_reference, reference_folders
from merges.output import Protected, check_file_target, check_output_folder, write_file
from merges.recipe import Recipe
from search import gate_record, ranking, storage
from search.commands import SUMMARIES, add_study_arguments
from search.config import StudyConfig, load_study
from search.errors import SearchError
from search.test_split import read_test_record

if TYPE_CHECKING:
    from merges.layout import Layout

BASE_LABEL = "base"  # --model-name's name for the base checkpoint (a reserved source label)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help=SUMMARIES["export"],
        description=(
            "Write a trial's recipe as a mergekit config: after `search finalize` the final trial, "
            "before it the best feasible trial on the search split, or --trial N (Optuna's trial "
            "number, as status and the dashboard show it). The header comments give the study, "
            "trial, seed, scores on the search and held-out slices, the gates, and the folder to "
            "run `mergekit-yaml` from. Model paths are written relative to the YAML's folder "
            "unless --model-name / --model-root give the names your team uses. Exporting an "
            "infeasible or unfinalised trial prints a WARNING and says so in the header."
        ),
    )
    add_study_arguments(parser)
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="FILE",
                        help="where to write the mergekit YAML")
    parser.add_argument("--trial", type=int, default=None, metavar="N",
                        help="export trial N instead of the final / best feasible one")
    add_model_name_arguments(parser)
    parser.add_argument("--materialize", type=Path, default=None, metavar="DIR",
                        help="also merge and save the checkpoint (safetensors + config + tokenizer) to DIR "
                             "(new or empty)")
    parser.add_argument("--overwrite", action="store_true",
                        help="let --materialize replace DIR if it holds a previous output of mergesearch "
                             "(never other files)")
    parser.set_defaults(func=run)


def add_model_name_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model-name`` / ``--model-root``: how the YAML names the models (export and report)."""
    parser.add_argument(
        "--model-name", action="append", default=[], metavar="LABEL=NAME",
        help="write model LABEL (`base` or a models.sources label) as NAME: a Hugging Face Hub id "
             "(org/model), an absolute path, or a path relative to the YAML's folder (write it as "
             "./a/b: mergekit takes a/b for a possible Hub id); repeatable",
    )
    parser.add_argument(
        "--model-root", default=None, metavar="ROOT",
        help="write every model not named by --model-name as ROOT/<its folder name> "
             "(ROOT absolute, or relative to the YAML's folder)",
    )


def run(args: argparse.Namespace) -> int:
    from merges.preflight import open_and_preflight

    config = load_study(args.study, out=args.out)
    study = storage.load_existing_study(config.name, config.storage)
    trial = choose_trial(study.get_trials(deepcopy=False), study.user_attrs, study.directions, args.trial)
    models = config.models
    base, sources, layout = open_and_preflight(models.base, list(models.sources.values()),
                                               allow_pickle=models.allow_pickle, tokenizer=models.tokenizer_policy(),
                                               trust_remote_code=models.trust_remote_code)
    protected = _check_outputs(args, config)  # before writing anything
    names = parse_model_names(args.model_name, config)
    warnings = export_warnings(study, trial)
    text = export_text(config, study, trial, layout, yaml_path=args.output, names=names,
                       model_root=args.model_root, warnings=warnings)
    write_file(args.output, text, signature=RECIPE_SIGNATURE)
    for warning in warnings:
        print(f"WARNING: {warning}", file=sys.stderr)
    print(f"wrote {args.output} (trial {trial.number})")
    if args.materialize is not None:
        import torch

        from merges.engine import MergeEngine
        from merges.save import save_checkpoint

        engine = MergeEngine(base, sources, device="cpu", dtype=getattr(torch, models.dtype))
        tensors = engine.materialize(Recipe.from_dict(trial.user_attrs["recipe"]))
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
        if trial.state == TrialState.PRUNED and "fidelity" in trial.user_attrs:  # search.staged.FIDELITY_ATTR
            raise SearchError(f"--trial {number}: trial was stopped early by multi-fidelity scoring (scored on "
                              "part of the search rows only); export a trial scored on every row")
        if trial.state != TrialState.COMPLETE or "recipe" not in trial.user_attrs:
            raise SearchError(f"--trial {number}: trial is {trial.state.name}, it has no scored recipe")
        return trial
    best = ranking.chosen_trial(trials, user_attrs, [d.name.lower() for d in directions])
    if best is None:
        blocker = ranking.what_blocks(trials, gate_record.read_study_gates(user_attrs).names)
        reason = blocker.describe() if blocker else "no completed search trial yet"
        raise SearchError(f"nothing to export: {reason} (use --trial N to export a specific trial)")
    return best


def export_warnings(study: optuna.Study, trial: FrozenTrial) -> list[str]:
    """Why this trial may not be a release: infeasible (search or held-out), or not the final one."""
    out = []
    failed = _failed_gates({g.name: g.margin for g in gate_record.read_trial_gates(trial.user_attrs)})
    if failed or not ranking.is_feasible(trial):
        out.append(f"trial {trial.number} is INFEASIBLE on the search slices: it fails "
                   f"{failed or 'its gates'}")
    record = storage.heldout_record(study.user_attrs, trial.number)
    if record is not None and not record.feasible:
        out.append(f"trial {trial.number} is INFEASIBLE on the held-out slices: it fails "
                   f"{_failed_gates(record.gate_margins) or 'its gates'}")
    final = ranking.final_number(study.user_attrs)
    if final is None:
        out.append(f"the study is not finalized: trial {trial.number} is not a final trial chosen on "
                   "the held-out slices (run `search finalize`)")
    elif final != trial.number:
        out.append(f"trial {trial.number} is not the study's final trial (trial {final})")
    return out


def _failed_gates(margins: object) -> str:
    if not isinstance(margins, Mapping):
        return ""
    return ", ".join(f"{g} ({float(m):+.4f})" for g, m in margins.items() if float(m) < 0)


# -- model names --------------------------------------------------------------------------


def parse_model_names(pairs: Sequence[str], config: StudyConfig) -> dict[str, str]:
    """``--model-name LABEL=NAME`` pairs as {label: name}; labels are ``base`` and the sources'."""
    labels = [BASE_LABEL, *config.models.sources]
    names: dict[str, str] = {}
    for pair in pairs:
        label, sep, name = pair.partition("=")
        label, name = label.strip(), name.strip()
        if not sep or not label or not name:
            raise SearchError(f"--model-name {pair!r}: expected LABEL=NAME, e.g. base=org/base-model")
        if label not in labels:
            raise SearchError(f"--model-name {pair!r}: no model labelled {label!r} (labels: {', '.join(labels)})")
        if label in names:
            raise SearchError(f"--model-name: {label!r} is named twice ({names[label]!r}, {name!r})")
        names[label] = name
    return names


def exported_names(config: StudyConfig, user_attrs: Mapping[str, object], recipe: Recipe, *,
                   yaml_dir: Path, names: Mapping[str, str], model_root: str | None) -> dict[str, str]:
    """Each model path of ``recipe`` -> how the YAML writes it.

    A model is known by its label: the recipe's paths are the ones the study ran with
    (the study's ``sources`` attribute), its folder now is the study file's.
    """
    current = {BASE_LABEL: Path(config.models.base), **{k: Path(v) for k, v in config.models.sources.items()}}
    stored = user_attrs.get("sources")
    ran_with = dict(stored) if isinstance(stored, Mapping) else {}
    label_of = {str(path): label for label, path in current.items()}
    label_of.update({str(path): str(label) for label, path in ran_with.items()})
    if recipe.base is not None:
        label_of[recipe.base] = BASE_LABEL
    models = [*([recipe.base] if recipe.base is not None else []), *recipe.sources,
              *(piece.model for piece in recipe.layer_slices)]
    out: dict[str, str] = {}
    for model in dict.fromkeys(models):
        label = label_of.get(model)
        if label is None or label not in current:
            raise SearchError(
                f"the recipe names model {model!r}, which {config.path} no longer lists "
                "(models.base / models.sources)"
            )
        if label in names:
            out[model] = names[label]
        elif model_root is not None:  # map_reference: each folder of a LoRA source's MODEL+ADAPTER
            out[model] = map_reference(current[label], lambda p: _local(f"{model_root.rstrip('/')}/{Path(p).name}"))
        else:
            out[model] = map_reference(
                current[label], lambda p: _local(Path(os.path.relpath(Path(p).resolve(), yaml_dir.resolve())).as_posix()))
    return out


def _local(path: str) -> str:
    """A relative folder as ``./a/b``: mergekit 0.1.5 takes ``a/b`` (one slash) for a possible Hub
    id and asks the Hub while writing the model card (``card.is_hf``), which fails offline."""
    if os.path.isabs(path) or path.startswith(("./", "../")) or path in (".", ".."):
        return path
    return f"./{path}"


# -- the YAML -----------------------------------------------------------------------------


def export_text(config: StudyConfig, study: optuna.Study, trial: FrozenTrial, layout: Layout, *,
                yaml_path: Path, names: Mapping[str, str] | None = None, model_root: str | None = None,
                warnings: Sequence[str] = ()) -> str:
    """The mergekit YAML of ``trial`` as ``search export`` writes it to ``yaml_path``."""
    from merges.mergekit_yaml import recipe_to_mergekit, rename_models  # torch: only when exporting

    recipe = Recipe.from_dict(trial.user_attrs["recipe"])
    written = exported_names(config, study.user_attrs, recipe, yaml_dir=Path(yaml_path).absolute().parent,
                             names=names or {}, model_root=model_root)
    shipped = rename_models(recipe, written)
    header = export_header(config, study.user_attrs, trial, warnings=warnings,
                           run_from=_run_from(written.values(), Path(yaml_path).name))
    return recipe_to_mergekit(shipped, layout, header=header, tokenizer=config.models.tokenizer_policy(),
                              names=written)


def _run_from(written: Iterable[str], yaml_name: str) -> str:
    """The header line that says from where ``mergekit-yaml`` finds the models."""
    paths = list(written)
    command = f"mergekit-yaml {yaml_name} OUTPUT_FOLDER"
    if all(os.path.isabs(p) for p in paths):
        return f"run: {command}\n(every model path is absolute: run it from any folder)"
    return (f"run from the folder that holds this file: {command}\n"
            "(mergekit reads a relative model path from the current folder; a name that is no folder "
            "there\nis downloaded from the Hugging Face Hub)")


def export_header(config: StudyConfig, user_attrs: Mapping[str, object], trial: FrozenTrial, *,
                  warnings: Sequence[str] = (), run_from: str = "") -> str:
    what = trial.user_attrs.get("baseline", "search trial")
    lines = ["mergesearch export", *(f"WARNING: {w}" for w in warnings)]
    lines += [
        f"study: {config.name} ({config.path.name})",
        f"trial: {trial.number} ({what}); seed: {config.seed}",
        f"recipe: {trial.user_attrs.get('recipe_summary', '')}",
        "scores (search slices): " + _scores(trial.user_attrs.get("scores_search", {})),
    ]
    record = storage.heldout_record(user_attrs, trial.number)
    if record is None:
        lines.append("scores (held-out slices): not re-scored (run `search finalize`)")
    else:
        lines.append("scores (held-out slices): " + _scores(record.scores))
    test = read_test_record(user_attrs, trial.number)  # the final trial (and best baseline) only
    if test is not None:
        lines.append("scores (test slices, scored once after the final choice): " + _scores(test.scores))
    lines.append("gates (search): " + _search_gates(trial))
    if record is not None:
        lines.append("gates (held-out): " + _gates(record.gate_margins))
    if run_from:
        lines.append(run_from)
    return "\n".join(lines)


def _scores(scores: object) -> str:
    if not isinstance(scores, dict) or not scores:
        return "none"
    return ", ".join(f"{task} {float(v):.4f}" for task, v in scores.items())


def _search_gates(trial: FrozenTrial) -> str:
    """Each gate with its margin and the score against the limit the trial was checked against."""
    gates = gate_record.read_trial_gates(trial.user_attrs)
    if not gates:
        return "none set"
    text = ", ".join(f"{g.name} {'passed' if g.passed else 'FAILED'} ({g.margin:+.4f}"
                     + (f"; {gate_record.comparison(g)})" if g.limit is not None else ")") for g in gates)
    if any(g.limit is None for g in gates):
        text += f"; {gate_record.TRIAL_NOT_STORED}"
    return text


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
        *(Protected(f"source checkpoint {label!r}", folder) for label, p in models.sources.items()
          for folder in reference_folders(p)),  # a LoRA source: its model and its adapter
    ]
    if args.materialize is not None:
        folder = check_output_folder(args.materialize, overwrite=args.overwrite, protected=protected)
        if folder.resolve() in output.resolve().parents:
            raise SearchError(f"-o {args.output} is inside --materialize {args.materialize}; write it elsewhere")
    return protected
