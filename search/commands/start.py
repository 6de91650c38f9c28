"""``search start STUDY``: run or continue a study up to its budget, then finalize it."""

from __future__ import annotations

import argparse
import shlex
import sys

import optuna

from search.commands import SUMMARIES, add_study_arguments
from search.commands.validate import check_study
from search.config import load_study
from search.driver import run_study
from search.finalize import format_finalists
from search.samplers import SAMPLERS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "start",
        help=SUMMARIES["start"],
        description=(
            "Run the search described by STUDY (a study.toml). Baselines (each source alone, the "
            "uniform average, the method's untuned defaults) are scored first, then the sampler "
            "proposes recipes until the budget of search trials is spent; finally the top-k "
            "feasible trials are re-scored on the held-out split and the final trial is chosen. "
            "It first checks everything `search validate` does, before creating the storage. "
            "Running it again continues the same study: finished trials are kept, trials a killed "
            "run left behind are re-run. Ctrl-C stops after the trials in flight (twice: at once)."
        ),
    )
    add_study_arguments(parser)
    parser.add_argument("--trials", type=int, default=None, metavar="N",
                        help="search budget: total search trials, baselines not counted (overrides study.trials)")
    parser.add_argument("--seed", type=int, default=None, metavar="N",
                        help="the study's seed (overrides study.seed); run a variant with its own --out")
    parser.add_argument("--sampler", choices=("auto", *SAMPLERS), default=None,
                        help="the sampler (overrides study.sampler; study.population only applies to "
                             "cmaes and nsga2); run a variant with its own --out")
    parser.add_argument("--quiet", action="store_true",
                        help="print nothing but warnings and errors (no progress, no Optuna log, no summary)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = load_study(args.study, out=args.out, trials=args.trials, seed=args.seed, sampler=args.sampler)
    if args.quiet:
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # its "[I ...] study created" line
    else:
        print(f"study {config.name}: sampler {config.sampler}, seed {config.seed}, budget {config.trials} "
              f"search trials; storage {config.storage}", flush=True)
    # Everything `search validate` checks, before a storage is created or a weight loaded.
    validation = check_study(config)
    if not args.quiet:
        print(f"memory: {validation.memory.describe()}", flush=True)
    result = run_study(config, quiet=args.quiet)
    resume = ["search", "start", str(args.study)]
    for flag, value in (("--out", args.out), ("--trials", args.trials), ("--seed", args.seed),
                        ("--sampler", args.sampler)):
        if value is not None:
            resume += [flag, str(value)]
    if result.interrupted:
        print(
            f"stopped after {result.done}/{result.budget} search trials; the study is saved in "
            f"{config.storage}\nresume with: {shlex.join(resume)}",
            file=sys.stderr,
        )
        return 130
    if args.quiet:
        return 0
    if result.finalized is None:
        print(f"{result.done}/{result.budget} search trials done")
        return 0
    print(format_finalists(result.finalized, [t.name for t in config.tasks]))
    export = ["search", "export", str(args.study), "-o", "recipe.yaml"]
    if args.out is not None:
        export += ["--out", str(args.out)]
    if result.finalized.final_trial is not None:
        print(f"export with: {shlex.join(export)}")
    return 0
