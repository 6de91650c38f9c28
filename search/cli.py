"""Entry point of the ``search`` command."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from fitness.errors import FitnessError
from genome.errors import GenomeError
from merges.errors import MergeError
from search.commands import SUMMARIES
from search.errors import SearchError

# Errors a user can act on: printed as one line, no traceback, exit status 2.
USER_ERRORS = (SearchError, MergeError, FitnessError, GenomeError)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (the others are listed by summary)."""
    parser = argparse.ArgumentParser(
        prog="search",
        description="Search model-merge recipes with Optuna, gate them on held-out tasks, export mergekit YAML.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, summary in SUMMARIES.items():
        if name == command:
            importlib.import_module(f"search.commands.{name.replace('-', '_')}").register(sub)
        else:
            sub.add_parser(name, help=summary)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in SUMMARIES else None).parse_args(argv)
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
