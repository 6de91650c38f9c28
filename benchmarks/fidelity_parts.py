"""Where a search trial's time goes, scored on every row or in stages: seconds per trial by part.

One seed of the study (default: the demo study), run with the real driver on its search loop
only (no finalize), scored on every row (``--mode full``) or in stages (``--mode multi``, the
schedule of ``--first-stage`` ... ``--promote``; by default the README's recommended one).
Timers wrap the loop's parts from outside, so the same script measures an older commit too
(``PYTHONPATH`` at that tree, ``--study`` that tree's demo study: the demo family must be the
tree's own): what the worker reports for each evaluation (``merge``;
``score_s1`` ... per stage, ``score_s0`` without stages) and, in the driver, the stage
decisions (``decide``: ``search.staged.StudyStages.decide``), Optuna's ``tell`` (``tell``) and
the write-behind storage's flushes (``flush``); ``other`` is the rest of the loop's wall time
(the sampler, asking, decoding and storing each recipe, the stage rows' attributes).
``merges``: evaluations per trial that merged (a stage of the recipe the worker holds does not).

The last line is one JSON object::

    python benchmarks/fidelity_parts.py --mode multi [--seed 1] [--study STUDY] [--first-stage 10]
        [--growth 2] [--confidence 0.8] [--rule test] [--promote SHARE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import optuna

import search.loop as loop_module
import search.staged as staged_module
import search.write_behind as write_behind_module

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository's benchmarks

from benchmarks.fidelity import RECOMMENDED  # noqa: E402
from fitness.fidelity import RULES, FidelityConfig  # noqa: E402
from search.config import load_study  # noqa: E402
from search.driver import run_study  # noqa: E402

DEMO_STUDY = Path(__file__).resolve().parents[1] / "studies" / "logistics" / "study.toml"
MERGED = 1e-3  # seconds: an evaluation that reports less merged nothing (the recipe was held)


class Parts:
    """Seconds and counts per part, summed over the search loop only."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.live = False
        self.stage: dict[int, int] = {}  # trial number -> the stage just submitted (0: every row)

    def time(self, owner: object, name: str, part: str) -> None:
        """Wrap ``owner.name`` so that its wall time inside the loop adds to ``part``."""
        original: Callable[..., object] = getattr(owner, name)

        def timed(*args: object, **kwargs: object) -> object:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                if self.live:
                    self.seconds[part] += time.perf_counter() - start
                    self.counts[part] += 1

        setattr(owner, name, timed)

    def install(self) -> None:
        parts = self
        submit, tell, run = loop_module.SearchLoop._submit, loop_module.SearchLoop._tell, loop_module.SearchLoop.run

        def on_submit(loop: loop_module.SearchLoop, item: loop_module._InFlight) -> None:
            held = sum(len(values) for values in item.rows.values())
            parts.stage[item.trial.number] = (0 if loop.stages is None
                                              else next(i for i, s in enumerate(loop.stages.sizes) if s > held) + 1)
            submit(loop, item)

        def on_tell(loop: loop_module.SearchLoop, item: loop_module._InFlight, outcome: object) -> bool:
            parts.seconds["merge"] += outcome.merge_s  # type: ignore[attr-defined]
            parts.counts["merges"] += outcome.merge_s > MERGED  # type: ignore[attr-defined]
            parts.seconds[f"score_s{parts.stage.get(item.trial.number, 0)}"] += outcome.score_s  # type: ignore[attr-defined]
            return tell(loop, item, outcome)

        def on_run(loop: loop_module.SearchLoop) -> None:
            parts.live = True
            try:
                run(loop)
            finally:
                parts.live = False

        loop_module.SearchLoop._submit = on_submit  # type: ignore[method-assign]
        loop_module.SearchLoop._tell = on_tell  # type: ignore[method-assign]
        loop_module.SearchLoop.run = on_run  # type: ignore[method-assign]
        self.time(staged_module.StudyStages, "decide", "decide")
        self.time(optuna.Study, "tell", "tell")
        self.time(write_behind_module.WriteBehindStorage, "flush", "flush")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("full", "multi"), required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--study", type=Path, default=DEMO_STUDY)
    parser.add_argument("--first-stage", type=int, default=RECOMMENDED.first_stage)
    parser.add_argument("--growth", type=float, default=RECOMMENDED.growth)
    parser.add_argument("--confidence", type=float, default=RECOMMENDED.confidence)
    parser.add_argument("--rule", choices=RULES, default=RECOMMENDED.rule)
    parser.add_argument("--promote", type=float, default=RECOMMENDED.promote, help="rule rank only")
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    fidelity = FidelityConfig(first_stage=args.first_stage, growth=args.growth, confidence=args.confidence,
                              rule=args.rule, promote=args.promote)
    parts = Parts()
    parts.install()
    base = load_study(args.study)
    with tempfile.TemporaryDirectory(prefix="fidelity-parts-") as tmp:
        output = Path(tmp) / args.mode
        config = replace(base, seed=args.seed, output=output, storage=f"sqlite:///{output / 'study.db'}",
                         fidelity=fidelity if args.mode == "multi" else None)
        result = run_study(config, quiet=True, finalize_after=False)
    trials = result.timings.trials
    score = sum(v for k, v in parts.seconds.items() if k.startswith("score_s"))
    timed = parts.seconds["merge"] + score + parts.seconds["decide"] + parts.seconds["tell"] + parts.seconds["flush"]
    per_trial = {key: round(value / trials, 4) for key, value in sorted(parts.seconds.items())}
    per_trial.update(score=round(score / trials, 4), other=round((result.timings.wall_s - timed) / trials, 4),
                     loop=round(result.timings.wall_s / trials, 4))
    print(json.dumps({"mode": args.mode, "seed": args.seed, "trials": trials,
                      "merges": round(parts.counts["merges"] / trials, 2),
                      "decisions": round(parts.counts["decide"] / trials, 2), "per_trial_s": per_trial}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
