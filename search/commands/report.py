"""``search report STUDY -o report.html``: one self-contained HTML report."""

from __future__ import annotations

import argparse
from pathlib import Path

from search.config import load_study
from search.report import write_report
from search.storage import load_existing_study


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="write a self-contained HTML report (plotly) of the study",
        description=(
            "Write one HTML file that opens offline: optimisation history (feasible, infeasible "
            "and baselines marked), per-task scores of the best recipe next to the sources and "
            "baselines with the gates drawn, search vs held-out scores of the finalists, a heatmap "
            "of the best recipe per layer group and source, parameter importances, and the Pareto "
            "front for multi-objective studies."
        ),
    )
    parser.add_argument("study", type=Path, help="the study file (study.toml)")
    parser.add_argument("-o", "--output", type=Path, default=None, metavar="FILE",
                        help="where to write (default: <study output>/report.html)")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="output folder of the study (overrides study.output)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = load_study(args.study, out=args.out)
    study = load_existing_study(config.name, config.storage)
    path = write_report(study, args.output or config.output / "report.html")
    print(f"wrote {path}")
    return 0
