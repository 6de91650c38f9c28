"""One module per CLI subcommand; each exposes ``register(subparsers)``.

``register`` adds its parser (with ``help=SUMMARIES[name]``) and sets ``func``
(``argparse.Namespace -> int``). ``search.cli`` imports only the module of the command
being run, so ``search --help`` and a quick ``search status`` do not pay for torch,
transformers and Ray; keep heavy imports out of the listing below.
"""

SUMMARIES: dict[str, str] = {
    "start": "run a study (or continue it) up to its trial budget",
    "validate": "check a study file, its checkpoints and data; print the genes it would search",
    "status": "trials done / feasible / failed, the best recipe per task with its gate margins",
    "finalize": "re-score the best trials on the held-out split and choose the final recipe",
    "export": "write the best recipe as a mergekit YAML (and optionally the merged checkpoint)",
    "report": "write a self-contained HTML report (plotly) of the study",
    "dashboard": "serve optuna-dashboard on the study (trials, gates, recipes, notes)",
    "merge": "merge checkpoints from a mergekit YAML with the in-memory engine",
    "demo": "build the demo model family (base + 3 specialists, CPU, a few minutes)",
}
