"""Write merged tensors as a ``save_pretrained``-compatible checkpoint folder, atomically.

The folder is built and published by :func:`merges.output.output_folder`: in a temp sibling,
fsynced, renamed into place only when complete, never over a folder the tool did not write
(a non-empty ``out_dir`` only with ``overwrite`` and only if it is a previous output), so a
save that fails halfway leaves the old folder as it was. Tensor names are checked against the layout of
``like`` (the base) before anything is written: every in-layer tensor must be one the base
has in each layer, every other tensor one the base has, with the base's shapes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from merges.checkpoint import SAFETENSORS_FILE, SAFETENSORS_INDEX, Checkpoint
from merges.errors import CheckpointError, NonFiniteMergeError
from merges.grouping import consecutive_groups
from merges.layout import Layout, layout_of
from merges.output import Protected, output_folder

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
_COPIED_FILES = ("generation_config.json",)


def save_checkpoint(
    tensors: Mapping[str, torch.Tensor],
    out_dir: str | Path,
    *,
    like: Checkpoint,
    dtype: torch.dtype | None = None,
    config_dtype: torch.dtype | None = None,
    config_overrides: Mapping[str, Any] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    protected: Sequence[Protected] = (),
    chat_template: str | None = None,
) -> Path:
    """Save ``tensors`` as a checkpoint shaped like ``like``; returns the folder.

    ``dtype`` casts floating tensors (default: keep theirs). ``config_dtype`` is the dtype
    config.json names (default: ``dtype``, else the first floating tensor's); mergekit names its
    ``out_dtype or dtype`` there even when a method wrote float32 tensors. ``config_overrides`` update the
    base's config.json (e.g. ``num_hidden_layers`` of a passthrough frankenmerge). A head
    tied to the embedding is not written. Shards above ``max_shard_bytes`` get an index.
    ``overwrite`` allows replacing a previous output of this tool; ``like`` and every
    ``protected`` folder (sources, the study folder) and their parents are refused as outputs.
    ``chat_template`` is set on the base's tokenizer, saved with ``save_pretrained`` as
    mergekit 0.1.5 saves the tokenizer it builds (see ``merges.mergekit_yaml.mergekit_chat_template``).
    """
    out = Path(out_dir).expanduser().absolute()
    guards = [Protected("base checkpoint", like.folder), *protected]
    if max_shard_bytes <= 0:
        raise CheckpointError(f"max_shard_bytes must be positive, got {max_shard_bytes}")

    config = {**like.config, **(config_overrides or {})}
    layout = _checked_layout(tensors, config, like)
    kept = [name for name in tensors if not layout.is_tied_head(name)]
    out_dtype = config_dtype or dtype or next(
        (tensors[n].dtype for n in kept if tensors[n].is_floating_point()), torch.float32
    )
    dtype_name = str(out_dtype).removeprefix("torch.")
    config["dtype"] = dtype_name
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype_name

    with output_folder(out, overwrite=overwrite, protected=guards) as tmp:
        _write_weights(tmp, tensors, kept, dtype, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        like.write_tokenizer(tmp)  # the base's files, or an output vocabulary's (merges.tokenizer_union)
        for file in (like.folder / f for f in _COPIED_FILES):
            if file.is_file():
                shutil.copy2(file, tmp / file.name)
        if chat_template is not None:
            _save_chat_template(like, tmp, chat_template)
    return out


def _save_chat_template(like: Checkpoint, folder: Path, template: str) -> None:
    if not like.tokenizer_files():
        raise CheckpointError(f"{like.path}: no tokenizer files to carry the chat template")
    import transformers  # here: saving tensors alone needs no transformers

    # the tokenizer just written (the base's, or a tokenizer union's output vocabulary)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(folder)


def _checked_layout(
    tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any], like: Checkpoint
) -> Layout:
    """The output's layout, after checking every name and shape against the base's."""
    if not tensors:
        raise CheckpointError("nothing to save: no tensors given")
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    try:
        layout = layout_of(list(tensors), config, shapes)
    except CheckpointError as exc:
        raise CheckpointError(f"cannot save a checkpoint like {like.label!r}: {exc}") from None
    base = like.layout
    base_layer_shapes = {
        info.name[len(f"{base.layer_prefix}{info.layer}.") :]: like.shapes[info.name]
        for info in base.tensors
        if info.layer == 0
    }
    base_outside = {
        i.name for i in base.tensors if i.layer is None and not base.is_tied_head(i.name)
    }
    seen_outside: set[str] = set()
    seen_in_layer: dict[int, set[str]] = {}
    for info in layout.tensors:
        if layout.is_tied_head(info.name):
            continue
        if info.layer is None:
            expected = like.shapes.get(info.name) if info.name in base_outside else None
            seen_outside.add(info.name)
        else:
            suffix = info.name[len(f"{layout.layer_prefix}{info.layer}.") :]
            expected = base_layer_shapes.get(suffix)
            seen_in_layer.setdefault(info.layer, set()).add(suffix)
        if expected is None:
            raise CheckpointError(
                f"tensor {info.name!r} has no counterpart in base {like.label!r}; "
                f"cannot save it in a checkpoint like {like.path}"
            )
        if shapes[info.name] != expected:
            raise CheckpointError(
                f"tensor {info.name!r} has shape {list(shapes[info.name])}, base {like.label!r} "
                f"has {list(expected)}"
            )
    missing_outside = sorted(base_outside - seen_outside)
    if missing_outside:
        raise CheckpointError(f"tensor {missing_outside[0]!r} of base {like.label!r} is missing")
    for layer in range(layout.n_layers):
        missing = sorted(set(base_layer_shapes) - seen_in_layer.get(layer, set()))
        if missing:
            raise CheckpointError(
                f"tensor {layout.layer_prefix}{layer}.{missing[0]} is missing (base "
                f"{like.label!r} has it in every layer)"
            )
    return layout


def _write_weights(
    folder: Path,
    tensors: Mapping[str, torch.Tensor],
    names: list[str],
    dtype: torch.dtype | None,
    max_shard_bytes: int,
) -> None:
    shards = list(_shards(tensors, names, max_shard_bytes))
    if len(shards) == 1:
        _write_shard(folder / SAFETENSORS_FILE, tensors, shards[0], dtype)
        return
    weight_map: dict[str, str] = {}
    total = 0
    for index, shard in enumerate(shards, start=1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        total += _write_shard(folder / file, tensors, shard, dtype)
        weight_map.update({name: file for name in shard})
    index_data = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / SAFETENSORS_INDEX).write_text(json.dumps(index_data, indent=2) + "\n")


def _shards(
    tensors: Mapping[str, torch.Tensor], names: list[str], limit: int
) -> Iterator[list[str]]:
    """Consecutive groups of names whose bytes stay under ``limit`` (a bigger tensor alone)."""
    return consecutive_groups(names, lambda name: tensors[name].numel() * tensors[name].element_size(), limit)


def _write_shard(
    file: Path, tensors: Mapping[str, torch.Tensor], names: list[str], dtype: torch.dtype | None
) -> int:
    """Write one safetensors file; returns its tensor bytes. Raises on NaN / inf."""
    prepared: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name in names:
        tensor = tensors[name].detach()
        if tensor.is_floating_point():
            if not bool(torch.isfinite(tensor).all()):
                raise NonFiniteMergeError(f"tensor {name!r} holds NaN or inf; not saving it")
            if dtype is not None:
                tensor = tensor.to(dtype)
        tensor = tensor.to("cpu").contiguous()
        # safetensors refuses tensors that share storage (e.g. views of one buffer).
        if tensor.untyped_storage().data_ptr() in storages:
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        prepared[name] = tensor
    try:
        save_file(prepared, str(file), metadata={"format": "pt"})
    except SafetensorError as exc:
        # safetensors reports OS errors as text ("... (os error 28)"): give them back their errno.
        found = re.search(r"\(os error (\d+)\)", str(exc))
        if found is None:
            raise
        code = int(found[1])
        raise OSError(code, os.strerror(code), str(file)) from None
    return sum(t.numel() * t.element_size() for t in prepared.values())

