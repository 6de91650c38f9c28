"""One module per CLI subcommand; each exposes ``register(subparsers)``.

``register`` adds its parser (with ``help=SUMMARIES[name]``) and sets ``func``
(``argparse.Namespace -> int``). ``search.cli`` imports only the module of the command
being run, so ``search --help`` and a quick ``search status`` do not pay for torch,
transformers and Ray; keep heavy imports out of the listing below.
"""

import argparse
from pathlib import Path

SUMMARIES: dict[str, str] = {
    "start": "run a study (or continue it) up to its trial budget",
    "validate": "check a study file, its checkpoints and data; print the genes it would search",
    "status": "trials done / feasible / failed, the best recipe per task with its gate margins",
    "finalize": "re-score the best trials on the held-out split and choose the final recipe",
    "export": "write the best recipe as a mergekit YAML (and optionally the merged checkpoint)",
    "report": "write a self-contained HTML report (plotly) of the study",
    "dashboard": "serve optuna-dashboard on the study (trials, gates, recipes, notes)",
    "merge": "merge checkpoints from a mergekit YAML with the in-memory engine",
    "demo": "check the shipped demo model family (base + 3 specialists); --rebuild retrains it",
    "import-evolve": "convert a mergekit-evolve config into a study file (lm-eval tasks, genome)",
}


def add_study_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments every study command takes: the study file and ``--out``."""
    parser.add_argument("study", type=Path, help="the study file (study.toml)")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="output folder of the study (overrides study.output; holds study.db by default)")
