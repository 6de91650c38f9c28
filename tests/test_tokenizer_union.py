"""Tokenizer union / base / another model's vocabulary, against real ``mergekit-yaml`` 0.1.5.

Fine-tunes here add tokens the way real ones do (``add_tokens``, an added special token) and
carry learned rows for them. The same YAML goes through ``search merge`` and ``mergekit-yaml``;
the outputs must have the same vocabulary, tokenizer files, ``vocab_size`` and, token by
token, the same embedding and head rows (compared by token, since mergekit appends two
sources' new tokens in Python set order).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from merges.checkpoint import Checkpoint, open_checkpoint
from merges.errors import PreflightError
from merges.mergekit_yaml import recipe_from_mergekit, recipe_to_mergekit, tokenizer_from_mergekit
from merges.preflight import preflight
from merges.recipe import Recipe
from merges.tokenizer_union import (
    TokenEmbedding,
    TokenizerPolicy,
    is_vocabulary_tensor,
    vocabulary_views,
)
from search.cli import main as search_main
from search.commands.validate import check_checkpoints
from search.config import load_study
from search.errors import StudyConfigError
from tests.checkpoints import (
    TinyFamily,
    perturbed,
    save,
    tiny_model,
    tiny_tokenizer,
    with_added_tokens,
)
from tests.studies import run, write_study
from tests.test_mergekit_golden import ATOL, RTOL

pytestmark = pytest.mark.slow

MERGEKIT_YAML = str(Path(sys.executable).with_name("mergekit-yaml"))


@pytest.fixture(scope="module")
def tokens_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base; ``tools`` adds two tokens and a special one; ``other`` shares one and adds another; ``plain``."""
    root = tmp_path_factory.mktemp("tokens")
    model = tiny_model("llama", seed=5)
    return {
        "base": save(model, root / "base"),
        "tools": with_added_tokens(model, root / "tools", seed=11, tokens=("<tool>", "<call>"),
                                   special=("<|im_start|>",)),
        "other": with_added_tokens(model, root / "other", seed=12, tokens=("<call>", "<other>")),
        "plain": save(perturbed(model, seed=13), root / "plain"),
    }


def _config(family: dict[str, Path], tokenizer: dict[str, object]) -> dict[str, object]:
    return {
        "merge_method": "ties", "base_model": str(family["base"]), "dtype": "float32", "tokenizer": tokenizer,
        "models": [
            {"model": str(family["tools"]), "parameters": {"weight": 0.6, "density": 0.7}},
            {"model": str(family["other"]), "parameters": {"weight": 0.5, "density": 0.5}},
            {"model": str(family["plain"]), "parameters": {"weight": 0.3, "density": 0.9}},
        ],
    }


def _vocabulary(folder: Path) -> dict[str, int]:
    data = json.loads((folder / "tokenizer.json").read_text())
    return {**data["model"]["vocab"], **{t["content"]: t["id"] for t in data["added_tokens"]}}


def _merge_both(config: dict[str, object], tmp_path: Path) -> tuple[Path, Path]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    assert search_main(["merge", str(path), str(ours)]) == 0
    done = subprocess.run([MERGEKIT_YAML, str(path), str(theirs), "--no-lazy-unpickle"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return ours, theirs


def assert_same_merge(ours: Path, theirs: Path) -> None:
    """Same vocabulary (as a set), vocab_size, tokenizer files and rows per token; other tensors equal."""
    vocab, their_vocab = _vocabulary(ours), _vocabulary(theirs)
    assert set(vocab) == set(their_vocab)
    # Tokens both sides place the same way (all but the order two sources' new tokens are appended in).
    ours_config, their_config = (json.loads((f / "config.json").read_text()) for f in (ours, theirs))
    assert ours_config["vocab_size"] == their_config["vocab_size"]
    if vocab == their_vocab:  # the tokenizer files are transformers' save_pretrained of the same tokenizer
        for name in ("tokenizer.json", "tokenizer_config.json"):
            assert json.loads((ours / name).read_text()) == json.loads((theirs / name).read_text()), name
    mine, their = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    assert sorted(mine) == sorted(their)
    for name, tensor in their.items():
        assert mine[name].shape == tensor.shape, name
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            order = torch.tensor([vocab[token] for token in their_vocab])
            padding = torch.arange(len(their_vocab), tensor.shape[0])
            rows = mine[name][torch.cat([order, padding])]
            their_rows = tensor[torch.cat([torch.tensor(list(their_vocab.values())), padding])]
            torch.testing.assert_close(rows, their_rows, rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}")
        else:
            torch.testing.assert_close(mine[name], tensor, rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}")


def test_union_matches_mergekit_yaml(tokens_family: dict[str, Path], tmp_path: Path) -> None:
    ours, theirs = _merge_both(_config(tokens_family, {"source": "union"}), tmp_path)
    assert_same_merge(ours, theirs)
    vocab = _vocabulary(ours)
    assert {"<tool>", "<call>", "<other>", "<|im_start|>"} <= set(vocab) and len(vocab) == 68
    base_vocab = _vocabulary(tokens_family["base"])
    assert all(vocab[t] == i for t, i in base_vocab.items())  # the base's ids stay


def test_legacy_tokenizer_source_union_and_padding(tokens_family: dict[str, Path], tmp_path: Path) -> None:
    config = _config(tokens_family, {})
    del config["tokenizer"]
    config["tokenizer_source"] = "union"
    ours, theirs = _merge_both(config, tmp_path / "legacy")
    assert_same_merge(ours, theirs)
    padded = _config(tokens_family, {"source": "base", "pad_to_multiple_of": 48})
    ours, theirs = _merge_both(padded, tmp_path / "padded")
    assert_same_merge(ours, theirs)
    assert load_file(ours / "model.safetensors")["model.embed_tokens.weight"].shape[0] == 96


def test_another_models_vocabulary_with_token_sources(tokens_family: dict[str, Path], tmp_path: Path) -> None:
    tokens = {
        "<new>": {"source": {"kind": "zero"}},
        "<fresh>": {"source": {"kind": "model_token", "model": str(tokens_family["other"]), "token": "<other>"}},
        "w1": {"source": str(tokens_family["plain"]), "force": True},
    }
    config = _config(tokens_family, {"source": str(tokens_family["tools"]), "tokens": tokens})
    ours, theirs = _merge_both(config, tmp_path)
    assert_same_merge(ours, theirs)
    assert {"<new>", "<fresh>", "<tool>"} <= set(_vocabulary(ours)) and "<other>" not in _vocabulary(ours)


def test_the_policy_round_trips_through_mergekit_yaml(tokens_family: dict[str, Path], tmp_path: Path) -> None:
    policy = TokenizerPolicy(str(tokens_family["tools"]), (
        ("<new>", TokenEmbedding(zero=True)),
        ("<x>", TokenEmbedding(model=str(tokens_family["other"]), token="<other>", force=True)),
        ("<y>", TokenEmbedding(model=str(tokens_family["plain"]), token_id=5)),
        ("<z>", TokenEmbedding(model=str(tokens_family["base"]))),
    ), 16)
    config = tmp_path / "recipe.yaml"
    recipe = recipe_from_mergekit(yaml.safe_dump(_config(tokens_family, {"source": "union"})))
    config.write_text(recipe_to_mergekit(recipe, open_checkpoint(tokens_family["base"]).layout, tokenizer=policy))
    assert tokenizer_from_mergekit(config) == policy
    assert recipe_from_mergekit(config) == recipe


def test_without_a_policy_differing_vocabularies_are_still_named(tokens_family: dict[str, Path]) -> None:
    base, tools = open_checkpoint(tokens_family["base"]), open_checkpoint(tokens_family["tools"])
    with pytest.raises(PreflightError, match="adds 3 tokens"):
        preflight(base, [tools])
    views = vocabulary_views(base, [tools], TokenizerPolicy("union"))
    preflight(views[0], views[1])  # the policy covers them


def test_a_token_added_with_two_definitions_is_refused(tokens_family: dict[str, Path], tmp_path: Path) -> None:
    model = tiny_model("llama", seed=5)
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<tool>"]})  # special here, plain in "tools"
    tuned = type(model)(model.config)
    tuned.load_state_dict(model.state_dict())
    tuned.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    clash = save(tuned, tmp_path / "clash", tokenizer)
    base = open_checkpoint(tokens_family["base"])
    with pytest.raises(PreflightError, match=r"token '<tool>' is added as .* by 'tools' but as .* by 'clash'"):
        vocabulary_views(base, [open_checkpoint(tokens_family["tools"]), open_checkpoint(clash)],
                         TokenizerPolicy("union"))


# -- a study with models.tokenizer ---------------------------------------------------------------


def _union_study(folder: Path, family: dict[str, Path], *, tokenizer: str, trials: int) -> Path:
    sources = TinyFamily(family["base"], (family["tools"], family["other"], family["plain"]))
    path = write_study(folder, sources, trials=trials, method="ties")
    text = path.read_text().replace('[models]\n', f'[models]\ntokenizer = "{tokenizer}"\n', 1)
    path.write_text(text)
    return path


def test_a_union_study_exports_a_yaml_that_mergekit_rebuilds(tokens_family: dict[str, Path], tmp_path: Path) -> None:
    path = _union_study(tmp_path, tokens_family, tokenizer="union", trials=2)
    config, study = run(path)
    assert config.models.tokenizer_policy() == TokenizerPolicy("union")
    recipe = Recipe.from_dict(study.trials[study.user_attrs["final_trial"]].user_attrs["recipe"])
    shipped = tmp_path / "ship" / "recipe.yaml"
    materialized = tmp_path / "materialized"
    assert search_main(["export", str(path), "-o", str(shipped), "--materialize", str(materialized)]) == 0
    assert yaml.safe_load(shipped.read_text())["tokenizer"] == {"source": "union"}
    rebuilt = tmp_path / "rebuilt"
    done = subprocess.run([MERGEKIT_YAML, str(shipped), str(rebuilt), "--no-lazy-unpickle"], cwd=shipped.parent,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_merge(materialized, rebuilt)
    assert recipe.sources == tuple(str(p) for p in config.models.sources.values())
    # The rebuilt model, with the tokenizer mergekit wrote, scores what the study recorded.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fitness.scoring import score_slice
    from fitness.slices import load_task

    model = AutoModelForCausalLM.from_pretrained(rebuilt).eval()
    tokenizer = AutoTokenizer.from_pretrained(rebuilt)
    recorded = study.trials[study.user_attrs["final_trial"]].user_attrs["scores_search"]
    for task in config.tasks:
        score = score_slice(model, load_task(task, tokenizer).search)
        assert score == pytest.approx(recorded[task.name], rel=1e-4, abs=1e-5), task.name


def test_study_tokenizer_key_is_checked(tokens_family: dict[str, Path], tmp_path: Path) -> None:
    path = _union_study(tmp_path, tokens_family, tokenizer="s9", trials=0)
    with pytest.raises(StudyConfigError, match=r"models\.tokenizer: expected 'union', 'base' or a source label"):
        load_study(path)
    path = _union_study(tmp_path, tokens_family, tokenizer="union", trials=0)
    without = path.read_text().replace('tokenizer = "union"\n', "")
    path.write_text(without)
    with pytest.raises(StudyConfigError, match=r"models\.sources\.s0: .*adds 3 tokens"):
        check_checkpoints(load_study(path))  # without a policy the preflight still names the difference
    path.write_text(without.replace("[models]\n", '[models]\ntokenizer = "base"\n', 1))
    assert check_checkpoints(load_study(path)) == 4


def test_the_stream_plan_reads_vocabulary_views_per_chunk(tokens_family: dict[str, Path]) -> None:
    """Vocabulary views are computed at read time (``Checkpoint.read``, no file offsets): the
    stream plan reads them chunk by chunk, every read permuted afresh, and merges the resident
    plan's tensors bit for bit."""
    from merges.engine import MergeEngine

    names = ("tools", "other", "plain")

    def merged(plan: str) -> dict[str, torch.Tensor]:
        base, views = vocabulary_views(open_checkpoint(tokens_family["base"]),
                                       [open_checkpoint(tokens_family[n]) for n in names], TokenizerPolicy("union"))
        assert base is not None and not base.readable_by_offset
        engine = MergeEngine(base, views, device="cpu", plan=plan)
        recipe = Recipe.uniform("ties", str(base.path), [str(v.path) for v in views], engine.layout.n_layers,
                                {"weight": [0.6, 0.5, 0.3], "density": [0.7, 0.5, 0.9]})
        first = engine.materialize(recipe)
        again = engine.materialize(recipe)  # the views read a second time
        assert all(torch.equal(first[n], again[n]) for n in first)
        return first

    expected, streamed = merged("resident"), merged("stream")
    assert list(streamed) == list(expected)
    for name, tensor in expected.items():
        assert torch.equal(streamed[name], tensor), name


def test_releasing_a_view_closes_its_checkpoints_files(tokens_family: dict[str, Path]) -> None:
    """The lean engine releases each model once read: a view must let its files' mapped pages go
    (else `search merge` with a tokenizer policy kept every checkpoint mapped, 3.8 GB at 245M)."""
    base, tools = open_checkpoint(tokens_family["base"]), open_checkpoint(tokens_family["tools"])
    view, [tools_view] = vocabulary_views(base, [tools], TokenizerPolicy("union"))
    assert view is not None
    name = next(n for n in base.shapes if n.endswith("mlp.up_proj.weight"))
    first = view.read(name)
    assert base._handles  # reading through the view opened the inner file
    view.release()
    assert not base._handles
    assert torch.equal(view.read(name), first)  # a later read reopens it


def test_the_stream_plan_reads_a_views_tensors_off_the_vocabulary_by_offset(
        tokens_family: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the re-indexed vocabulary rows go through ``read`` (memory-mapped); every other tensor
    of a view is its inner checkpoint's, read by file offsets (else `search merge` with a tokenizer
    policy held every file's mapped pages: 6.1 GB at 245M TIES against 3.1 GB without views)."""
    from merges.engine import MergeEngine

    base, [view] = vocabulary_views(open_checkpoint(tokens_family["base"]),
                                    [open_checkpoint(tokens_family["tools"])], TokenizerPolicy("union"))
    assert base is not None
    vocab = next(n for n in base.shapes if is_vocabulary_tensor(n))
    other = next(n for n in base.shapes if n.endswith("mlp.up_proj.weight"))
    assert base.offset_source(vocab) is None and base.offset_source(other) is base.inner
    engine = MergeEngine(base, [view], device="cpu", plan="stream")
    recipe = Recipe.uniform("ties", str(base.path), [str(view.path)], engine.layout.n_layers,
                            {"weight": [0.6], "density": [0.7]})
    read: list[str] = []
    plain_read = Checkpoint.read

    def recorded(self: Checkpoint, name: str, **kwargs: object) -> torch.Tensor:
        read.append(name)
        return plain_read(self, name, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Checkpoint, "read", recorded)
    engine.materialize(recipe)
    assert read and all(is_vocabulary_tensor(n) for n in read)
