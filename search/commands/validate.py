"""``search validate STUDY``: everything ``search start`` would refuse, checked without merging.

``check_study`` is the whole check; ``search start`` runs it first, before any storage is
created. In order: the checkpoints (for ``models.demo_family`` the shipped family's
checksums are verified when the config loads; each error names ``models.base`` or
``models.sources.<label>``), the checkpoints' own Python (``auto_map``; refused unless ``models.trust_remote_code``), the compatibility preflight,
the genes, the output folder and an existing storage (a study created with other
directions), the warm start (each ``study.enqueue`` recipe encoded into the genome, the
``study.warm_start`` study's models), the memory one worker needs against this machine (the same estimate the
pools check), and each task's data files: every row read against the configured fields
and metric, the splits made, the first rows tokenised with the base tokenizer.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from dataclasses import dataclass, field

from fitness.errors import FitnessError
from fitness.gates import gate_names
from genome.errors import GenomeError
from genome.space import gene_space, layer_groups
from merges.checkpoint import Checkpoint, open_checkpoint
from merges.errors import MergeError
from merges.preflight import preflight
from merges.tokenizer_union import with_policy
from search.commands import SUMMARIES, add_study_arguments
from search.config import StudyConfig, auto_sampler, load_study
from search.errors import SearchError, StudyConfigError
from search.memory import MemoryEstimate
from search.warm_start import WarmStart, plan_warm_start


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "validate",
        help=SUMMARIES["validate"],
        description=(
            "Check everything `search start` would, without merging: study.toml (every key), the "
            "base and source checkpoints and their compatibility preflight, checkpoint code "
            "(auto_map) against models.trust_remote_code, an existing storage, the memory one "
            "worker needs against this machine, and each task's data rows against the configured "
            "fields and metric. Print a summary: sources, layers, layer groups, genes, sampler, "
            "budget, storage, memory, tasks and gates. Creates no storage. Exit status 0 when the "
            "study is ready to start, 2 with the error otherwise."
        ),
    )
    add_study_arguments(parser)
    parser.set_defaults(func=run)


@dataclass(frozen=True)
class Validation:
    """What ``check_study`` found out, for the summary."""

    n_layers: int
    genes: list[str]
    memory: MemoryEstimate
    memory_note: str  # what the estimate was checked against
    rows: dict[str, dict[str, int]]  # task -> split -> rows
    warm: WarmStart = field(default_factory=WarmStart)  # what the search starts from


def run(args: argparse.Namespace) -> int:
    config = load_study(args.study, out=args.out)
    print(summary(config, check_study(config)))
    return 0


def check_study(config: StudyConfig) -> Validation:
    """Everything ``search start`` would refuse, as ``StudyConfigError`` / ``SearchError`` naming the key.

    Reads checkpoint headers, tokenizer and data files; loads no weights and writes nothing.
    """
    n_layers = check_checkpoints(config)
    try:
        space = gene_space(config.genome, sources=config.models.sources, n_layers=n_layers)
    except GenomeError as exc:
        raise StudyConfigError(f"{config.path}: {exc}") from None
    check_output(config)
    warm = plan_warm_start(config, space=space, n_layers=n_layers)
    memory, note = check_memory(config)
    rows = check_data(config)
    return Validation(n_layers=n_layers, genes=list(space), memory=memory, memory_note=note, rows=rows, warm=warm)


def check_checkpoints(config: StudyConfig) -> int:
    """Open base and sources, refuse unwanted checkpoint code, run the preflight; the base's layer count."""
    models = config.models
    keyed = {"models.base": models.base, **{f"models.sources.{label}": path for label, path in models.sources.items()}}
    opened: dict[str, Checkpoint] = {}
    for key, path in keyed.items():
        try:
            opened[key] = open_checkpoint(path, allow_pickle=models.allow_pickle)
        except MergeError as exc:
            raise StudyConfigError(f"{config.path}: {key}: {exc}") from None
    if not models.trust_remote_code:
        # Before the preflight: it may load a slow tokenizer through transformers.
        for key, checkpoint in opened.items():
            code = checkpoint.remote_code()
            if code:
                found = "; ".join(f"{file} auto_map: {', '.join(entries)}" for file, entries in code.items())
                raise StudyConfigError(
                    f"{config.path}: models.trust_remote_code: {key} ({checkpoint.path}) ships its own "
                    f"Python code ({found}), which runs only with models.trust_remote_code = true; set it "
                    "if you trust that code, or use a checkpoint without auto_map"
                )
    base = opened.pop("models.base")
    if models.tokenizer is not None:  # the policy covers differing vocabularies; the rest is still compared
        try:
            views = with_policy(base, list(opened.values()), models.tokenizer_policy(),
                                trust_remote_code=models.trust_remote_code)
        except MergeError as exc:
            raise StudyConfigError(f"{config.path}: models.tokenizer: {exc}") from None
        base, opened = views[0], dict(zip(opened, views[1], strict=True))
    for key, source in opened.items():
        try:
            preflight(base, [source])
        except MergeError as exc:
            raise StudyConfigError(f"{config.path}: {key}: {exc}") from None
    return base.layout.n_layers


def check_output(config: StudyConfig) -> None:
    """The output folder can be made, and an existing storage holds this study with the same directions."""
    from fitness.objective import objective_directions
    from search.storage import NoStudyYetError, resolve_storage

    folder = config.output
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not (folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)):
        raise StudyConfigError(f"{config.path}: study.output: cannot create {config.output} ({folder} is not writable)")
    try:
        storage = resolve_storage(config.storage, create=False)  # read only: validate creates nothing
    except NoStudyYetError:
        return
    except SearchError as exc:
        raise StudyConfigError(f"{config.path}: study.storage: {exc}") from None
    import optuna

    for stored in optuna.get_all_study_summaries(storage, include_best_trial=False):
        if stored.study_name != config.name:
            continue
        had = [d.name.lower() for d in stored.directions]
        wanted = list(objective_directions(config.tasks, config.objective))
        if had != wanted:
            raise StudyConfigError(
                f"{config.path}: study.name: study {config.name!r} in {config.storage} was created with "
                f"directions {had}, the study file now gives {wanted} (objective or tasks changed); use a "
                "new study.name or study.output"
            )


def check_memory(config: StudyConfig) -> tuple[MemoryEstimate, str]:
    """The per-worker estimate, checked against this machine when the workers run here."""
    from search.memory import check_local_memory, plan_totals, worker_memory_breakdown
    from search.plan import worker_setup

    execution = config.execution
    setup = worker_setup(config)
    try:
        if execution.backend == "ray" and (execution.address or os.environ.get("RAY_ADDRESS")):
            estimate = worker_memory_breakdown(setup)
            return estimate, "checked against the Ray cluster when `search start` joins it"
        workers = 1 if execution.backend == "inline" or setup.device == "cuda" else execution.workers
        estimate = check_local_memory(setup, workers=workers)
    except MergeError as exc:
        raise StudyConfigError(f"{config.path}: models.base: {exc}") from None
    except SearchError as exc:
        raise StudyConfigError(f"{config.path}: memory: {exc}") from None
    kind = "GPU memory" if setup.device == "cuda" else "RAM"
    budget = "execution.memory_gb" if setup.memory_gb is not None else f"this machine's free {kind}"
    return estimate, f"{workers} worker(s) fit in {budget} ({plan_totals(setup)})"


def check_data(config: StudyConfig) -> dict[str, dict[str, int]]:
    """Each task's files exist and every row fits the fields and metric; rows per split by task."""
    for index, task in enumerate(config.tasks):
        if task.lm_eval is not None:
            continue  # its documents come from lm-eval (checked below)
        for key, path in (("search", task.search), ("heldout", task.heldout), ("test", task.test)):
            if path is not None and not path.exists():
                raise StudyConfigError(
                    f"{config.path}: tasks[{index}].{key}: data file {path} does not exist (task {task.name!r})"
                )
    from transformers import AutoTokenizer

    from fitness.lm_eval_task import benchmark_warning, check_lm_eval_task
    from fitness.slices import check_task

    base = config.models.base
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(base), trust_remote_code=config.models.trust_remote_code)
    except Exception as exc:  # transformers raises OSError / ValueError / ImportError variants
        raise StudyConfigError(f"{config.path}: models.base: cannot load the tokenizer of {base}: {exc}") from None
    rows: dict[str, dict[str, int]] = {}
    for index, task in enumerate(config.tasks):
        warning = benchmark_warning(task.lm_eval.task) if task.lm_eval else None
        if warning:
            print(f"WARNING: {config.path}: tasks[{index}].lm_eval: {warning}", file=sys.stderr)
        if task.lm_eval and task.chat_template and not getattr(tokenizer, "chat_template", None):
            raise StudyConfigError(f"{config.path}: tasks[{index}].chat_template: the base tokenizer ({base}) has "
                                   "no chat template for lm-eval's apply_chat_template; set chat_template = false")
        try:
            rows[task.name] = (check_lm_eval_task(task, staged=config.fidelity is not None) if task.lm_eval
                               else check_task(task, tokenizer))
        except FitnessError as exc:
            raise StudyConfigError(f"{config.path}: tasks[{index}]: {exc}") from None
    return rows


def summary(config: StudyConfig, validation: Validation) -> str:
    n_layers, genes = validation.n_layers, validation.genes
    genome = config.genome
    groups = layer_groups(genome, n_layers)
    if genome.frankenmerge is not None:
        layout = f"{genome.frankenmerge.output_layers(n_layers)} output layers, pick {genome.frankenmerge.pick}"
    else:
        layout = f"{len(groups)} layer group(s): " + " ".join(f"[{a},{b})" for a, b in groups)
    searched = ", ".join(f"{name} {b.describe()}" for name, b in genome.bounds().items()) or "none"
    fixed = ", ".join(f"{k}={v}" for k, v in genome.fixed.items()) or "none"
    population = config.population if config.population is not None else "Optuna's default"
    auto, why = auto_sampler(genome, config.objective)  # said even when the study names its sampler
    lines = [
        f"study {config.name!r} ({config.path}): valid",
        f"base: {config.models.base} ({n_layers} layers, {config.models.dtype})",
        "sources: " + ", ".join(f"{label}={path}" for label, path in config.models.sources.items()),
        f"genome: method {genome.method}, {layout}",
        f"  searched: {searched}; fixed: {fixed}",
        f"  {len(genes)} genes:",
        textwrap.indent(textwrap.fill(", ".join(genes), width=96), "    ") if genes else "    (none)",
        f"sampler: {config.sampler} (population: {population}); auto picks {auto}: {why}",
        f"objective {config.objective}, trials {config.trials}, top_k {config.top_k}, seed {config.seed}",
        f"storage: {config.storage}",
        *_warm_lines(config, validation.warm),
        f"output: {config.output}",
        f"execution: {config.execution.backend}"
        + (f" at {config.execution.address}" if config.execution.address else "")
        + f", {config.execution.workers} worker(s), device {config.execution.device}",
        f"memory: {validation.memory.describe()}; {validation.memory_note}",
        "tasks:",
    ]
    for task in config.tasks:
        heldout = task.heldout if task.heldout is not None else f"{task.heldout_fraction:g} of search"
        counts = validation.rows.get(task.name, {})
        source = (f"lm-eval task {task.lm_eval.task}, held out {task.heldout_fraction:g} of its documents "
                  f"(split_seed {task.split_seed})" if task.lm_eval else f"search {task.search}, heldout {heldout}")
        lines.append(
            f"  {task.name}: {task.metric}, weight {task.weight:g}, {source}"
            f" ({counts.get('search', '?')} search / {counts.get('heldout', '?')} held-out rows)"
            + (f", test {task.test} ({counts.get('test', '?')} rows, scored once after the final choice)"
               if task.test is not None else "")
        )
        for gate in task.gates:
            parts = []
            if gate.min is not None:
                parts.append(f"score >= {gate.min:g}")
            if gate.max_regression is not None:
                parts.append(f"at most {gate.max_regression:g} below {gate.against}")
            lines.append(f"    gate: {'; '.join(parts)}")
    if config.fidelity is not None:  # the stage schedule over the search rows (fitness.fidelity)
        from fitness.fidelity import describe_schedule

        total = sum(validation.rows.get(task.name, {}).get("search", 0) for task in config.tasks)
        lines.append("fidelity: " + (describe_schedule(total, config.fidelity) if total else "no search rows"))
    gates = gate_names([gate for task in config.tasks for gate in task.gates])
    lines.append(f"gates ({len(gates)}): " + (", ".join(gates) if gates else "none"))
    return "\n".join(lines)


def _warm_lines(config: StudyConfig, warm: WarmStart) -> list[str]:
    """What the search starts from (``study.enqueue``, ``study.warm_start``) and what snapping changed."""
    lines = []
    if warm.trials:
        shown = ", ".join(t.origin for t in warm.trials)
        where = "position 0" if len(warm.trials) == 1 else f"positions 0-{len(warm.trials) - 1}"
        lines.append(f"warm start: {len(warm.trials)} recipe(s) evaluated first ({where}): {shown}")
        if len(warm.trials) > config.trials:
            lines.append(f"  only the first {config.trials} fit in the budget of {config.trials} trials")
    if warm.source_trials:
        lines.append(f"warm start: CMA-ES starts from {len(warm.source_trials)} trials of {config.warm_start}")
    return lines + [f"warning: {note}" for note in warm.notes]
