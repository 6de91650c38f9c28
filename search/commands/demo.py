"""``search demo``: build the built-in demo model family (once) and print where it is."""

from __future__ import annotations

import argparse
from pathlib import Path

import studies
from search.commands import SUMMARIES
from search.errors import SearchError
from studies.demo_family import TASKS, DemoFamilyError, ensure_family

DEFAULT_ROOT = Path(studies.__file__).resolve().parent / "logistics" / "family"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help=SUMMARIES["demo"],
        description="Build the built-in logistics demo family: a tiny Llama base, three "
        "specialists (shipping, refunds, catalog) and their search / held-out slices.",
    )
    parser.add_argument(
        "--root", type=Path, default=DEFAULT_ROOT,
        help=f"folder to build into (default: {DEFAULT_ROOT})",
    )
    parser.add_argument("--seed", type=int, default=0, help="build seed (default: 0)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        family = ensure_family(args.root, seed=args.seed, progress=not args.quiet)
    except DemoFamilyError as exc:
        raise SearchError(f"search demo: {exc}") from exc
    except OSError as exc:
        raise SearchError(f"search demo: cannot build the demo family in {args.root}: {exc}") from exc
    print(f"demo family at {family.root}")
    print(f"  base      {family.base}")
    for task in TASKS:
        print(f"  {task:<9} {family.sources[task]}")
        print(f"  {'':<9} {family.data(task, 'search')}, {family.data(task, 'heldout').name}")
    return 0
