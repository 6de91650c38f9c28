"""Entry point of the ``search`` command."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from fitness.errors import FitnessError
from genome.errors import GenomeError
from merges.errors import MergeError
from search.commands import COMMANDS
from search.errors import SearchError

# Errors a user can act on: printed as one line, no traceback, exit status 2.
USER_ERRORS = (SearchError, MergeError, FitnessError, GenomeError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="search",
        description="Search model-merge recipes with Optuna, gate them on held-out tasks, export mergekit YAML.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"search.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"search.commands.{name}":
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
