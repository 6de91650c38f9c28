"""The built-in demo family: layout, slices, manifest, determinism, and what the models know."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from search.cli import main as search_main
from studies.demo_family import TASKS, DemoFamily, DemoFamilyError, FamilyPlan, ensure_family
from studies.demo_family.build import FAMILY_VERSION, MANIFEST, is_current
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
    return ensure_family(demo_family_root, progress=False)


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
def test_manifest_describes_the_build(family: DemoFamily) -> None:
    manifest = json.loads((family.root / MANIFEST).read_text())
    assert manifest["version"] == FAMILY_VERSION and manifest["seed"] == 0
    assert manifest["tasks"] == list(TASKS)
    assert manifest["torch_version"] == torch.__version__
    assert manifest["build_seconds"] > 0 and manifest["build_cpu_seconds"] > 0
    hashed = manifest["sha256"]
    assert "base/model.safetensors" in hashed and "data/catalog/heldout.jsonl" in hashed
    import hashlib

    for relative, digest in hashed.items():
        assert hashlib.sha256((family.root / relative).read_bytes()).hexdigest() == digest, relative


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
def test_ensure_family_reuses_a_current_build(family: DemoFamily) -> None:
    manifest = family.root / MANIFEST
    before = manifest.stat().st_mtime_ns
    again = ensure_family(family.root, progress=False)
    assert again == family and manifest.stat().st_mtime_ns == before
    assert not is_current(family.root, seed=1)  # another seed would rebuild


@pytest.mark.slow
def test_search_demo_command_prints_the_family(family: DemoFamily, capsys: pytest.CaptureFixture[str]) -> None:
    assert search_main(["demo", "--root", str(family.root), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert str(family.root) in out and str(family.sources["refunds"]) in out


# -- determinism and the build itself, on a tiny plan ------------------------------


def test_same_seed_builds_identical_files(tmp_path: Path) -> None:
    first = ensure_family(tmp_path / "one", seed=3, progress=False, plan=TINY_PLAN)
    second = ensure_family(tmp_path / "two", seed=3, progress=False, plan=TINY_PLAN)
    hashes = [json.loads((f.root / MANIFEST).read_text())["sha256"] for f in (first, second)]
    assert hashes[0] == hashes[1]
    assert "shipping/model.safetensors" in hashes[0]
    other = ensure_family(tmp_path / "three", seed=4, progress=False, plan=TINY_PLAN)
    other_hashes = json.loads((other.root / MANIFEST).read_text())["sha256"]
    assert other_hashes["base/model.safetensors"] != hashes[0]["base/model.safetensors"]
    assert other_hashes["data/refunds/heldout.jsonl"] != hashes[0]["data/refunds/heldout.jsonl"]


def test_rebuild_replaces_another_seed_and_leaves_no_temp(tmp_path: Path) -> None:
    root = tmp_path / "family"
    ensure_family(root, seed=1, progress=False, plan=TINY_PLAN)
    first = (root / "data" / "shipping" / "search.jsonl").read_text()
    assert is_current(root, 1, TINY_PLAN) and not is_current(root, 2, TINY_PLAN)
    assert not is_current(root, 1)  # the default plan is not what was built
    ensure_family(root, seed=2, progress=False, plan=TINY_PLAN)
    assert json.loads((root / MANIFEST).read_text())["seed"] == 2
    assert (root / "data" / "shipping" / "search.jsonl").read_text() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == [".family.lock", "family"]


def test_a_build_without_manifest_or_model_is_not_complete(tmp_path: Path) -> None:
    root = tmp_path / "family"
    killed = tmp_path / ".family.tmp-999999"  # what a build killed half-way leaves behind
    (killed / "base").mkdir(parents=True)
    assert not is_current(root, 0, TINY_PLAN)
    ensure_family(root, seed=0, progress=False, plan=TINY_PLAN)
    assert not killed.exists()
    (root / "catalog" / "model.safetensors").unlink()  # as if a copy was cut short
    assert not is_current(root, 0, TINY_PLAN)
    ensure_family(root, seed=0, progress=False, plan=TINY_PLAN)
    assert (root / "catalog" / "model.safetensors").is_file()
    (root / MANIFEST).unlink()
    assert not is_current(root, 0, TINY_PLAN)


def test_bad_root_and_bad_names_raise_demo_family_errors(tmp_path: Path) -> None:
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("x")
    with pytest.raises(DemoFamilyError, match="not-a-folder.*not a folder"):
        ensure_family(a_file, progress=False, plan=TINY_PLAN)
    family = DemoFamily.at(tmp_path)
    with pytest.raises(DemoFamilyError, match="unknown split 'train'"):
        family.data("shipping", "train")
    with pytest.raises(DemoFamilyError, match="unknown task 'returns'"):
        family.data("returns", "search")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / MANIFEST).write_text("{not json")
    with pytest.raises(DemoFamilyError, match="family.json: unreadable"):
        ensure_family(broken, progress=False, plan=TINY_PLAN)
    assert search_main(["demo", "--root", str(a_file), "--quiet"]) == 2


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
