"""Search throughput of the real driver on the demo study: trials per minute with 1 and 2 Ray workers.

Runs ``search.driver.run_study`` (the loop ``search start`` runs: sampler, storage,
recipe artifacts, gates, Ray pool) on the demo study (``studies/logistics/study.toml``,
its family built on first use) with ``execution.backend = "ray"``, once with a pool of 1
worker and once with a pool of 2 (one torch thread each). Timed blocks alternate between
the two studies, so that a change in the machine's load hits both rates alike; the
baselines and a first generation per study are run untimed (warm-up). Reports:

* trials per minute of the search loop (pool start-up, baselines and warm-up excluded),
* the share of a trial spent merging, scoring, and in the driver (the driver process's
  CPU time for sampling, storage writes and dispatch: on 2 cores that is what it takes
  from the workers), where a trial's time is the worker-seconds it takes
  (``loop wall × workers / trials``); the pool queues one trial behind each worker, so
  driver time overlaps the workers' and the shares need not add up to 1,
* scaling efficiency: 2-worker rate / (2 × 1-worker rate),
* each worker's measured resident set size next to the memory estimate,
* the machine's own ceiling for comparison: random recipes of the same genome evaluated
  by ``TrialWorker`` in one bare process, then in two at once (no driver, no Ray), in
  blocks alternating with the pools' blocks; on a machine whose cores share caches or
  memory bandwidth (or its host), two bare processes already scale below 1.

The last line is one JSON object (fractions from the 2-worker run)::

    python benchmarks/search_throughput.py [--blocks 5] [--per-block 16] [--sampler tpe] [--storage journal]
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path

import optuna
import psutil
import ray

from genome.space import decode
from search.config import StudyConfig, load_study
from search.driver import run_study
from search.loop import LoopTimings
from search.memory import GIB, estimate_worker_memory
from search.plan import plan_study, worker_setup
from search.ray_pool import RayPool
from search.worker import WorkerSetup

ROOT = Path(__file__).resolve().parents[1]
DEMO_STUDY = ROOT / "studies" / "logistics" / "study.toml"


@dataclass
class Pooled:
    """One study and the Ray pool that runs it; timings accumulate over its timed blocks."""

    workers: int
    config: StudyConfig
    pool: RayPool
    done: int = 0
    timed: LoopTimings | None = None

    def run(self, trials: int, *, timed: bool) -> None:
        """Run ``trials`` more search trials (the budget grows; the driver resumes the study)."""
        self.done += trials
        result = run_study(replace(self.config, trials=self.done), quiet=True, pool=self.pool,
                           finalize_after=False)
        if result.done != self.done:
            raise SystemExit(f"{self.workers}-worker study stopped at {result.done} of {self.done} trials")
        if timed:
            self.timed = _add(self.timed, result.timings)


def _add(total: LoopTimings | None, more: LoopTimings) -> LoopTimings:
    if total is None:
        return more
    return LoopTimings(**{f: getattr(total, f) + getattr(more, f) for f in total.__dataclass_fields__})


def study_config(path: Path, workers: int, folder: Path, *, sampler: str | None, storage: str) -> StudyConfig:
    config = load_study(path)
    output = folder / f"workers-{workers}"
    url = f"sqlite:///{output / 'study.db'}" if storage == "sqlite" else f"journal:{output / 'study.log'}"
    execution = replace(config.execution, backend="ray", workers=workers, cpus_per_worker=1.0)
    config = replace(config, output=output, storage=url, execution=execution)
    if sampler is not None:
        population = config.population if sampler in ("cmaes", "nsga2") else None
        config = replace(config, sampler=sampler, population=population)
    return config


def _bare_worker(setup: WorkerSetup, recipes: list[dict], conn: Connection) -> None:
    """A bare process: on each message, evaluate every recipe and send back the wall time."""
    from search.worker import TrialWorker

    worker = TrialWorker(setup)
    worker.evaluate(recipes[0])  # warm-up: first forward passes allocate
    conn.send("ready")
    while conn.recv():
        tick = time.perf_counter()
        for recipe in recipes:
            worker.evaluate(recipe)
        conn.send(time.perf_counter() - tick)


class BareWorkers:
    """Two ``TrialWorker`` processes with no driver or Ray: the machine's own scaling ceiling."""

    def __init__(self, setup: WorkerSetup, recipes: list[dict]) -> None:
        context = multiprocessing.get_context("spawn")
        self.recipes = recipes
        self.walls: dict[int, float] = {1: 0.0, 2: 0.0}
        self.trials: dict[int, int] = {1: 0, 2: 0}
        self._conns: list[Connection] = []
        self._procs = []
        for _ in range(2):
            here, there = context.Pipe()
            proc = context.Process(target=_bare_worker, args=(setup, recipes, there), daemon=True)
            proc.start()
            self._conns.append(here)
            self._procs.append(proc)
        for conn in self._conns:
            conn.recv()

    def block(self, processes: int) -> None:
        """Every recipe once on each of ``processes`` processes at the same time."""
        for conn in self._conns[:processes]:
            conn.send(True)
        self.walls[processes] += max(conn.recv() for conn in self._conns[:processes])
        self.trials[processes] += processes * len(self.recipes)

    def rate(self, processes: int) -> float:
        return 60 * self.trials[processes] / self.walls[processes]

    def close(self) -> None:
        for conn in self._conns:
            conn.send(False)
        for proc in self._procs:
            proc.join()


def sample_recipes(config: StudyConfig, count: int) -> list[dict]:
    """``count`` recipes of the study's genome, drawn at random (seeded)."""
    plan = plan_study(config)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=config.seed))
    return [
        decode(config.genome, study.ask(fixed_distributions=plan.space).params, base=plan.base,
               sources=plan.paths, n_layers=plan.n_layers, seed=config.seed).to_dict()
        for _ in range(count)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, default=DEMO_STUDY, help="study.toml (default: the demo study)")
    parser.add_argument("--blocks", type=int, default=5, help="timed blocks per pool, alternating (default 5)")
    parser.add_argument("--per-block", type=int, default=16,
                        help="trials per timed block (default 16: two CMA-ES generations of the demo study)")
    parser.add_argument("--sampler", default=None, help="override the study's sampler (e.g. tpe)")
    parser.add_argument("--storage", choices=("sqlite", "journal"), default="sqlite",
                        help="study storage (default sqlite, the product's default)")
    args = parser.parse_args(argv)

    load = os.getloadavg()
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores",
          file=sys.stderr)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # One local runtime for both pools (3 logical CPUs: the idle pool holds its share but
    # computes nothing while the other one runs).
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        runs: dict[int, Pooled] = {}
        bare: BareWorkers | None = None
        try:
            for workers in (1, 2):
                config = study_config(args.study, workers, Path(tmp), sampler=args.sampler,
                                      storage=args.storage)
                runs[workers] = Pooled(workers, config, RayPool(worker_setup(config), config.execution))
            config = runs[1].config
            bare = BareWorkers(replace(worker_setup(config), threads=1),
                               sample_recipes(config, args.per_block))
            warm_up = max(config.population or 0, 2)
            for run in runs.values():  # baselines, then one generation: untimed
                run.run(warm_up, timed=False)
            # Blocks alternate, so that a change in the machine's load hits every rate alike.
            for _ in range(max(1, args.blocks)):
                for run in runs.values():
                    run.run(args.per_block, timed=True)
                for processes in (1, 2):
                    bare.block(processes)
            estimate = estimate_worker_memory(worker_setup(config))
            rss = {w: [psutil.Process(int(i["pid"])).memory_info().rss for i in run.pool.workers()]
                   for w, run in runs.items()}
        finally:
            if bare is not None:
                bare.close()
            for run in runs.values():
                run.pool.close()
            ray.shutdown()

    config = runs[1].config
    print(f"study {args.study} ({config.sampler}, {config.genome.method}, storage {args.storage}): "
          f"{args.blocks} blocks of {args.per_block} trials per pool", file=sys.stderr)
    fractions: dict[int, dict[str, float]] = {}
    for workers, run in runs.items():
        t = run.timed
        assert t is not None
        per_trial = t.wall_s * workers / t.trials  # worker-seconds a trial takes
        fractions[workers] = {
            "merge": t.merge_s / t.trials / per_trial,
            "score": t.score_s / t.trials / per_trial,
            "driver": t.driver_s / t.trials / per_trial,
        }
        ms = {k: 1000 * v / t.trials for k, v in
              (("sample", t.sample_s), ("store", t.store_s), ("dispatch", t.dispatch_s))}
        f = fractions[workers]
        print(
            f"{workers} worker(s): {t.trials} trials in {t.wall_s:.1f} s = {60 * t.trials / t.wall_s:.1f} "
            f"trials/min; a trial {1000 * per_trial:.0f} ms of worker time: merge {f['merge']:.1%}, "
            f"score {f['score']:.1%}, driver {f['driver']:.1%} (CPU: sample {ms['sample']:.1f} ms, store "
            f"{ms['store']:.1f} ms, dispatch {ms['dispatch']:.1f} ms); worker RSS "
            f"{', '.join(f'{r / GIB:.2f}' for r in rss[workers])} GiB (estimate {estimate / GIB:.2f} GiB)",
            file=sys.stderr,
        )
    print(f"bare TrialWorker processes, no driver or Ray (same blocks, {args.per_block} random recipes "
          f"each): 1 process {bare.rate(1):.1f} trials/min, 2 processes {bare.rate(2):.1f} trials/min, "
          f"scaling efficiency {bare.rate(2) / (2 * bare.rate(1)):.3f} (this machine's ceiling)",
          file=sys.stderr)
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", file=sys.stderr)
    one, two = (runs[w].timed for w in (1, 2))
    assert one is not None and two is not None
    rate_1, rate_2 = 60 * one.trials / one.wall_s, 60 * two.trials / two.wall_s
    print(json.dumps({
        "trials_per_min_1": round(rate_1, 2),
        "trials_per_min_2": round(rate_2, 2),
        "scaling_efficiency": round(rate_2 / (2 * rate_1), 3),
        "driver_overhead_frac": round(fractions[2]["driver"], 4),
        "merge_frac": round(fractions[2]["merge"], 4),
        "score_frac": round(fractions[2]["score"], 4),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
