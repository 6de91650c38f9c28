"""``search dashboard STUDY``: optuna-dashboard on the study's storage and artifacts."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from search.config import load_study


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "dashboard",
        help="serve optuna-dashboard on the study (trials, gates, recipes, notes)",
        description=(
            "Start optuna-dashboard on the study's storage with its artifact folder "
            "(<output>/artifacts: each trial's mergekit YAML), print the URL, and serve until "
            "Ctrl-C. Binds to 127.0.0.1 unless --host says otherwise. It only reads the study, "
            "so it can run while `search start` does."
        ),
    )
    parser.add_argument("study", type=Path, help="the study file (study.toml)")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="output folder of the study (overrides study.output)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here: optuna-dashboard pulls in its web stack, which other commands never need.
    from optuna_dashboard import run_server

    from search.annotate import artifact_dir, artifact_store
    from search.storage import load_existing_study, resolve_storage

    config = load_study(args.study, out=args.out)
    load_existing_study(config.name, config.storage)  # a missing study fails here, clearly
    storage = resolve_storage(config.storage)
    url = f"http://{args.host}:{args.port}/dashboard/studies/{storage.get_study_id_from_name(config.name)}"
    print(f"optuna-dashboard for study {config.name!r}: {url}  (Ctrl-C stops)", flush=True)
    # bottle's server loop returns on Ctrl-C itself; a Ctrl-C before it starts lands here.
    with contextlib.suppress(KeyboardInterrupt):
        run_server(storage, host=args.host, port=args.port,
                   artifact_store=artifact_store(artifact_dir(config.output)))
    print("dashboard stopped", flush=True)
    return 0
