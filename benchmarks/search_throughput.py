"""Search throughput on the demo family: trials per minute with 1 and 2 Ray workers.

Runs the ask/tell loop the driver runs, with the same storage writes per trial (Optuna
TPE, SQLite storage by default, a TIES genome with per-layer weights and densities), on a
``RayPool`` of 1 worker and one of 2 workers (one torch thread each), alternating timed
blocks between the two so that a change in the machine's load hits both alike. Reports:

* trials per minute (pool startup and one warm-up trial per worker excluded),
* the share of a trial spent merging, scoring, and in the driver (sampling, storage
  writes, decoding and dispatch), where a trial's time is the worker-seconds it takes
  (``wall × workers / trials``). The pool queues one trial behind each worker, so driver
  time overlaps the workers' and the shares need not add up to 1,
* scaling efficiency: 2-worker rate / (2 × 1-worker rate),
* the memory estimate next to each worker's measured resident set size.

The last line is one JSON object (fractions from the 2-worker run)::

    python benchmarks/search_throughput.py --trials 40 --blocks 4 [--storage sqlite|journal|memory]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import psutil
import ray

from fitness.slices import TaskSpec
from genome.space import decode, gene_space
from genome.spec import Bounds, GenomeSpec
from search.config import ExecutionConfig
from search.memory import GIB, estimate_worker_memory
from search.ray_pool import RayPool
from search.storage import resolve_storage
from search.worker import TrialOutcome, WorkerSetup

TASKS = ("shipping", "refunds", "catalog")


@dataclass(frozen=True)
class RunResult:
    workers: int
    trials: int
    wall_s: float
    merge_s: float  # summed over trials
    score_s: float
    driver_s: float  # sampling + storage + decode + dispatch, in the driver
    rss_bytes: tuple[int, ...]

    @property
    def trials_per_min(self) -> float:
        return 60.0 * self.trials / self.wall_s

    def fraction(self, seconds: float) -> float:
        """Share of the worker-seconds all trials took."""
        return seconds / (self.wall_s * self.workers)


def make_storage(kind: str, folder: Path, workers: int) -> str | optuna.storages.BaseStorage | None:
    """``sqlite``: what the driver uses by default; ``journal``: a journal file; ``memory``: none."""
    if kind == "sqlite":
        return resolve_storage(f"sqlite:///{folder / f'bench-{workers}.db'}")  # as the driver opens it
    if kind == "journal":
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(folder / f"bench-{workers}.log")))
    return None


class Bench:
    """One study + one RayPool of ``workers`` workers; timed blocks of trials accumulate."""

    def __init__(self, setup: WorkerSetup, workers: int, *, storage_dir: Path, seed: int,
                 storage_kind: str) -> None:
        self.setup, self.workers, self.seed = setup, workers, seed
        self.spec = GenomeSpec(method="ties", layer_granularity=1, density=Bounds(0.1, 1.0))
        self.n_layers = _n_layers(setup.base)
        self.sources = {Path(s).name: s for s in setup.sources}
        self.space = gene_space(self.spec, sources=self.sources, n_layers=self.n_layers)
        self.study = optuna.create_study(
            storage=make_storage(storage_kind, storage_dir, workers),
            sampler=optuna.samplers.TPESampler(seed=seed), direction="maximize",
            study_name=f"throughput-{workers}",
        )
        self.pool = RayPool(setup, ExecutionConfig(backend="ray", workers=workers, cpus_per_worker=1.0))
        self.in_flight: dict[int, optuna.Trial] = {}
        self.trials = 0
        self.wall_s = self.merge_s = self.score_s = self.driver_s = 0.0

    def ask_and_submit(self) -> None:
        trial = self.study.ask(fixed_distributions=self.space)
        recipe = decode(self.spec, trial.params, base=self.setup.base, sources=self.sources,
                        n_layers=self.n_layers, seed=self.seed)
        # the user attributes the driver writes per trial (one storage write each)
        trial.set_user_attr("kind", "search")
        trial.set_user_attr("recipe", recipe.to_dict())
        trial.set_user_attr("recipe_summary", f"{recipe.method} over {len(recipe.groups)} groups")
        self.in_flight[trial.number] = trial
        self.pool.submit(trial.number, recipe.to_dict())

    def record(self, ticket: int, outcome: TrialOutcome) -> None:
        if outcome.error is not None:
            raise SystemExit(f"trial {ticket} failed: {outcome.error}")
        trial = self.in_flight.pop(ticket)
        trial.set_user_attr("timings", {"merge_s": outcome.merge_s, "score_s": outcome.score_s})
        trial.set_user_attr("worker", outcome.worker)
        trial.set_user_attr("scores_search", outcome.scores)
        trial.set_user_attr("gate_margins", {})
        trial.set_user_attr("feasible", True)
        self.study.tell(trial, statistics.fmean(outcome.scores.values()))

    def warm_up(self) -> None:
        """One trial per worker, untimed (first forward passes allocate and tune)."""
        for _ in range(self.workers):
            self.ask_and_submit()
        while self.in_flight:
            for ticket, outcome in self.pool.wait():
                self.record(ticket, outcome)

    def block(self, trials: int) -> None:
        """Run ``trials`` trials the way the driver streams them, timing every part."""
        asked = finished = 0
        start = time.perf_counter()
        while finished < trials:
            tick = time.perf_counter()
            while asked < trials and self.pool.free_slots() > 0:
                self.ask_and_submit()
                asked += 1
            self.driver_s += time.perf_counter() - tick
            results = self.pool.wait()
            tick = time.perf_counter()
            for ticket, outcome in results:
                self.merge_s += outcome.merge_s
                self.score_s += outcome.score_s
                self.record(ticket, outcome)
                finished += 1
            self.driver_s += time.perf_counter() - tick
        self.wall_s += time.perf_counter() - start
        self.trials += trials

    def result(self) -> RunResult:
        rss = tuple(psutil.Process(int(w["pid"])).memory_info().rss for w in self.pool.workers())
        return RunResult(self.workers, self.trials, self.wall_s, self.merge_s, self.score_s,
                         self.driver_s, rss)


def _n_layers(base: str) -> int:
    config = json.loads((Path(base) / "config.json").read_text())
    return int(config["num_hidden_layers"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40, help="timed trials per pool (default 40)")
    parser.add_argument("--blocks", type=int, default=4,
                        help="timed blocks per pool, alternating 1 and 2 workers (default 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--family", type=Path, default=None, help="demo family folder (default: the test cache)")
    parser.add_argument("--storage", choices=("sqlite", "journal", "memory"), default="sqlite",
                        help="Optuna storage of the benchmark study (default sqlite, the driver's default)")
    args = parser.parse_args(argv)

    from studies.demo_family import ensure_family

    cache = Path(os.environ.get("MERGESEARCH_CACHE", Path(__file__).resolve().parents[1] / ".cache"))
    root = args.family or cache / "demo-family"
    family = ensure_family(root, progress=True)
    tasks = tuple(
        TaskSpec(name=t, search=family.data(t, "search"), heldout=family.data(t, "heldout")) for t in TASKS
    )
    setup = WorkerSetup(
        base=str(family.base), sources=tuple(str(family.sources[t]) for t in TASKS), tasks=tasks,
        device="cpu", dtype="float32", batch_size=64, threads=1,
    )
    estimate = estimate_worker_memory(setup)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    load = os.getloadavg()
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores", file=sys.stderr)

    # One local runtime for both pools (3 logical CPUs: the idle pool holds its share but
    # computes nothing), so timed blocks alternate 1-worker / 2-worker and a change in the
    # machine's load hits both rates alike.
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)
    blocks = max(1, args.blocks)
    per_block = max(1, args.trials // blocks)
    results: dict[int, RunResult] = {}
    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        benches = {w: Bench(setup, w, storage_dir=Path(tmp), seed=args.seed, storage_kind=args.storage)
                   for w in (1, 2)}
        try:
            for bench in benches.values():
                bench.warm_up()
            for _ in range(blocks):
                for bench in benches.values():
                    bench.block(per_block)
            results = {w: bench.result() for w, bench in benches.items()}
        finally:
            for bench in benches.values():
                bench.pool.close()
            ray.shutdown()
    for result in results.values():
        print(
            f"{result.workers} worker(s): {result.trials} trials in {result.wall_s:.1f} s = "
            f"{result.trials_per_min:.1f} trials/min; merge {result.fraction(result.merge_s):.1%}, "
            f"score {result.fraction(result.score_s):.1%}, driver {result.fraction(result.driver_s):.1%} "
            f"of a trial; worker RSS {', '.join(f'{r / GIB:.2f}' for r in result.rss_bytes)} GiB "
            f"(estimate {estimate / GIB:.2f} GiB)",
            file=sys.stderr,
        )
    one, two = results[1], results[2]
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", file=sys.stderr)
    summary = {
        "trials_per_min_1": round(one.trials_per_min, 2),
        "trials_per_min_2": round(two.trials_per_min, 2),
        "scaling_efficiency": round(two.trials_per_min / (2 * one.trials_per_min), 3),
        "driver_overhead_frac": round(two.fraction(two.driver_s), 4),
        "merge_frac": round(two.fraction(two.merge_s), 4),
        "score_frac": round(two.fraction(two.score_s), 4),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
