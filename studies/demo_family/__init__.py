"""The built-in demo family: a tiny Llama base and three logistics specialists.

The repository ships it, built once on the CPU by :mod:`studies.demo_family.build`, in
``studies/logistics/family`` (:data:`SHIPPED_ROOT`) with a SHA-256 per file in its
manifest; :func:`shipped_family` verifies and returns it. Layout::

    base/ shipping/ refunds/ catalog/         Hugging Face checkpoints (float32 safetensors)
    data/<task>/search.jsonl                  200 rows {"prompt", "answer"} per task
    data/<task>/heldout.jsonl                 200 rows, disjoint from search and training
    family.json                               manifest: version, seed, plan, held-out scores, sha256

``studies.demo_family.build.rebuild_family`` (``search demo --rebuild``) retrains it.
The text format of each task is documented in :mod:`studies.demo_family.tasks`.
This package imports no torch: the study loader uses it.
"""

from studies.demo_family.errors import DemoFamilyError
from studies.demo_family.shipped import (
    SHIPPED_ROOT,
    DemoFamily,
    shipped_family,
    verify_family,
    verify_study_base,
)
from studies.demo_family.tasks import TASKS

__all__ = [
    "SHIPPED_ROOT", "TASKS", "DemoFamily", "DemoFamilyError",
    "shipped_family", "verify_family", "verify_study_base",
]
