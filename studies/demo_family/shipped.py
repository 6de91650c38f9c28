"""The demo family as this repository ships it: where it lies, its manifest, its checksums.

CPU training is not bit-reproducible across instruction sets (AVX2 and AVX-512 kernels
round differently), so the family is built once and its files are checked in with a
SHA-256 per file in ``family.json``. Loading it verifies every file, so a study never
runs on a family other than the one its README tables were measured on without saying so.
Light on purpose (no torch): ``search.config`` imports it, ``search.definition`` its
:func:`sha256_file`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from studies.demo_family.errors import DemoFamilyError
from studies.demo_family.tasks import TASKS

# The demo's own folder: the only place `search demo --rebuild` writes to.
SHIPPED_ROOT = Path(__file__).resolve().parents[1] / "logistics" / "family"
MANIFEST = "family.json"
MANIFEST_FORMAT = "mergesearch-demo-family"
# 2: the manifest holds only what the build determines (no timings), so a rebuild on the
# machine type it was built on reproduces every shipped byte, family.json included.
FAMILY_VERSION = "2"
MODELS: tuple[str, ...] = ("base", *TASKS)
SPLITS: tuple[str, ...] = ("search", "heldout", "test")  # test: studies.demo_family.test_rows
# Files every build writes; the manifest may list more (tokenizer files), never fewer.
REQUIRED_FILES: tuple[str, ...] = (
    *(f"{model}/{name}" for model in MODELS for name in ("config.json", "model.safetensors")),
    *(f"data/{task}/{split}.jsonl" for task in TASKS for split in SPLITS),
)


@dataclass(frozen=True)
class DemoFamily:
    root: Path
    base: Path
    sources: dict[str, Path]  # task -> specialist folder

    @classmethod
    def at(cls, root: Path) -> DemoFamily:
        return cls(root=root, base=root / "base", sources={task: root / task for task in TASKS})

    def data(self, task: str, split: str) -> Path:
        """``data/<task>/<split>.jsonl``; ``split`` is ``search``, ``heldout`` or ``test``."""
        if task not in TASKS:
            raise DemoFamilyError(f"demo family: unknown task {task!r}; expected one of {list(TASKS)}")
        if split not in SPLITS:
            raise DemoFamilyError(f"demo family: unknown split {split!r}; expected one of {list(SPLITS)}")
        return self.root / "data" / task / f"{split}.jsonl"


def shipped_family() -> DemoFamily:
    """The demo family checked in with this repository, every file verified."""
    return verify_family(SHIPPED_ROOT)


def verify_study_base(base: Path) -> DemoFamily:
    """What ``models.demo_family = true`` means: ``base`` is the shipped family's base, and
    every file of the shipped family matches its manifest. Nothing is ever built here."""
    expected = SHIPPED_ROOT / "base"
    if Path(base).expanduser().absolute().resolve() != expected:
        raise DemoFamilyError(
            f"demo_family = true is for the demo family shipped in this repository, whose base "
            f"is {expected}; got {base}. Point the study at that folder (as "
            f"studies/logistics/study.toml does), or remove demo_family to use your own checkpoints"
        )
    return shipped_family()


def verify_family(root: Path) -> DemoFamily:
    """``root`` as a :class:`DemoFamily` when every file matches its manifest checksum.

    Raises :class:`DemoFamilyError` naming the first missing or differing file and the fix.
    """
    root = Path(root).expanduser().absolute()
    manifest = read_manifest(root)
    if manifest is None:
        raise DemoFamilyError(f"{root / MANIFEST}: missing, so {root} holds no demo family; {fix_hint(root)}")
    where = root / MANIFEST
    if manifest.get("format") != MANIFEST_FORMAT:
        raise DemoFamilyError(f"{where}: format is {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    if manifest.get("version") != FAMILY_VERSION:
        raise DemoFamilyError(
            f"{where}: demo family version {manifest.get('version')!r}, this code reads version "
            f"{FAMILY_VERSION!r}; {fix_hint(root)}"
        )
    digests = manifest.get("sha256")
    if not isinstance(digests, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in digests.items()
    ):
        raise DemoFamilyError(f"{where}: sha256: expected an object of file -> hex digest")
    unlisted = [name for name in REQUIRED_FILES if name not in digests]
    if unlisted:
        raise DemoFamilyError(f"{where}: sha256: lists no checksum for {unlisted[0]}; {fix_hint(root)}")
    for relative, digest in sorted(digests.items()):
        parts = PurePosixPath(relative).parts
        if PurePosixPath(relative).is_absolute() or ".." in parts:
            raise DemoFamilyError(f"{where}: sha256: {relative!r} is not a path inside the family folder")
        path = root / relative
        if not path.is_file():
            raise DemoFamilyError(f"{path}: missing from the demo family; {fix_hint(root)}")
        actual = sha256_file(path)
        if actual != digest:
            raise DemoFamilyError(
                f"{path}: differs from the demo family's manifest (sha256 {actual[:12]}..., "
                f"{MANIFEST} says {digest[:12]}...); {fix_hint(root)}"
            )
    return DemoFamily.at(root)


def fix_hint(root: Path) -> str:
    return (
        f"restore the shipped files with `git checkout -- {root}`, or retrain the family "
        "and rewrite its manifest with `search demo --rebuild`"
    )


def read_manifest(root: Path) -> dict[str, object] | None:
    """The manifest in ``root``, or None when there is none."""
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise DemoFamilyError(f"{path}: unreadable demo-family manifest ({exc})") from exc
    if not isinstance(manifest, dict):
        raise DemoFamilyError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    return manifest


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks: the demo's manifest and the study definition's
    data fingerprints (``search.definition``, which imports it from here: this module imports
    nothing of ``search``, so neither direction cycles)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_hashes(root: Path) -> dict[str, str]:
    """Every file under ``root`` but the manifest: relative POSIX path -> SHA-256."""
    return {
        path.relative_to(root).as_posix(): sha256_file(path)
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.relative_to(root).as_posix() != MANIFEST
    }
