"""A study on the 1.1B benchmark family: ``search start`` end to end with the inline backend.

The family is generated on this machine by ``benchmarks.merge_speed`` (``--size 1b``, cached
under ``$MERGESEARCH_CACHE/bench/1b``), not shipped, so its study file names paths that only
exist here: this module writes it (and its task slices) beside the family and prints its path,
which is why it lives in benchmarks/ rather than studies/ (shipped, self-contained families).
A handful of rows per task, ``--trials`` TIES trials; the memory plan picks the engine plan
(lean on a 24 GB machine). Usage::

    path=$(python -m benchmarks.study_1b --trials 2)
    /usr/bin/time -v python -m search.cli start "$path"
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

from benchmarks.merge_speed import REPO, SIZES, build_family

ROWS = 4  # per task and split: scoring stays a few forward passes of the 1.1B model
TASKS = ("alpha", "beta")


def write_study(root: Path, *, trials: int, method: str = "ties") -> Path:
    """The family under ``root`` (built if missing), slices and ``study.toml`` in ``root/study``."""
    base, sources = build_family(root, SIZES["1b"])
    folder = root / "study"
    folder.mkdir(exist_ok=True)
    blocks = []
    for index, task in enumerate(TASKS):
        rng = random.Random(index)
        paths = []
        for split in ("search", "heldout"):
            path = folder / f"{task}-{split}.jsonl"
            rows = [{"prompt": " ".join(f"w{rng.randrange(32000 - 4)}" for _ in range(8)),
                     "answer": f"w{rng.randrange(32000 - 4)}"} for _ in range(ROWS)]
            path.write_text("".join(json.dumps(row) + "\n" for row in rows))
            paths.append(path)
        blocks.append(f'[[tasks]]\nname = "{task}"\nsearch = "{paths[0]}"\nheldout = "{paths[1]}"\n'
                      'metric = "loglik"\n')
    listed = "\n".join(f's{i} = "{s}"' for i, s in enumerate(sources))
    density = "\ndensity = { min = 0.3, max = 0.7 }" if method in ("ties", "dare_ties") else ""
    text = f"""[study]
name = "family-1b-{method}"
seed = 0
output = "{folder / 'out'}"
trials = {trials}
sampler = "random"
objective = "mean"
top_k = 1

[models]
base = "{base}"

[models.sources]
{listed}

[genome]
method = "{method}"
layer_granularity = 11
weight = {{ min = 0.1, max = 1.0 }}{density}

{chr(10).join(blocks)}
[execution]
backend = "inline"
device = "cpu"
batch_size = 4
"""
    path = folder / "study.toml"
    path.write_text(text)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--method", default="ties")
    args = parser.parse_args(argv)
    cache = os.environ.get("MERGESEARCH_CACHE")
    root = (Path(cache) if cache else REPO / ".cache") / "bench" / "1b"
    print(write_study(root, trials=args.trials, method=args.method))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
