"""``search merge CONFIG OUT_DIR``: run a mergekit YAML with the in-memory engine.

A fast drop-in for ``mergekit-yaml`` on the configs the engine reproduces exactly: the
config is read with :func:`merges.mergekit_yaml.recipe_from_mergekit` (which refuses
anything else, with the reason), the checkpoints are opened and preflighted, the engine
yields the merged tensors one at a time and :func:`merges.save.save_checkpoint_stream` writes
each as it comes (the writer holds none of them), atomically, so a failed run leaves no output
folder behind. The output folder is checked (:mod:`merges.output`) before anything is merged: new or empty, or with ``--overwrite`` a
previous output of this tool; never a source, the base, or a folder holding one.

Per-slice ``base_model``s (``Recipe.group_bases``) merge as mergekit 0.1.5 merges them: one
engine per distinct base, each contributing the tensors of the groups merged against it
(embeddings: the first slice's base, final norm and head: the last slice's); config,
tokenizer and copied files come from the top-level base.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING

from search.commands import SUMMARIES
from search.errors import SearchError

if TYPE_CHECKING:  # torch, transformers and the engine load in run(): `search --help` stays fast
    import torch

    from merges.checkpoint import Checkpoint
    from merges.recipe import Recipe

# config.json keys that hold the layer count (a frankenmerge changes it).
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge",
        help=SUMMARIES["merge"],
        description=(
            "Run a mergekit 0.1.5 config (the `models:` or `slices:` form) with the in-memory "
            "engine and save the result as a Hugging Face checkpoint folder: the same tensors "
            "`mergekit-yaml CONFIG OUT_DIR` writes, within float rounding; per-slice base_models "
            "merge each slice against its own base, as mergekit does. Configs the engine "
            "cannot reproduce exactly (filters that split a tensor role, slices that merge "
            "different models, modules:...) are refused with the reason. DARE and "
            "DELLA masks are drawn from the engine's own seeded generators: equal to mergekit's "
            "in distribution, not bit for bit. The output folder is written atomically; it must be "
            "new or empty (--overwrite replaces a previous output of this command, nothing else)."
        ),
    )
    parser.add_argument("config", type=Path, metavar="CONFIG", help="the mergekit YAML (e.g. one `search export` wrote)")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="folder to write the merged checkpoint to")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the engine merges (default: cpu)")
    parser.add_argument("--seed", type=int, default=None, metavar="N",
                        help="seed of DARE/DELLA masks (default: the seed the YAML records, else 0)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow reading pickle weights (pytorch_model.bin); only for trusted files")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT_DIR if it holds a previous output of mergesearch (never other files)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    started = time.perf_counter()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SearchError("--device cuda: no CUDA device is available")
    out = merge_config(args.config, args.out_dir, device=args.device, seed=args.seed,
                       allow_pickle=args.allow_pickle, overwrite=args.overwrite)
    print(f"wrote {out} in {time.perf_counter() - started:.2f} s")
    return 0


def merge_config(config: Path, out_dir: Path, *, device: str = "cpu", seed: int | None = None,
                 allow_pickle: bool = False, overwrite: bool = False) -> Path:
    """Merge what ``config`` describes into ``out_dir``; returns the folder written."""
    import torch

    from merges.engine import MergeEngine
    from merges.lora import reference_folders
    from merges.mergekit_yaml import (
        mergekit_chat_template,
        recipe_from_mergekit,
        tokenizer_from_mergekit,
    )
    from merges.output import Protected, check_output_folder
    from merges.save import TensorSpec, save_checkpoint, save_checkpoint_stream
    from merges.tokenizer_union import vocabulary_views

    if not config.is_file():
        raise SearchError(f"{config}: no such mergekit config file")
    recipe = recipe_from_mergekit(config, allow_pickle=allow_pickle)
    chat_template = mergekit_chat_template(config, recipe)
    if seed is not None:
        recipe = dataclasses.replace(recipe, seed=seed)
    # Refuse a bad output before the merge, not after it.
    protected = [Protected("base checkpoint", f) for f in reference_folders(recipe.base)] if recipe.base else []
    protected += [Protected("source checkpoint", folder) for path in (*recipe.sources, *recipe.group_bases)
                  for folder in reference_folders(path)]  # a LoRA source: its model and its adapter
    check_output_folder(out_dir, overwrite=overwrite, protected=protected)
    base, sources = _open(recipe, allow_pickle)
    extra = _open_group_bases(recipe, allow_pickle)
    tokenizer = tokenizer_from_mergekit(config)
    if recipe.group_bases:
        _preflight_group_bases(base, [*sources, *extra], tokenizer=tokenizer is not None)
    if tokenizer is not None:  # sources' vocabularies merged as mergekit does (merges.tokenizer_union)
        base, views = vocabulary_views(base, [*sources, *extra], tokenizer)
        sources, extra = views[:len(sources)], views[len(sources):]
    like = base or sources[0]
    # As mergekit writes: cast only to an `out_dtype`; otherwise each tensor as its method returned it
    # (arcee_fusion / ramplus_tl: float32 from half inputs), config.json naming `out_dtype or dtype`.
    out_dtype = getattr(torch, recipe.out_dtype) if recipe.out_dtype else None
    saving = {"like": like, "dtype": out_dtype, "config_dtype": getattr(torch, recipe.out_dtype or recipe.dtype),
              "config_overrides": _layer_count_override(like, recipe), "overwrite": overwrite,
              "protected": protected, "chat_template": chat_template}
    if recipe.group_bases:
        assert base is not None  # Recipe: group bases come with a base
        by_path = {str(c.path): c for c in (*sources, *extra, base)}
        return save_checkpoint(_materialize_per_base(recipe, by_path, device), out_dir, **saving)
    # The engine runs the preflight (architecture, tensors, vocabulary) before loading.
    # One recipe, read once: the stream plan holds no checkpoint (each chunk's inputs are read from
    # the files when it merges) and each merged chunk is written as it comes, as mergekit does.
    engine = MergeEngine(base, sources, device=device, dtype=getattr(torch, recipe.dtype), plan="stream")
    try:
        specs = [TensorSpec(*spec) for spec in engine.output_specs(recipe)]
        return save_checkpoint_stream(specs, engine.iter_materialize(recipe, device="cpu"), out_dir, **saving)
    finally:
        engine.close()


def _open(recipe: Recipe, allow_pickle: bool) -> tuple[Checkpoint | None, list[Checkpoint]]:
    from merges.checkpoint import open_checkpoint

    base = open_checkpoint(recipe.base, allow_pickle=allow_pickle) if recipe.base else None
    sources = [open_checkpoint(path, allow_pickle=allow_pickle) for path in recipe.sources]
    return base, sources


def _open_group_bases(recipe: Recipe, allow_pickle: bool) -> list[Checkpoint]:
    """The per-slice bases that are neither the base nor a source (opened once each)."""
    from merges.checkpoint import open_checkpoint

    known = {recipe.base, *recipe.sources}
    return [open_checkpoint(path, allow_pickle=allow_pickle)
            for path in dict.fromkeys(recipe.group_bases) if path not in known]


def _preflight_group_bases(base: Checkpoint | None, others: list[Checkpoint], *, tokenizer: bool) -> None:
    """Every model against the top-level base (whose config the output takes), before any merge:
    a slice base of another architecture or shape is named here. With a tokenizer policy, one
    vocabulary for all: mergekit fills a token a model lacks from each slice's own base, which
    the vocabulary views (built against the top-level base) do not reproduce."""
    from merges.errors import PreflightError
    from merges.preflight import preflight

    assert base is not None
    try:
        preflight(base, [c for c in others if str(c.path) != str(base.path)])
    except PreflightError as exc:
        if tokenizer:
            raise PreflightError(f"{exc} (with per-slice base models, a tokenizer policy needs every "
                                 "model to have the top-level base's vocabulary)") from None
        raise


def _materialize_per_base(recipe: Recipe, by_path: dict[str, Checkpoint], device: str
                          ) -> dict[str, torch.Tensor]:
    """The merged tensors of a recipe with per-group bases: one engine per distinct base (in
    turn, so one engine's memory at a time), each contributing the tensors whose group merges
    against it (``Recipe.group_of_tensor``)."""
    import torch

    from merges.engine import MergeEngine

    sources = [by_path[path] for path in recipe.sources]
    chosen: dict[str, torch.Tensor] = {}
    layout = None
    for base in dict.fromkeys(recipe.group_bases):
        engine = MergeEngine(by_path[base], sources, device=device, dtype=getattr(torch, recipe.dtype),
                             plan="stream")
        layout = engine.layout
        mine = {info.name for info in layout.tensors
                if recipe.group_bases[recipe.group_of_tensor(info.layer, info.role)] == base}
        tensors = engine.materialize(recipe.against(base), device="cpu")
        chosen.update((name, tensor) for name, tensor in tensors.items() if name in mine)
        engine.close()
        del engine, tensors
    assert layout is not None
    return {info.name: chosen[info.name] for info in layout.tensors if info.name in chosen}


def _layer_count_override(like: Checkpoint, recipe: Recipe) -> dict[str, int]:
    """A frankenmerge's layer count, under the key the base's config.json uses."""
    if recipe.n_layers == like.layout.n_layers:
        return {}
    key = next((k for k in _LAYER_COUNT_KEYS if k in like.config), None)
    if key is None:
        raise SearchError(
            f"{like.path}/config.json: no layer count key ({', '.join(_LAYER_COUNT_KEYS)}) to set to "
            f"{recipe.n_layers} for this frankenmerge"
        )
    return {key: recipe.n_layers}
