"""The demo's test slices: rows whose answer (the current policy's) no model of the family was trained on.

``tasks.py`` enumerates every case of a task and splits all of them into held-out, search and
the training pool, so no case is left that no model ever saw. But training draws examples
with replacement from seeded Python ``random`` streams (``train.draws``): which pool entries
a model drew depends on the seeds and the plan only, never on float results, so replaying
the streams without training (:func:`undrawn_cases`) says exactly, on every machine, which
training cases no specialist drew under the current policy. A task's test slice is a seeded
pick of up to ``SLICE_ROWS`` of those, disjoint from its search and held-out slices by
construction (shipping has 143, refunds 94, catalog thousands: fewer rows, wider intervals).

How it differs from the search / held-out rows: those prompts were never drawn at all; the
test prompts were drawn by the base (and by the other specialists' replay) with the *old*
policy's answers. So a recipe close to the base may do a little worse on test than on
held-out for that reason, besides the choice's optimism the test split is there to show.

Written next to the other slices by the build (``build.write_slices``) and shipped with a
checksum in ``family.json`` like them; ``python -m studies.demo_family.test_rows`` rewrites
them in the shipped family (same bytes every time) without retraining anything.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Mapping
from pathlib import Path

from studies.demo_family.build import PLAN, FamilyPlan, training_streams
from studies.demo_family.tasks import SLICE_ROWS, Example, TaskSplit, split_tasks
from studies.demo_family.train import CopyPool, Pool, draws


class _NoEncoder:
    """Stands in for ``train.Encoder`` in the replay: the draws are what matter, not the tokens."""

    def encode(self, example: Example) -> tuple[None, None]:
        return None, None


def undrawn_cases(splits: Mapping[str, TaskSplit], *, seed: int, plan: FamilyPlan = PLAN) -> dict[str, list[int]]:
    """Per task, the indices of ``train_current`` that no model drew with the current-policy
    answer, in index order (the training streams of ``build.training_streams``, replayed)."""
    old = {t: Pool(tuple((("old", t, i), None) for i in range(len(s.train_old))), plan.base_noise)
           for t, s in splits.items()}
    current = {t: Pool(tuple((("current", t, i), None) for i in range(len(s.train_current))))
               for t, s in splits.items()}
    drawn: set[object] = set()
    for stream in training_streams(plan, seed, old, current, CopyPool(_NoEncoder())):  # type: ignore[arg-type]
        examples = draws(stream.mix, seed=stream.seed)
        for _ in range(stream.schedule.steps * stream.schedule.batch_size):
            drawn.add(next(examples)[0])
    return {t: [i for i in range(len(s.train_current)) if ("current", t, i) not in drawn] for t, s in splits.items()}


def unseen_slices(splits: Mapping[str, TaskSplit], *, seed: int, plan: FamilyPlan = PLAN) -> dict[str, tuple[Example, ...]]:
    """Each task's test rows: a seeded pick of up to ``SLICE_ROWS`` undrawn training cases."""
    out: dict[str, tuple[Example, ...]] = {}
    for task, indices in undrawn_cases(splits, seed=seed, plan=plan).items():
        picked = list(indices)
        random.Random(f"{task}:{seed}:test").shuffle(picked)
        out[task] = tuple(splits[task].train_current[i] for i in picked[:SLICE_ROWS])
    return out



def main(argv: list[str] | None = None) -> int:
    """Write ``data/<task>/test.jsonl`` into a built family folder (default: the shipped one)."""
    from studies.demo_family.build import slice_text, write_text_atomic
    from studies.demo_family.shipped import SHIPPED_ROOT, read_manifest

    root = Path(argv[0]) if argv else SHIPPED_ROOT
    manifest = read_manifest(root) or {}
    seed = int(manifest.get("seed", 0))  # type: ignore[arg-type]
    for task, rows in unseen_slices(split_tasks(seed), seed=seed).items():
        write_text_atomic(root / "data" / task / "test.jsonl", slice_text(rows))
        print(f"{root / 'data' / task / 'test.jsonl'}: {len(rows)} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
