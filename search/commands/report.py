"""``search report STUDY -o report.html``: one self-contained HTML report."""

from __future__ import annotations

import argparse
from pathlib import Path

from search.commands import SUMMARIES, add_study_arguments
from search.commands.export import (
    add_model_name_arguments,
    export_text,
    export_warnings,
    parse_model_names,
)
from search.config import load_study


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help=SUMMARIES["report"],
        description=(
            "Write one HTML file that opens offline: the chosen recipe (final trial, else best "
            "feasible) with its scores, gates and mergekit YAML (a download link; model paths as "
            "`search export` writes them for a recipe.yaml saved next to the report); the optimisation history "
            "(feasible, infeasible and baselines marked); per-task scores of the chosen recipe "
            "next to every source and baseline with the gates drawn; search vs held-out scores of "
            "the finalists; a heatmap of the chosen recipe per layer group and source; parameter "
            "importances; and the Pareto front for multi-objective studies."
        ),
    )
    add_study_arguments(parser)
    parser.add_argument("-o", "--output", type=Path, default=None, metavar="FILE",
                        help="where to write (default: <study output>/report.html)")
    add_model_name_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fitness.spec import higher_is_better
    from merges.checkpoint import open_checkpoint
    from search.annotate import chosen_trial
    from search.report import RECIPE_FILENAME, write_report
    from search.storage import load_existing_study

    config = load_study(args.study, out=args.out)
    study = load_existing_study(config.name, config.storage)
    output = Path(args.output or config.output / "report.html")
    recipe_text = None
    chosen = chosen_trial(study)
    if chosen is not None:
        # What `search export -o recipe.yaml` writes next to the report (the link downloads it).
        layout = open_checkpoint(config.models.base, allow_pickle=config.models.allow_pickle).layout
        recipe_text = export_text(
            config, study, chosen, layout, yaml_path=output.parent / RECIPE_FILENAME,
            names=parse_model_names(args.model_name, config), model_root=args.model_root,
            warnings=export_warnings(study, chosen),
        )
    task_higher = {task.name: higher_is_better(task.metric) for task in config.tasks}
    path = write_report(study, output, task_higher=task_higher, recipe_text=recipe_text)
    print(f"wrote {path}")
    return 0
