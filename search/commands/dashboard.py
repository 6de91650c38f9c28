"""``search dashboard STUDY``: optuna-dashboard on the study's storage and artifacts."""

from __future__ import annotations

import argparse
import signal
from socketserver import ThreadingMixIn
from types import FrameType
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from search.commands import SUMMARIES, add_study_arguments
from search.config import load_study
from search.errors import SearchError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "dashboard",
        help=SUMMARIES["dashboard"],
        description=(
            "Start optuna-dashboard on the study's storage with its artifact folder "
            "(<output>/artifacts: each trial's mergekit YAML), print the URL, and serve until "
            "Ctrl-C. Binds to 127.0.0.1 unless --host says otherwise. It only reads the study, "
            "so it can run while `search start` does."
        ),
    )
    add_study_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    parser.set_defaults(func=run)


class _ThreadedServer(ThreadingMixIn, WSGIServer):
    """What ``optuna-dashboard`` itself serves with: one thread per request."""

    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base's name)
        pass  # no line per polling request; errors still reach stderr


def run(args: argparse.Namespace) -> int:
    # Imported here: optuna-dashboard pulls in its web stack, which other commands never need.
    from optuna_dashboard import wsgi

    from search.annotate import artifact_dir, artifact_store
    from search.storage import load_existing_study, resolve_storage

    config = load_study(args.study, out=args.out)
    load_existing_study(config.name, config.storage)  # a missing study fails here, clearly
    storage = resolve_storage(config.storage)
    app = wsgi(storage, artifact_store=artifact_store(artifact_dir(config.output)))
    try:
        server = make_server(args.host, args.port, app, server_class=_ThreadedServer,
                             handler_class=_QuietHandler)
    except OSError as exc:  # the port is taken, or the host is not an address of this machine
        raise SearchError(f"--host {args.host} --port {args.port}: cannot serve there: {exc}") from exc
    study_id = storage.get_study_id_from_name(config.name)
    print(f"optuna-dashboard for study {config.name!r}: "
          f"http://{args.host}:{server.server_port}/dashboard/studies/{study_id}  (Ctrl-C stops)", flush=True)
    # SIGTERM (service managers, `kill`) stops it like Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("dashboard stopped", flush=True)
    finally:
        server.server_close()
    return 0


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt
