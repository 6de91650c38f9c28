"""The built-in demo family: a tiny Llama base and three logistics specialists, built on the CPU.

``ensure_family(root)`` builds it once (about two to three minutes on two cores) and
returns a :class:`DemoFamily`. Layout of ``root``::

    base/ shipping/ refunds/ catalog/         Hugging Face checkpoints (float32 safetensors)
    data/<task>/search.jsonl                  200 rows {"prompt", "answer"} per task
    data/<task>/heldout.jsonl                 200 rows, disjoint from search and training
    family.json                               manifest: version, seed, timings, held-out scores

The text format of each task is documented in :mod:`studies.demo_family.tasks`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from studies.demo_family.build import (
    PLAN,
    SPLITS,
    FamilyPlan,
    build_into_place,
    build_lock,
    is_current,
)
from studies.demo_family.errors import DemoFamilyError
from studies.demo_family.tasks import TASKS

__all__ = ["TASKS", "DemoFamily", "DemoFamilyError", "FamilyPlan", "ensure_family"]


@dataclass(frozen=True)
class DemoFamily:
    root: Path
    base: Path
    sources: dict[str, Path]  # task -> specialist folder

    @classmethod
    def at(cls, root: Path) -> DemoFamily:
        return cls(root=root, base=root / "base", sources={task: root / task for task in TASKS})

    def data(self, task: str, split: str) -> Path:
        """``data/<task>/<split>.jsonl``; ``split`` is ``search`` or ``heldout``."""
        if task not in TASKS:
            raise DemoFamilyError(f"demo family: unknown task {task!r}; expected one of {list(TASKS)}")
        if split not in SPLITS:
            raise DemoFamilyError(f"demo family: unknown split {split!r}; expected one of {list(SPLITS)}")
        return self.root / "data" / task / f"{split}.jsonl"


def ensure_family(
    root: Path, *, seed: int = 0, progress: bool = True, plan: FamilyPlan = PLAN
) -> DemoFamily:
    """The demo family in ``root``, built first if it is missing or from another version/seed.

    A build goes into a temp sibling folder that is renamed into place only when
    complete, so an interrupted build never leaves a folder that looks complete.
    ``plan`` is for tests (a few training steps); the demo uses the default.
    """
    root = Path(root).expanduser().absolute()
    if is_current(root, seed, plan):
        return DemoFamily.at(root)
    with build_lock(root):  # a second caller waits, then finds the first one's build
        if not is_current(root, seed, plan):
            build_into_place(root, seed=seed, progress=progress, plan=plan)
    return DemoFamily.at(root)
