"""Build the demo family into a folder: data slices, a base, three specialists, a manifest.

The base learns every task under the old policy with noisy answers (plus a copy task);
each specialist is fine-tuned from the base on its task under the current policy,
with half of every batch replaying the base's mix of the other tasks. See
``studies/demo_family/README.md`` for why each choice is there.

The repository ships the result (``studies/logistics/family``); nothing builds it
implicitly. ``rebuild_family`` (``search demo --rebuild``) retrains it in place.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from studies.demo_family.errors import DemoFamilyError
from studies.demo_family.shipped import (
    FAMILY_VERSION,
    MANIFEST,
    MANIFEST_FORMAT,
    MODELS,
    SHIPPED_ROOT,
    DemoFamily,
    file_hashes,
)
from studies.demo_family.stop import raise_if_stopped, stop_on_signals
from studies.demo_family.tasks import SLICE_ROWS, TASKS, Example, TaskSplit, split_tasks
from studies.demo_family.tokenizer import build_tokenizer
from studies.demo_family.train import (
    TRAIN_THREADS,
    CopyPool,
    Encoder,
    Mix,
    ModelShape,
    Pool,
    Schedule,
    batches,
    exact_match,
    fixed_threads,
    new_model,
    train,
)


@dataclass(frozen=True)
class FamilyPlan:
    """How the family is trained (recorded in the manifest)."""

    shape: ModelShape = field(default_factory=ModelShape)
    base: Schedule = field(default_factory=lambda: Schedule(steps=700, lr=3e-3))
    base_noise: float = 0.4  # share of base answers replaced by another answer of the task
    copy_share: float = 0.25  # share of the base mix that is the copy task
    specialist_steps: int = 200
    # Different learning rates make the task vectors uneven, so weights per source matter.
    specialist_lr: tuple[tuple[str, float], ...] = (
        ("shipping", 5e-4),
        ("refunds", 1e-3),
        ("catalog", 3e-4),
    )
    replay_share: float = 0.5  # share of a specialist batch replaying the base mix

    def specialist_schedule(self, task: str) -> Schedule:
        return Schedule(steps=self.specialist_steps, lr=dict(self.specialist_lr)[task])

    @property
    def total_steps(self) -> int:
        return self.base.steps + self.specialist_steps * len(TASKS)


PLAN = FamilyPlan()


@dataclass(frozen=True)
class TrainingStream:
    """What one model of the family is trained on: its mix, schedule and stream seed."""

    model: str
    mix: Mix
    schedule: Schedule
    seed: int


def training_streams(plan: FamilyPlan, seed: int, old: Mapping[str, Pool], current: Mapping[str, Pool],
                     copy_pool: Pool | CopyPool) -> list[TrainingStream]:
    """Every model's training stream in build order (base, then each specialist): the one place
    that says what each model sees (the build trains on it; ``test_rows`` replays its draws)."""
    task_share = (1 - plan.copy_share) / len(TASKS)
    streams = [TrainingStream("base", Mix((*((task_share, old[t]) for t in TASKS), (plan.copy_share, copy_pool))),
                              plan.base, seed)]
    for index, task in enumerate(TASKS):
        replay = [(task_share, old[t]) for t in TASKS if t != task] + [(plan.copy_share, copy_pool)]
        replay_total = sum(share for share, _ in replay)
        mix = Mix((
            *((plan.replay_share * share / replay_total, pool) for share, pool in replay),
            (1 - plan.replay_share, current[task]),
        ))
        streams.append(TrainingStream(task, mix, plan.specialist_schedule(task), seed * 10 + index + 1))
    return streams


def rebuild_family(
    root: Path = SHIPPED_ROOT, *, seed: int = 0, progress: bool = True, plan: FamilyPlan = PLAN
) -> DemoFamily:
    """Retrain the family and put it at ``root`` (replacing what is there), atomically.

    The build goes into a temp sibling ``.<root>.tmp-<pid>`` renamed into place only when
    complete; Ctrl-C or SIGTERM removes it (and the lock) before the process ends, and a
    build killed outright leaves leftovers that the next build removes. ``root`` other than
    the shipped folder and ``plan`` are for tests (a few training steps).
    """
    root = Path(root).expanduser().absolute()
    if root.exists() and not root.is_dir():
        raise DemoFamilyError(f"{root}: exists and is not a folder; cannot hold the demo family")
    started, started_cpu = time.perf_counter(), time.process_time()
    with stop_on_signals(), build_lock(root):
        # Under the lock, leftovers are nobody's work in progress: a killed build's.
        for leftover in [*root.parent.glob(f".{root.name}.tmp-*"), *root.parent.glob(f".{root.name}.old-*")]:
            shutil.rmtree(leftover, ignore_errors=True)
        temp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
        temp.mkdir()
        try:
            build_family(temp, seed=seed, progress=progress, plan=plan)
            raise_if_stopped()  # an interrupt swallowed while saving still cancels the build
            if root.exists():
                stale = root.with_name(f".{root.name}.old-{os.getpid()}")
                os.replace(root, stale)
                try:
                    os.replace(temp, root)
                except BaseException:
                    os.replace(stale, root)  # the old family goes back into place
                    raise
                shutil.rmtree(stale)
            else:
                os.replace(temp, root)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
    if progress:
        print(
            f"demo family built in {time.perf_counter() - started:.0f} s "
            f"({time.process_time() - started_cpu:.0f} s CPU) at {root}",
            file=sys.stderr,
        )
    return DemoFamily.at(root)


def build_family(out: Path, *, seed: int, progress: bool, plan: FamilyPlan = PLAN) -> dict[str, object]:
    """Write the whole family into the empty folder ``out``; returns the manifest written."""
    with fixed_threads(TRAIN_THREADS):
        return _build_family(out, seed=seed, progress=progress, plan=plan)


def _build_family(out: Path, *, seed: int, progress: bool, plan: FamilyPlan) -> dict[str, object]:
    started = time.perf_counter()
    tokenizer = build_tokenizer()
    encoder = Encoder(tokenizer)
    splits = split_tasks(seed)
    for split in splits.values():
        check_disjoint(split)
        write_slices(out / "data" / split.task, split)

    old = {t: Pool(tuple(encoder.encode(e) for e in s.train_old), plan.base_noise) for t, s in splits.items()}
    current = {t: Pool(tuple(encoder.encode(e) for e in s.train_current)) for t, s in splits.items()}
    streams = training_streams(plan, seed, old, current, CopyPool(encoder))

    # A live bar on a terminal; in logs (CI, nohup) one plain line per trained model instead.
    live = progress and sys.stderr.isatty()
    bar = tqdm(total=plan.total_steps, desc="demo family", unit="step", disable=not live)

    def trained(name: str) -> None:
        if progress and not live:
            print(f"demo family: {name} trained ({time.perf_counter() - started:.0f} s)",
                  file=sys.stderr, flush=True)

    base = new_model(plan.shape, tokenizer, seed=seed)
    base_stream = streams[0]
    train(base, batches(base_stream.mix, batch_size=base_stream.schedule.batch_size, pad=encoder.pad,
                        seed=base_stream.seed), base_stream.schedule, bar=bar, label="base")
    save_model(base, tokenizer, out / "base")
    trained("base")

    models: dict[str, LlamaForCausalLM] = {"base": base}
    for task, spec in zip(TASKS, streams[1:], strict=True):
        specialist = copy.deepcopy(base)
        stream = batches(spec.mix, batch_size=spec.schedule.batch_size, pad=encoder.pad, seed=spec.seed)
        train(specialist, stream, spec.schedule, bar=bar, label=task)
        save_model(specialist, tokenizer, out / task)
        trained(task)
        models[task] = specialist
    bar.close()

    # The test slices come from what training drew (replayed): written once training is done.
    from studies.demo_family.test_rows import unseen_slices  # it imports this module

    tests = unseen_slices(splits, seed=seed, plan=plan)
    for split in splits.values():
        check_disjoint(split, tests[split.task])
        write_text_atomic(out / "data" / split.task / "test.jsonl", slice_text(tests[split.task]))

    heldout = {t: [encoder.encode(e) for e in s.heldout] for t, s in splits.items()}
    accuracy = {
        name: {t: round(exact_match(model, heldout[t], pad=encoder.pad), 4) for t in TASKS}
        for name, model in models.items()
    }
    # Only what the build determines (no timings): a rebuild on the same kind of machine
    # reproduces this file byte for byte, so `git status` shows whether anything changed.
    manifest: dict[str, object] = {
        "format": MANIFEST_FORMAT,
        "version": FAMILY_VERSION,
        "seed": seed,
        "tasks": list(TASKS),
        "models": list(MODELS),
        "slice_rows": SLICE_ROWS,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python_version": platform.python_version(),
        # Float training results depend on the kernels torch picks for the CPU.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "train_threads": TRAIN_THREADS,
        "plan": plan_record(plan),
        "heldout_exact_match": accuracy,
        "sha256": file_hashes(out),
    }
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def check_disjoint(split: TaskSplit, test: Sequence[Example] = ()) -> None:
    """Slices are full, disjoint from each other, and never seen in training (the test slice:
    disjoint from search and held-out; ``test_rows`` says what training saw of it)."""
    search = {e.prompt for e in split.search}
    heldout = {e.prompt for e in split.heldout}
    tested = {e.prompt for e in test}
    train = split.train_prompts()
    problems = []
    if len(search) != SLICE_ROWS or len(heldout) != SLICE_ROWS:
        problems.append(f"slices have {len(search)} search / {len(heldout)} held-out distinct prompts")
    if search & heldout:
        problems.append(f"search and held-out share {sorted(search & heldout)[:3]}")
    if (search | heldout) & train:
        problems.append(f"training data contains slice prompts {sorted((search | heldout) & train)[:3]}")
    if tested & (search | heldout) or len(tested) != len(test):
        problems.append("the test slice repeats a prompt or shares one with search / held-out")
    if problems:
        raise DemoFamilyError(f"demo task {split.task}: " + "; ".join(problems))


def write_slices(folder: Path, split: TaskSplit) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("search", split.search), ("heldout", split.heldout)):
        write_text_atomic(folder / f"{name}.jsonl", slice_text(rows))


def slice_text(rows: Sequence[Example]) -> str:
    """A slice file's text: one JSON row per line."""
    return "".join(json.dumps(e.as_row()) + "\n" for e in rows)


def save_model(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, folder: Path) -> None:
    """A normal Hugging Face checkpoint: config, float32 safetensors, tokenizer files."""
    # transformers draws a "Writing model shards" bar per save; the build has its own.
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder, safe_serialization=True)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(folder)


def write_text_atomic(path: Path, text: str) -> None:
    temp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with temp.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)


def write_json_atomic(path: Path, data: dict[str, object]) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def plan_record(plan: FamilyPlan) -> object:
    """The plan as the manifest stores it (JSON types)."""
    return json.loads(json.dumps(asdict(plan)))


@contextlib.contextmanager
def build_lock(root: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``.<root>.lock`` next to ``root``; the file goes at the end.

    The lock file is removed while still locked, so a waiter may wake holding a lock on a
    file no longer there: it checks that the path still names its file, else retries.
    """
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: concurrent builds stay safe, only wasteful
        yield
        return
    path = root.with_name(f".{root.name}.lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)
