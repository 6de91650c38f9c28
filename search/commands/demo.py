"""``search demo``: verify the shipped demo family and print where it is; ``--rebuild`` retrains it."""

from __future__ import annotations

import argparse

from search.commands import SUMMARIES
from search.errors import SearchError
from studies.demo_family import SHIPPED_ROOT, TASKS, DemoFamily, DemoFamilyError, shipped_family


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help=SUMMARIES["demo"],
        description="The built-in logistics demo family (a tiny Llama base, three specialists: "
        f"shipping, refunds, catalog, and their search / held-out slices) ships in {SHIPPED_ROOT}. "
        "Without options: check every file against its manifest's SHA-256 and print the paths.",
    )
    parser.add_argument(
        "--rebuild", action="store_true",
        help="retrain the family on this CPU (about 6 minutes of CPU, one thread) and replace the shipped "
        "files and manifest; on another instruction set the weights differ from the shipped ones",
    )
    parser.add_argument("--seed", type=int, default=0,
                        help="build seed with --rebuild (default: 0, the shipped family's)")
    parser.add_argument("--quiet", action="store_true", help="no progress output while rebuilding")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        if args.rebuild:
            from studies.demo_family.build import rebuild_family  # torch: only when training

            family = rebuild_family(SHIPPED_ROOT, seed=args.seed, progress=not args.quiet)
        else:
            family = shipped_family()
    except DemoFamilyError as exc:
        raise SearchError(f"search demo: {exc}") from exc
    except OSError as exc:
        raise SearchError(f"search demo: cannot build the demo family in {SHIPPED_ROOT}: {exc}") from exc
    print_family(family)
    return 0


def print_family(family: DemoFamily) -> None:
    print(f"demo family at {family.root} (every file matches family.json)")
    print(f"  base      {family.base}")
    for task in TASKS:
        print(f"  {task:<9} {family.sources[task]}")
        print(f"  {'':<9} {family.data(task, 'search')}, {family.data(task, 'heldout').name}")
