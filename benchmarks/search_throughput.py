"""Search throughput of the real driver on the demo study: trials per minute with 1 and 2 Ray workers.

Runs ``search.driver.run_study`` (the loop ``search start`` runs: sampler, storage,
recipe artifacts, gates, Ray pool) on the demo study (``studies/logistics/study.toml``,
its family built on first use) with ``execution.backend = "ray"``, once with a pool of 1
worker and once with a pool of 2 (one torch thread each). Timed blocks alternate between
the two studies, so that a change in the machine's load hits both rates alike; the
baselines and a first generation per study are run untimed (warm-up). Reports:

* trials per minute of the search loop (pool start-up, baselines and warm-up excluded),
* the share of a trial spent merging, scoring, and in the driver (sampling, storage
  writes, dispatch), where a trial's time is the worker-seconds it takes
  (``loop wall × workers / trials``); the pool queues one trial behind each worker, so
  driver time overlaps the workers' and the shares need not add up to 1,
* scaling efficiency: 2-worker rate / (2 × 1-worker rate),
* each worker's measured resident set size next to the memory estimate,
* the machine's own ceiling for comparison: the same recipes evaluated by ``TrialWorker``
  in one bare process, then in two at once (no driver, no Ray); on a machine whose cores
  share caches or memory bandwidth, two bare processes already scale below 1.

The last line is one JSON object (fractions from the 2-worker run)::

    python benchmarks/search_throughput.py [--blocks 3] [--per-block 16] [--sampler tpe] [--storage journal]
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
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

import psutil
import ray

from search import ranking
from search.config import StudyConfig, load_study
from search.driver import LoopTimings, run_study, worker_setup
from search.memory import GIB, estimate_worker_memory
from search.ray_pool import RayPool
from search.storage import load_existing_study
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


def _bare_worker(setup: WorkerSetup, recipes: list[dict], start: Barrier, out: Queue) -> None:
    from search.worker import TrialWorker

    worker = TrialWorker(setup)
    worker.evaluate(recipes[0])  # warm-up: first forward passes allocate
    start.wait()
    tick = time.perf_counter()
    for recipe in recipes:
        worker.evaluate(recipe)
    out.put(time.perf_counter() - tick)


def bare_rate(setup: WorkerSetup, recipes: list[dict], processes: int) -> float:
    """Trials per minute of ``processes`` bare worker processes evaluating ``recipes`` each."""
    context = multiprocessing.get_context("spawn")
    start, out = context.Barrier(processes), context.Queue()
    procs = [context.Process(target=_bare_worker, args=(setup, recipes, start, out))
             for _ in range(processes)]
    for proc in procs:
        proc.start()
    walls = [out.get() for _ in procs]
    for proc in procs:
        proc.join()
    return 60 * processes * len(recipes) / max(walls)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, default=DEMO_STUDY, help="study.toml (default: the demo study)")
    parser.add_argument("--blocks", type=int, default=3, help="timed blocks per pool, alternating (default 3)")
    parser.add_argument("--per-block", type=int, default=16,
                        help="trials per timed block (default 16: two CMA-ES generations of the demo study)")
    parser.add_argument("--sampler", default=None, help="override the study's sampler (e.g. tpe)")
    parser.add_argument("--storage", choices=("sqlite", "journal"), default="sqlite",
                        help="study storage (default sqlite, the product's default)")
    args = parser.parse_args(argv)

    load = os.getloadavg()
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores",
          file=sys.stderr)
    # One local runtime for both pools (3 logical CPUs: the idle pool holds its share but
    # computes nothing while the other one runs).
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        runs: dict[int, Pooled] = {}
        try:
            for workers in (1, 2):
                config = study_config(args.study, workers, Path(tmp), sampler=args.sampler,
                                      storage=args.storage)
                runs[workers] = Pooled(workers, config, RayPool(worker_setup(config), config.execution))
            warm_up = max(runs[1].config.population or 0, 2)
            for run in runs.values():  # baselines, then one generation: untimed
                run.run(warm_up, timed=False)
            for _ in range(max(1, args.blocks)):
                for run in runs.values():
                    run.run(args.per_block, timed=True)
            estimate = estimate_worker_memory(worker_setup(runs[1].config))
            rss = {w: [psutil.Process(int(i["pid"])).memory_info().rss for i in run.pool.workers()]
                   for w, run in runs.items()}
        finally:
            for run in runs.values():
                run.pool.close()
            ray.shutdown()
        # the machine's ceiling, on the recipes the 2-worker study ran
        study = load_existing_study(runs[2].config.name, runs[2].config.storage)
        recipes = [t.user_attrs["recipe"] for t in study.get_trials(deepcopy=False)
                   if ranking.kind(t) == ranking.KIND_SEARCH][: 2 * args.per_block]
        setup = replace(worker_setup(runs[1].config), threads=1)
        bare = {n: bare_rate(setup, recipes, n) for n in (1, 2)}

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
            f"score {f['score']:.1%}, driver {f['driver']:.1%} (sample {ms['sample']:.1f} ms, store "
            f"{ms['store']:.1f} ms, dispatch {ms['dispatch']:.1f} ms); worker RSS "
            f"{', '.join(f'{r / GIB:.2f}' for r in rss[workers])} GiB (estimate {estimate / GIB:.2f} GiB)",
            file=sys.stderr,
        )
    print(f"bare TrialWorker processes, no driver or Ray ({len(recipes)} recipes each): 1 process "
          f"{bare[1]:.1f} trials/min, 2 processes {bare[2]:.1f} trials/min, scaling efficiency "
          f"{bare[2] / (2 * bare[1]):.3f} (this machine's ceiling)", file=sys.stderr)
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
