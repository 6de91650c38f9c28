"""``search validate STUDY``: check a study file and its checkpoints without merging anything.

Runs the full config validation (which verifies the shipped demo family's checksums when
``models.demo_family`` is set), opens the checkpoints and runs the preflight, checks that
every task's data files exist, then prints what the study would search.
"""

from __future__ import annotations

import argparse
import textwrap

from fitness.gates import gate_names
from genome.errors import GenomeError
from genome.space import gene_space, layer_groups
from merges.checkpoint import open_checkpoint
from merges.preflight import preflight
from search.commands import SUMMARIES, add_study_arguments
from search.config import StudyConfig, load_study
from search.errors import StudyConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "validate",
        help=SUMMARIES["validate"],
        description=(
            "Validate study.toml (every key), open the base and source checkpoints and run the "
            "compatibility preflight, check each task's data files exist, and print a summary: "
            "sources, layers, layer groups, genes, sampler, budget, storage, tasks and gates. "
            "Exit status 0 when the study is ready to start, 2 with the error otherwise."
        ),
    )
    add_study_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = load_study(args.study, out=args.out)
    n_layers = check_checkpoints(config)
    check_data(config)
    try:
        genes = list(gene_space(config.genome, sources=config.models.sources, n_layers=n_layers))
    except GenomeError as exc:
        raise StudyConfigError(f"{args.study}: {exc}") from None
    print(summary(config, n_layers, genes))
    return 0


def check_checkpoints(config: StudyConfig) -> int:
    """Open base and sources, run the preflight; the base's layer count."""
    models = config.models
    base = open_checkpoint(models.base, allow_pickle=models.allow_pickle)
    sources = [open_checkpoint(path, allow_pickle=models.allow_pickle) for path in models.sources.values()]
    return preflight(base, sources).n_layers


def check_data(config: StudyConfig) -> None:
    for index, task in enumerate(config.tasks):
        for key, path in (("search", task.search), ("heldout", task.heldout)):
            if path is not None and not path.exists():
                raise StudyConfigError(
                    f"{config.path}: tasks[{index}].{key}: data file {path} does not exist (task {task.name!r})"
                )


def summary(config: StudyConfig, n_layers: int, genes: list[str]) -> str:
    genome = config.genome
    groups = layer_groups(genome, n_layers)
    if genome.frankenmerge is not None:
        layout = f"{genome.frankenmerge.output_layers(n_layers)} output layers, pick {genome.frankenmerge.pick}"
    else:
        layout = f"{len(groups)} layer group(s): " + " ".join(f"[{a},{b})" for a, b in groups)
    searched = ", ".join(f"{name} {b.describe()}" for name, b in genome.bounds().items()) or "none"
    fixed = ", ".join(f"{k}={v}" for k, v in genome.fixed.items()) or "none"
    population = config.population if config.population is not None else "Optuna's default"
    lines = [
        f"study {config.name!r} ({config.path}): valid",
        f"base: {config.models.base} ({n_layers} layers, {config.models.dtype})",
        "sources: " + ", ".join(f"{label}={path}" for label, path in config.models.sources.items()),
        f"genome: method {genome.method}, {layout}",
        f"  searched: {searched}; fixed: {fixed}",
        f"  {len(genes)} genes:",
        textwrap.indent(textwrap.fill(", ".join(genes), width=96), "    ") if genes else "    (none)",
        f"sampler: {config.sampler} (population: {population}), objective {config.objective}, "
        f"trials {config.trials}, top_k {config.top_k}, seed {config.seed}",
        f"storage: {config.storage}",
        f"output: {config.output}",
        f"execution: {config.execution.backend}"
        + (f" at {config.execution.address}" if config.execution.address else "")
        + f", {config.execution.workers} worker(s), device {config.execution.device}",
        "tasks:",
    ]
    for task in config.tasks:
        heldout = task.heldout if task.heldout is not None else f"{task.heldout_fraction:g} of search"
        lines.append(f"  {task.name}: {task.metric}, weight {task.weight:g}, search {task.search}, heldout {heldout}")
        for gate in task.gates:
            parts = []
            if gate.min is not None:
                parts.append(f"score >= {gate.min:g}")
            if gate.max_regression is not None:
                parts.append(f"at most {gate.max_regression:g} below {gate.against}")
            lines.append(f"    gate: {'; '.join(parts)}")
    gates = gate_names([gate for task in config.tasks for gate in task.gates])
    lines.append(f"gates ({len(gates)}): " + (", ".join(gates) if gates else "none"))
    return "\n".join(lines)
