"""The plan of a study: what every stage of a run derives once from the config and checkpoints.

``plan_study`` opens the checkpoints (preflight), derives the genome space, the objective
directions and the gates; ``worker_setup`` is the picklable description a worker builds
itself from; ``open_driver_study`` creates or loads the study behind the driver's
write-behind storage and stores what the readers (status, report, dashboard) need.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.distributions import BaseDistribution

from fitness.gates import GateSpec, gate_names
from fitness.objective import objective_directions
from fitness.spec import TaskSpec, higher_is_better
from genome.space import gene_space, is_numeric
from merges.layout import Layout
from search import storage
from search.annotate import artifact_dir
from search.config import StudyConfig
from search.definition import study_definition
from search.errors import SearchError
from search.lm_eval_splits import current_splits, record_splits
from search.samplers import make_sampler
from search.warm_start import store_warm_start, warm_start_for
from search.worker import WorkerSetup
from search.write_behind import WriteBehindStorage


@dataclass(frozen=True)
class StudyPlan:
    """What every stage needs, derived once from the config and the checkpoints."""

    config: StudyConfig
    labels: tuple[str, ...]
    paths: dict[str, str]  # label -> checkpoint path
    base: str
    n_layers: int
    space: dict[str, BaseDistribution]
    directions: tuple[str, ...]
    gates: tuple[GateSpec, ...]
    gate_names: tuple[str, ...]
    task_higher: dict[str, bool]
    layout: Layout

    @property
    def artifacts(self) -> Path:
        return artifact_dir(self.config.output)

    @property
    def tasks(self) -> tuple[TaskSpec, ...]:
        return self.config.tasks




def plan_study(config: StudyConfig) -> StudyPlan:
    """Preflight the checkpoints and derive the genome space, directions and gates."""
    from merges.preflight import open_and_preflight

    models = config.models
    _, _, layout = open_and_preflight(models.base, list(models.sources.values()),
                                      allow_pickle=models.allow_pickle, tokenizer=models.tokenizer_policy(),
                                      trust_remote_code=models.trust_remote_code)
    labels = tuple(models.sources)
    paths = {label: str(path) for label, path in models.sources.items()}
    gates = tuple(g for task in config.tasks for g in task.gates)
    return StudyPlan(
        config=config,
        labels=labels,
        paths=paths,
        base=str(models.base),
        n_layers=layout.n_layers,
        space=gene_space(config.genome, sources=paths, n_layers=layout.n_layers),
        directions=objective_directions(config.tasks, config.objective),
        gates=gates,
        gate_names=tuple(gate_names(gates)),
        task_higher={t.name: higher_is_better(t.metric) for t in config.tasks},
        layout=layout,
    )


def worker_setup(config: StudyConfig) -> WorkerSetup:
    """The picklable description a worker builds itself from."""
    execution = config.execution
    device = execution.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return WorkerSetup(
        base=str(config.models.base),
        sources=tuple(str(p) for p in config.models.sources.values()),
        tasks=tuple(config.tasks),
        device=device,
        dtype=config.models.dtype,
        batch_size=execution.batch_size,
        allow_pickle=config.models.allow_pickle,
        trust_remote_code=config.models.trust_remote_code,
        tokenizer=config.models.tokenizer_policy(),
        # Torch's default (every core) oversubscribes a shared machine; a worker gets its share.
        threads=max(1, int(execution.cpus_per_worker)),
        # inline: the one worker runs while the driver waits, so its merges take every core
        engine_threads=len(os.sched_getaffinity(0)) if execution.backend == "inline" else None,
        methods=tuple(dict.fromkeys(("linear", config.genome.method))),  # baselines merge linearly
        memory_gb=execution.memory_gb,
    )


def open_plan_study(plan: StudyPlan) -> optuna.Study:
    """The study the driver writes (see :func:`open_driver_study`)."""
    return open_driver_study(plan)[0]


def open_driver_study(plan: StudyPlan) -> tuple[optuna.Study, WriteBehindStorage]:
    """Create or load the study on the driver's write-behind storage; also that storage.

    The driver keeps the storage itself (to flush it, and to write trial system
    attributes, which ``optuna.Trial`` has no public setter for) rather than reach into
    ``Study._storage``.
    """
    config = plan.config
    if config.sampler == "cmaes" and len(plan.directions) > 1:
        raise SearchError(
            f"{config.path}: sampler 'cmaes' optimises one objective; objective "
            f"{config.objective!r} gives {len(plan.directions)} (use 'nsga2' or objective 'mean')"
        )
    if config.sampler == "cmaes" and not is_numeric(config.genome):
        print(
            "warning: CMA-ES samples categorical genes at random; consider sampler 'tpe'",
            file=sys.stderr,
        )
    warm = warm_start_for(config, space=plan.space, n_layers=plan.n_layers, layout=plan.layout)
    sampler = make_sampler(config.sampler, seed=config.seed, space=plan.space, population=config.population,
                           parallel=config.execution.workers > 1, source_trials=warm.frozen_source_trials(plan.space))
    # lm-eval tasks' document splits, computed before the storage is created (a task that cannot load fails first)
    splits = current_splits(config.tasks)
    # Creates the study (or checks its directions and definition) on the durable storage.
    storage.open_study(config.name, config.storage, plan.directions, sampler=sampler,
                       definition=study_definition(config))
    # The driver is the only writer (search.lock): it reads from memory and writes in batches.
    write_behind = WriteBehindStorage(storage.resolve_storage(config.storage), config.name,
                                      url=config.storage)
    study = optuna.Study(study_name=config.name, storage=write_behind, sampler=sampler)
    store_warm_start(study, warm)  # fixed on the first run: a resume places the same warm trials
    record_splits(study, splits, config.storage)  # recorded on the first run; a resume must split the same
    attrs = study.user_attrs
    wanted = {
        "config_path": str(config.path),
        "sources": dict(plan.paths),
        "tasks": [t.name for t in config.tasks],
        "sampler": config.sampler,
        "seed": config.seed,
    }
    for key, value in wanted.items():
        if attrs.get(key) != value:
            study.set_user_attr(key, value)
    return study, write_behind
