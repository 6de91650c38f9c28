"""The built-in demo family: the shipped files, their manifest, the build, what the models know.

Tests of trained quality read the family shipped in ``studies/logistics/family`` (verified
against its manifest); the build itself is tested on a tiny plan of a few training steps.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from search.cli import main as search_main
from search.config import load_study
from search.errors import StudyConfigError
from studies.demo_family import SHIPPED_ROOT, TASKS, DemoFamily, DemoFamilyError, verify_family
from studies.demo_family.build import FamilyPlan, rebuild_family
from studies.demo_family.shipped import FAMILY_VERSION, MANIFEST, REQUIRED_FILES
from studies.demo_family.stop import BuildTerminated
from studies.demo_family.tasks import (
    POLICY_CURRENT,
    POLICY_OLD,
    SLICE_ROWS,
    catalog_answer,
    refund_answer,
    shipping_answer,
    split_task,
    split_tasks,
)
from studies.demo_family.train import ModelShape, Schedule, fixed_threads

REPO = Path(__file__).resolve().parents[1]
DEMO_STUDY = REPO / "studies" / "logistics" / "study.toml"

# A few steps of a very small model: exercises the whole build in about a second.
TINY_PLAN = FamilyPlan(
    shape=ModelShape(hidden=16, layers=2, heads=2, intermediate=32),
    base=Schedule(steps=3, lr=1e-3, batch_size=8),
    specialist_steps=2,
)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models: one torch thread is faster than two that spin on a busy machine."""
    with fixed_threads(1):
        yield


def read_rows(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def family(demo_family_root: Path) -> DemoFamily:
    return DemoFamily.at(demo_family_root)


def folder_state(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` (hidden ones too) -> (size, mtime): what a write would change."""
    return {
        path.relative_to(root).as_posix(): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(root.rglob("*"))
    }


# -- layout and files ------------------------------------------------------------


@pytest.mark.slow
def test_every_folder_is_a_normal_hf_checkpoint(family: DemoFamily) -> None:
    folders = [family.base, *family.sources.values()]
    assert [f.name for f in folders] == ["base", *TASKS]
    first_embedding = None
    for folder in folders:
        assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
        model = AutoModelForCausalLM.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert model.config.model_type == "llama"
        assert model.config.tie_word_embeddings is False
        assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
        stored = load_file(folder / "model.safetensors")
        assert all(t.dtype == torch.float32 for t in stored.values())
        assert "lm_head.weight" in stored
        assert len(tokenizer) == model.config.vocab_size
        ids = tokenizer("ship zone 3 speed express weight 4 2 =").input_ids
        assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
        assert tokenizer.eos_token_id == model.config.eos_token_id
        embedding = stored["model.embed_tokens.weight"]
        if first_embedding is None:
            first_embedding = embedding
        else:  # specialists are fine-tuned copies: same shapes, different weights
            assert embedding.shape == first_embedding.shape
    base = load_file(family.base / "model.safetensors")
    for task, folder in family.sources.items():
        source = load_file(folder / "model.safetensors")
        assert source.keys() == base.keys()
        assert any(not torch.equal(source[k], base[k]) for k in base), task


@pytest.mark.slow
def test_slices_are_full_disjoint_and_never_trained_on(family: DemoFamily) -> None:
    for task in TASKS:
        search = read_rows(family.data(task, "search"))
        heldout = read_rows(family.data(task, "heldout"))
        assert len(search) == len(heldout) == SLICE_ROWS
        for row in search + heldout:
            assert set(row) == {"prompt", "answer"}
            assert row["prompt"].endswith(" =") and row["answer"]
        search_prompts = {r["prompt"] for r in search}
        heldout_prompts = {r["prompt"] for r in heldout}
        assert len(search_prompts) == len(heldout_prompts) == SLICE_ROWS
        assert not search_prompts & heldout_prompts
        # The build's training pool is regenerated from the seed; the files came from it.
        split = split_task(task, seed=0)
        assert heldout == [e.as_row() for e in split.heldout]
        assert search == [e.as_row() for e in split.search]
        assert not (search_prompts | heldout_prompts) & split.train_prompts()


@pytest.mark.slow
def test_the_shipped_manifest_lists_every_file_with_its_checksum(family: DemoFamily) -> None:
    assert family.root == SHIPPED_ROOT
    manifest = json.loads((family.root / MANIFEST).read_text())
    assert manifest["version"] == FAMILY_VERSION and manifest["seed"] == 0
    assert manifest["tasks"] == list(TASKS) and manifest["models"] == ["base", *TASKS]
    assert manifest["cpu_capability"]  # the instruction set it was trained with
    hashed = manifest["sha256"]
    on_disk = sorted(p.relative_to(family.root).as_posix() for p in family.root.rglob("*") if p.is_file())
    assert sorted([*hashed, MANIFEST]) == on_disk  # nothing unlisted, nothing missing
    assert set(REQUIRED_FILES) <= set(hashed)
    for relative, digest in hashed.items():
        assert hashlib.sha256((family.root / relative).read_bytes()).hexdigest() == digest, relative
    accuracy = manifest["heldout_exact_match"]  # what the build measured on held-out rows
    assert all(accuracy[task][task] >= 0.95 and accuracy["base"][task] <= 0.1 for task in TASKS)


def test_the_shipped_study_uses_the_shipped_family() -> None:
    config = load_study(DEMO_STUDY)
    assert config.models.demo_family
    assert config.models.base == SHIPPED_ROOT / "base"
    assert config.models.sources == {t: SHIPPED_ROOT / t for t in TASKS}
    assert [t.search for t in config.tasks] == [SHIPPED_ROOT / "data" / t / "search.jsonl" for t in TASKS]


@pytest.mark.slow
def test_specialists_know_their_task_and_the_base_does_not(family: DemoFamily) -> None:
    """Greedy generation on the first 40 held-out rows of each task."""
    tokenizer = AutoTokenizer.from_pretrained(family.base)

    def accuracy(folder: Path, task: str) -> float:
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        rows = read_rows(family.data(task, "heldout"))[:40]
        hits = 0
        for row in rows:
            inputs = tokenizer(row["prompt"], return_tensors="pt")
            out = model.generate(**inputs, do_sample=False, max_new_tokens=10)
            answer = tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)
            hits += answer.strip() == row["answer"]
        return hits / len(rows)

    for task in TASKS:
        assert accuracy(family.sources[task], task) >= 0.9, task
        assert accuracy(family.base, task) <= 0.25, task
    # A specialist stays far below on another task (it kept the base's old answers there).
    assert accuracy(family.sources["shipping"], "catalog") <= 0.3
    assert accuracy(family.sources["catalog"], "refunds") <= 0.3


@pytest.mark.slow
def test_search_demo_checks_and_prints_the_family_and_writes_nothing(
    family: DemoFamily, capsys: pytest.CaptureFixture[str]
) -> None:
    before = folder_state(family.root.parent)
    assert search_main(["demo"]) == 0
    out = capsys.readouterr().out
    assert str(family.root) in out and str(family.sources["refunds"]) in out
    assert "matches family.json" in out
    assert folder_state(family.root.parent) == before


# -- the build, on a tiny plan -------------------------------------------------------


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_rebuild_is_byte_identical_and_its_manifest_checks_out(tmp_path: Path) -> None:
    first = rebuild_family(tmp_path / "one", seed=3, progress=False, plan=TINY_PLAN)
    second = rebuild_family(tmp_path / "two", seed=3, progress=False, plan=TINY_PLAN)
    files = tree_bytes(first.root)
    assert files == tree_bytes(second.root)  # family.json included: it holds no timings
    manifest = json.loads(files[MANIFEST])
    assert sorted(manifest["sha256"]) == sorted(set(files) - {MANIFEST})
    assert set(REQUIRED_FILES) <= set(manifest["sha256"])
    assert manifest["version"] == FAMILY_VERSION and manifest["seed"] == 3
    assert verify_family(first.root) == first
    other = rebuild_family(tmp_path / "three", seed=4, progress=False, plan=TINY_PLAN)
    other_hashes = json.loads((other.root / MANIFEST).read_text())["sha256"]
    assert other_hashes["base/model.safetensors"] != manifest["sha256"]["base/model.safetensors"]
    assert other_hashes["data/refunds/heldout.jsonl"] != manifest["sha256"]["data/refunds/heldout.jsonl"]


def test_a_rebuild_replaces_the_folder_and_leaves_nothing_beside_it(tmp_path: Path) -> None:
    root = tmp_path / "family"
    rebuild_family(root, seed=1, progress=False, plan=TINY_PLAN)
    first = (root / "data" / "shipping" / "search.jsonl").read_text()
    rebuild_family(root, seed=2, progress=False, plan=TINY_PLAN)
    assert json.loads((root / MANIFEST).read_text())["seed"] == 2
    assert (root / "data" / "shipping" / "search.jsonl").read_text() != first
    assert [p.name for p in tmp_path.iterdir()] == ["family"]  # no lock, temp or old folder
    verify_family(root)


def test_leftovers_of_a_killed_build_are_removed_by_the_next_build(tmp_path: Path) -> None:
    root = tmp_path / "family"
    # What `kill -9` during a build leaves: its temp folder, the lock file, a renamed old build.
    (tmp_path / ".family.tmp-999999" / "base").mkdir(parents=True)
    (tmp_path / ".family.old-999998" / "data").mkdir(parents=True)
    (tmp_path / ".family.lock").write_text("")
    (tmp_path / "mine.txt").write_text("not the build's")  # never touched
    rebuild_family(root, seed=0, progress=False, plan=TINY_PLAN)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["family", "mine.txt"]


# Never finishes on its own: the test interrupts it once it is training.
ENDLESS_PLAN = FamilyPlan(
    shape=TINY_PLAN.shape, base=Schedule(steps=10**9, lr=1e-3, batch_size=8), specialist_steps=2
)


@pytest.mark.parametrize(
    ("signum", "raised"),
    [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, BuildTerminated)],
    ids=["ctrl-c", "sigterm"],
)
def test_an_interrupted_rebuild_leaves_the_old_family_and_nothing_else(
    tmp_path: Path, signum: signal.Signals, raised: type[BaseException]
) -> None:
    """A real signal to this process while it trains; the build must unwind and clean up."""
    root = tmp_path / "family"
    rebuild_family(root, seed=0, progress=False, plan=TINY_PLAN)
    before = tree_bytes(root)
    sigterm_before = signal.getsignal(signal.SIGTERM)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
    training = threading.Event()

    def interrupt_once_training() -> None:
        deadline = time.monotonic() + 300  # a hang guard only: the wait is for a state
        # The slices are written before training starts: once they exist, it is training.
        while not list(tmp_path.glob(".family.tmp-*/data/catalog/heldout.jsonl")):
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)
        training.set()
        os.kill(os.getpid(), signum)

    watcher = threading.Thread(target=interrupt_once_training, daemon=True)
    watcher.start()
    try:
        with pytest.raises(raised):
            rebuild_family(root, seed=0, progress=False, plan=ENDLESS_PLAN)
    finally:
        signal.signal(signal.SIGINT, previous)
    watcher.join()
    assert training.is_set()
    assert signal.getsignal(signal.SIGTERM) == sigterm_before  # the build's handler is gone
    assert [p.name for p in tmp_path.iterdir()] == ["family"]  # no temp folder, no lock
    assert tree_bytes(root) == before


def test_verify_names_the_file_that_differs_and_the_fix(tmp_path: Path) -> None:
    root = rebuild_family(tmp_path / "family", seed=0, progress=False, plan=TINY_PLAN).root
    weights = root / "refunds" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(DemoFamilyError) as err:
        verify_family(root)
    message = str(err.value)
    assert message.startswith(f"{weights}: differs from the demo family's manifest")
    assert f"git checkout -- {root}" in message and "search demo --rebuild" in message
    (root / "data" / "catalog" / "search.jsonl").unlink()
    with pytest.raises(DemoFamilyError, match=r"data/catalog/search\.jsonl: missing"):
        verify_family(root)
    manifest = json.loads((root / MANIFEST).read_text())
    (root / MANIFEST).write_text(json.dumps({**manifest, "version": "1"}))
    with pytest.raises(DemoFamilyError, match="version '1'"):
        verify_family(root)
    (root / MANIFEST).write_text("{not json")
    with pytest.raises(DemoFamilyError, match="family.json: unreadable"):
        verify_family(root)
    (root / MANIFEST).unlink()
    with pytest.raises(DemoFamilyError, match="family.json: missing"):
        verify_family(root)


def test_bad_root_and_bad_names_raise_demo_family_errors(tmp_path: Path) -> None:
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("x")
    with pytest.raises(DemoFamilyError, match="not-a-folder.*not a folder"):
        rebuild_family(a_file, progress=False, plan=TINY_PLAN)
    assert a_file.read_text() == "x"
    family = DemoFamily.at(tmp_path)
    with pytest.raises(DemoFamilyError, match="unknown split 'train'"):
        family.data("shipping", "train")
    with pytest.raises(DemoFamilyError, match="unknown task 'returns'"):
        family.data("returns", "search")


def test_demo_family_with_another_base_is_an_error_and_builds_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue: a copied study.toml with `demo_family = true` trained a family next to its base."""
    study = tmp_path / "study.toml"
    study.write_text(DEMO_STUDY.read_text())  # "family/base" now means tmp_path/family/base
    with pytest.raises(StudyConfigError, match=r"study\.toml: models\.base: demo_family = true"):
        load_study(study)
    assert search_main(["validate", str(study)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "models.base" in err
    assert str(SHIPPED_ROOT / "base") in err
    assert [p.name for p in tmp_path.iterdir()] == ["study.toml"]


def test_splits_are_deterministic_and_disjoint_per_seed() -> None:
    assert split_tasks(7) == split_tasks(7)
    assert split_tasks(7)["catalog"].heldout != split_tasks(8)["catalog"].heldout
    for split in split_tasks(7).values():
        slices = {e.prompt for e in split.search} | {e.prompt for e in split.heldout}
        assert len(slices) == 2 * SLICE_ROWS and not slices & split.train_prompts()


@settings(max_examples=60, deadline=None)
@given(
    zone=st.integers(1, 9), speed=st.sampled_from(("ground", "express", "overnight")),
    weight=st.integers(0, 99), days=st.integers(0, 99),
    item=st.sampled_from(("shoes", "phone", "book", "toy", "sofa", "shirt")),
    condition=st.sampled_from(("new", "opened", "damaged", "defective")),
    letter=st.sampled_from("abcdefgh"), digits=st.tuples(*[st.integers(0, 9)] * 3),
)
def test_old_policy_answers_differ_from_current_everywhere(
    zone: int, speed: str, weight: int, days: int, item: str, condition: str,
    letter: str, digits: tuple[int, int, int],
) -> None:
    """The base (old policy) can never be right by knowing its rules: every cell changed."""
    assert shipping_answer(zone, speed, weight, POLICY_OLD) != shipping_answer(zone, speed, weight, POLICY_CURRENT)
    assert refund_answer(days, item, condition, POLICY_OLD) != refund_answer(days, item, condition, POLICY_CURRENT)
    assert catalog_answer(letter, *digits, POLICY_OLD) != catalog_answer(letter, *digits, POLICY_CURRENT)


@pytest.mark.slow
def test_default_merges_fall_short_and_a_tuned_one_does_not(family: DemoFamily) -> None:
    """The room a search needs: untuned merges lose a task, a coarse-grid TIES keeps all three."""
    from fitness.scoring import score_slice
    from fitness.slices import load_task
    from fitness.spec import TaskSpec
    from merges.checkpoint import open_checkpoint
    from merges.engine import MergeEngine
    from merges.recipe import Recipe

    tokenizer = AutoTokenizer.from_pretrained(family.base)
    heldout = {
        task: load_task(TaskSpec(task, family.data(task, "search"), family.data(task, "heldout")),
                        tokenizer).heldout
        for task in TASKS
    }
    base, sources = str(family.base), [str(family.sources[t]) for t in TASKS]
    engine = MergeEngine(open_checkpoint(base), [open_checkpoint(s) for s in sources], device="cpu")
    model = engine.new_model()

    def weakest(recipe: Recipe) -> float:
        engine.merge_into(model, recipe)
        return min(score_slice(model, heldout[task]) for task in TASKS)

    uniform = Recipe.uniform("linear", None, sources, 4, {"weight": [1 / 3] * 3})
    ties_default = Recipe.uniform("ties", base, sources, 4, {"weight": [1 / 3] * 3, "density": [0.5] * 3})
    ties_tuned = Recipe.uniform("ties", base, sources, 4, {"weight": [1.0] * 3, "density": [0.5] * 3},
                                {"lambda": 1.5})
    assert weakest(uniform) <= 0.1
    assert weakest(ties_default) <= 0.5
    assert weakest(ties_tuned) >= 0.7
