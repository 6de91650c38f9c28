"""``search dashboard STUDY``: optuna-dashboard on the study's storage and artifacts.

Three things sit between optuna-dashboard 0.21 and the study, each through a public seam:

* :class:`ChosenAsBest`, the storage the dashboard reads: every call goes to the study's
  storage except ``get_best_trial`` (all the dashboard asks to fill its *Best Trial* box and
  chip for a one-objective study), which answers the chosen trial
  (:func:`search.annotate.chosen_trial`: the final trial, else the best feasible search trial).
* :func:`only_feasible_search_best`, a WSGI layer that drops from ``best_trials`` any trial
  the study would never call best (an infeasible one or a baseline): with no chosen trial the
  box stays empty, and for several objectives the dashboard's Pareto front, which ignores
  constraints, keeps only feasible search trials.
* :func:`read_only`, a WSGI layer that answers 403 to every request that could change the
  storage or the artifacts (every route of optuna-dashboard 0.21 that writes is a POST, PUT or
  DELETE), unless ``--allow-writes``.
"""

from __future__ import annotations

import abc
import argparse
import ipaddress
import json
import re
import signal
import socket
import sys
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from types import FrameType
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial

from search.annotate import artifact_dir, artifact_store, chosen_trial
from search.commands import SUMMARIES, add_study_arguments
from search.config import load_study
from search.errors import SearchError
from search.storage import load_existing_study, resolve_storage

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment
    from optuna.study._frozen import FrozenStudy  # what get_all_studies returns (not exported)

READ_METHODS = ("GET", "HEAD")
_STUDY_DETAIL = re.compile(r"^/api/studies/\d+/?$")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "dashboard",
        help=SUMMARIES["dashboard"],
        description=(
            "Start optuna-dashboard on the study's storage with its artifact folder "
            "(<output>/artifacts: each trial's mergekit YAML), print the URL, and serve until "
            "Ctrl-C. Read-only unless --allow-writes, so it can run while `search start` does. "
            "Binds to 127.0.0.1 unless --host says otherwise."
        ),
    )
    add_study_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1; anything else warns: there is no login)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    parser.add_argument(
        "--allow-writes", action="store_true",
        help="let the dashboard change the study (delete it, edit notes, tell or fail trials, "
             "upload or delete artifacts); never while `search start` runs",
    )
    parser.set_defaults(func=run)


# -- what the dashboard reads ---------------------------------------------------------------


class ChosenAsBest(BaseStorage):
    """The study's storage as the dashboard reads it: the best trial is the chosen trial.

    Every other method is forwarded unchanged (below the class). When there is no chosen
    trial yet, the storage's own best trial is answered (the dashboard fails the whole page
    on an error here) and :func:`only_feasible_search_best` hides it.
    """

    def __init__(self, inner: BaseStorage) -> None:
        self.inner = inner

    def get_best_trial(self, study_id: int) -> FrozenTrial:
        name = self.inner.get_study_name_from_id(study_id)
        chosen = chosen_trial(optuna.load_study(study_name=name, storage=self.inner))
        return chosen if chosen is not None else self.inner.get_best_trial(study_id)

    def get_all_studies(self) -> list[FrozenStudy]:
        # optuna-dashboard sorts these by id only for an RDBStorage, which this is not.
        # By the storage's public id lookup (FrozenStudy keeps its id private); studies are few.
        return sorted(self.inner.get_all_studies(), key=lambda s: self.inner.get_study_id_from_name(s.study_name))


def _forward(name: str) -> Callable[..., Any]:
    def method(self: ChosenAsBest, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.inner, name)(*args, **kwargs)

    method.__name__ = name
    return method


for _name, _value in vars(BaseStorage).items():
    if callable(_value) and not _name.startswith("_") and _name not in vars(ChosenAsBest):
        setattr(ChosenAsBest, _name, _forward(_name))
abc.update_abstractmethods(ChosenAsBest)


def only_feasible_search_best(app: WSGIApplication) -> WSGIApplication:
    """Drop infeasible trials and baselines from the ``best_trials`` of a study's detail."""

    def filtered(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ["REQUEST_METHOD"] != "GET" or not _STUDY_DETAIL.match(environ.get("PATH_INFO", "")):
            return app(environ, start_response)
        answer: dict[str, Any] = {}

        def keep(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], object]:
            answer.update(status=status, headers=headers)
            return lambda data: None  # the dashboard returns its body; it never calls write()

        chunks = app(environ, keep)
        try:
            body = b"".join(chunks)
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
        status, headers = answer["status"], answer["headers"]
        if status.startswith("200"):
            detail = json.loads(body)
            detail["best_trials"] = [t for t in detail.get("best_trials", []) if _may_be_best(t)]
            body = json.dumps(detail).encode()
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
            headers.append(("Content-Length", str(len(body))))
        start_response(status, headers)
        return [body]

    return filtered


def _may_be_best(served_trial: dict[str, Any]) -> bool:
    """The dashboard's own feasibility test (every constraint <= 0), and not a baseline."""
    kind = {a["key"]: a["value"] for a in served_trial.get("user_attrs", [])}.get("kind")
    return kind != "baseline" and all(c <= 0 for c in served_trial.get("constraints", []))


def read_only(app: WSGIApplication) -> WSGIApplication:
    """Answer 403 to every method but GET and HEAD, with a JSON reason the dashboard shows."""

    def guarded(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"]
        if method in READ_METHODS:
            return app(environ, start_response)
        reason = (
            f"this dashboard is read-only: {method} {environ.get('PATH_INFO', '')} would change "
            "the study or its artifacts (restart `search dashboard` with --allow-writes to allow it)"
        )
        body = json.dumps({"reason": reason}).encode()
        start_response("403 Forbidden", [("Content-Type", "application/json"),
                                         ("Content-Length", str(len(body)))])
        return [body]

    return guarded


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is a loopback address (an unknown name is not)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


# -- serving --------------------------------------------------------------------------------


class _ThreadedServer(ThreadingMixIn, WSGIServer):
    """What ``optuna-dashboard`` itself serves with: one thread per request."""

    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base's name)
        pass  # no line per polling request; errors still reach stderr


def run(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C or SIGTERM, then return 0."""
    # Imported here: optuna-dashboard pulls in its web stack, which other commands never need.
    from optuna_dashboard import wsgi

    config = load_study(args.study, out=args.out)
    load_existing_study(config.name, config.storage)  # a missing study fails here, clearly
    storage = resolve_storage(config.storage)
    app = only_feasible_search_best(
        wsgi(ChosenAsBest(storage), artifact_store=artifact_store(artifact_dir(config.output)))
    )
    if not args.allow_writes:
        app = read_only(app)
    try:
        server = make_server(args.host, args.port, app, server_class=_ThreadedServer,
                             handler_class=_QuietHandler)
    except OSError as exc:  # the port is taken, or the host is not an address of this machine
        raise SearchError(f"--host {args.host} --port {args.port}: cannot serve there: {exc}") from exc
    if not is_loopback(args.host):
        print(f"warning: --host {args.host}: the dashboard has no login; anyone who can reach port "
              f"{server.server_port} of this machine can read the study"
              + (" and, with --allow-writes, change or delete it" if args.allow_writes else "")
              + " (an SSH tunnel to 127.0.0.1 is safer)", file=sys.stderr, flush=True)
    study_id = storage.get_study_id_from_name(config.name)
    mode = "read-write: --allow-writes" if args.allow_writes else "read-only"
    print(f"optuna-dashboard for study {config.name!r} ({mode}): "
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
