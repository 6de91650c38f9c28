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
import math
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from merges.checkpoint import _SAFETENSORS_DTYPES as _DTYPE_CODES  # the one table of dtype codes
from merges.checkpoint import SAFETENSORS_FILE, SAFETENSORS_INDEX, Checkpoint
from merges.errors import CheckpointError, NonFiniteMergeError
from merges.grouping import consecutive_groups
from merges.layout import Layout, layout_of
from merges.output import Protected, output_folder

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
_COPIED_FILES = ("generation_config.json",)


@dataclass(frozen=True)
class TensorSpec:
    """One tensor a streamed save will receive: its name, shape and dtype as it arrives."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


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

    The streamed writer with the dict's tensors in its order: the files are
    :func:`save_checkpoint_stream`'s, byte for byte.
    """
    specs = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    return save_checkpoint_stream(
        specs, tensors.items(), out_dir, like=like, dtype=dtype, config_dtype=config_dtype,
        config_overrides=config_overrides, max_shard_bytes=max_shard_bytes, overwrite=overwrite,
        protected=protected, chat_template=chat_template,
    )


def save_checkpoint_stream(
    specs: Sequence[TensorSpec],
    tensors: Iterable[tuple[str, torch.Tensor]],
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
    """Save tensors that arrive one at a time (``(name, tensor)`` in the order of ``specs``).

    Everything is decided from ``specs`` before the first tensor is consumed: the names and
    shapes checked against ``like``, the shards, each shard's safetensors header (the same
    bytes ``safetensors.torch.save_file`` writes). Each tensor's bytes go to their offset as
    it arrives and it is not kept, so a merge that yields tensor by tensor is written without
    ever holding the whole model. A tensor whose name, shape or dtype differs from its spec,
    one too many or one missing, raises naming it; any error (the iterator's too) leaves no
    output, as :func:`merges.output.output_folder` publishes only a complete folder. The
    keywords are :func:`save_checkpoint`'s.
    """
    out = Path(out_dir).expanduser().absolute()
    guards = [Protected("base checkpoint", like.folder), *protected]
    if max_shard_bytes <= 0:
        raise CheckpointError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    specs = [TensorSpec(spec.name, tuple(spec.shape), spec.dtype) for spec in specs]  # a torch.Size too
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise CheckpointError(f"tensor {spec.name!r} is listed twice")
        seen.add(spec.name)

    config = {**like.config, **(config_overrides or {})}
    layout = _checked_layout({spec.name: spec.shape for spec in specs}, config, like)
    kept = [spec for spec in specs if not layout.is_tied_head(spec.name)]
    out_dtype = config_dtype or dtype or next(
        (spec.dtype for spec in kept if spec.dtype.is_floating_point), torch.float32
    )
    dtype_name = str(out_dtype).removeprefix("torch.")
    config["dtype"] = dtype_name
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype_name
    shards = _plan_shards(kept, dtype, max_shard_bytes)

    with output_folder(out, overwrite=overwrite, protected=guards) as tmp:
        _write_weights(tmp, specs, tensors, shards, dtype)
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
    shapes: Mapping[str, tuple[int, ...]], config: Mapping[str, Any], like: Checkpoint
) -> Layout:
    """The output's layout, after checking every name and shape against the base's."""
    if not shapes:
        raise CheckpointError("nothing to save: no tensors given")
    try:
        layout = layout_of(list(shapes), config, dict(shapes))
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


@dataclass(frozen=True)
class _Shard:
    """One safetensors file: its header bytes and where each of its tensors' bytes go."""

    file: str
    header: bytes
    offsets: dict[str, int]  # absolute, in the file
    nbytes: int  # the tensors' bytes (the index's total_size adds these)


def _plan_shards(kept: list[TensorSpec], dtype: torch.dtype | None, limit: int) -> list[_Shard]:
    """Consecutive groups of the tensors to write, each within ``limit`` bytes as they arrive
    (a bigger tensor alone), with the header ``safetensors.torch.save_file`` writes for it."""
    groups = list(consecutive_groups(kept, lambda spec: spec.nbytes, limit))
    files = [SAFETENSORS_FILE] if len(groups) == 1 else [
        f"model-{index:05d}-of-{len(groups):05d}.safetensors" for index in range(1, len(groups) + 1)
    ]
    return [_shard(file, group, dtype) for file, group in zip(files, groups, strict=True)]


def _shard(file: str, group: list[TensorSpec], dtype: torch.dtype | None) -> _Shard:
    """safetensors' layout: tensors sorted by dtype (widest first, its ``Dtype`` enum order
    reversed), then name; a compact JSON header with ``__metadata__`` first, padded with spaces
    to a multiple of 8 bytes; the data right after it, in that same order."""
    stored = [(spec.name, spec.shape, _stored_dtype(spec.dtype, dtype)) for spec in group]
    stored.sort(key=lambda item: (-_dtype_rank(item[2]), item[0]))
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    relative: dict[str, int] = {}
    position = 0
    for name, shape, stored_dtype in stored:
        size = math.prod(shape) * stored_dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[stored_dtype], "shape": list(shape),
                        "data_offsets": [position, position + size]}
        relative[name] = position
        position += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    return _Shard(file, len(text).to_bytes(8, "little") + text,
                  {name: start + offset for name, offset in relative.items()}, position)


def _write_weights(
    folder: Path,
    specs: list[TensorSpec],
    tensors: Iterable[tuple[str, torch.Tensor]],
    shards: list[_Shard],
    dtype: torch.dtype | None,
) -> None:
    """Consume ``tensors``, checked against ``specs`` in order, writing each into its shard."""
    where = {name: shard for shard in shards for name in shard.offsets}
    handles: dict[str, int] = {}
    arrived = iter(tensors)
    try:
        for shard in shards:  # the headers first: the tensors' bytes then go where they say
            fd = handles[shard.file] = os.open(folder / shard.file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            _write_at(fd, shard.header, 0)
        for spec in specs:
            item = next(arrived, None)
            if item is None:
                raise CheckpointError(f"tensor {spec.name!r} never arrived (the tensors ended early)")
            name, tensor = item
            _check_arrival(spec, name, tensor)
            shard = where.get(name)
            if shard is not None:  # else a head tied to the embedding: not written
                _write_at(handles[shard.file], _stored_bytes(name, tensor, dtype), shard.offsets[name])
            del item, tensor  # let the producer's buffer go before it makes the next one
        extra = next(arrived, None)
        if extra is not None:
            raise CheckpointError(f"tensor {extra[0]!r} arrived after the last expected one")
    finally:
        for fd in handles.values():
            os.close(fd)
    if len(shards) > 1:
        weight_map = {spec.name: where[spec.name].file for spec in specs if spec.name in where}
        index_data = {"metadata": {"total_size": sum(s.nbytes for s in shards)}, "weight_map": weight_map}
        (folder / SAFETENSORS_INDEX).write_text(json.dumps(index_data, indent=2) + "\n")


def _check_arrival(spec: TensorSpec, name: str, tensor: torch.Tensor) -> None:
    if name != spec.name:
        raise CheckpointError(f"tensor {name!r} arrived where {spec.name!r} was expected")
    if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
        raise CheckpointError(
            f"tensor {name!r} arrived as {list(tensor.shape)} {tensor.dtype}, expected "
            f"{list(spec.shape)} {spec.dtype}"
        )


def _stored_bytes(name: str, tensor: torch.Tensor, dtype: torch.dtype | None) -> memoryview:
    """The tensor's bytes as stored (cast to ``dtype`` if floating). Raises on NaN / inf."""
    tensor = tensor.detach()
    if tensor.is_floating_point():
        if not _all_finite(tensor):
            raise NonFiniteMergeError(f"tensor {name!r} holds NaN or inf; not saving it")
        if dtype is not None:
            tensor = tensor.to(dtype)
    flat = tensor.to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def _all_finite(tensor: torch.Tensor) -> bool:
    if tensor.device.type == "cpu" and tensor.dtype in _NUMPY_FLOATS:
        return bool(np.isfinite(tensor.numpy()).all())  # about 10x torch.isfinite on the CPU
    return bool(torch.isfinite(tensor).all())


_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def _write_at(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _stored_dtype(arriving: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and arriving.is_floating_point else arriving


# torch dtype -> safetensors code, in the order of safetensors' ``Dtype`` enum (merges.checkpoint's table)
_SAFETENSORS_DTYPES: dict[torch.dtype, str] = {getattr(torch, name): code for code, name in _DTYPE_CODES.items()}
_DTYPE_RANKS = {dtype: rank for rank, dtype in enumerate(_SAFETENSORS_DTYPES)}


def _dtype_rank(dtype: torch.dtype) -> int:
    rank = _DTYPE_RANKS.get(dtype)
    if rank is None:
        raise CheckpointError(f"safetensors cannot store {dtype}")
    return rank
