"""One module per CLI subcommand; each exposes ``register(subparsers)``.

``register`` adds its parser and sets ``func`` (``argparse.Namespace -> int``)
as the handler. ``search.cli`` imports the modules listed in ``COMMANDS``.
"""

COMMANDS: tuple[str, ...] = (
    "start",
    "validate",
    "status",
    "export",
    "finalize",
    "merge",
    "dashboard",
    "report",
    "demo",
)
