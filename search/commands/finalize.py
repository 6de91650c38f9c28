"""``search finalize STUDY``: re-score the top-k feasible trials on held-out, pick the final one."""

from __future__ import annotations

import argparse

from search.commands import SUMMARIES, add_study_arguments
from search.config import load_study
from search.finalize import finalize_study, format_finalists


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "finalize",
        help=SUMMARIES["finalize"],
        description=(
            "Re-score the top-k feasible search trials (study.top_k) and every baseline on the "
            "held-out split, evaluate the gates there (against the sources' held-out scores), and "
            "store the best finalist that passes every gate as the study's final trial "
            "(what `search export` writes). `search start` does this itself when the budget is "
            "spent; run it to finalize a study stopped early. Prints search vs held-out per finalist."
        ),
    )
    add_study_arguments(parser)
    parser.add_argument("--quiet", action="store_true",
                        help="print nothing but warnings and errors (the exit status says whether a final trial was chosen)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = load_study(args.study, out=args.out)
    result = finalize_study(config, quiet=args.quiet)
    if not args.quiet:
        print(format_finalists(result, [t.name for t in config.tasks]))
    return 0 if result.final_trial is not None else 1
