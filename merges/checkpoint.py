"""Local Hugging Face checkpoint folders, read lazily one tensor at a time.

Safetensors weights (``model.safetensors`` or a sharded ``model.safetensors.index.json``)
are read through safetensors' memory map; one open handle per shard is kept, so reading a
tensor never reads a whole file. ``read_into`` reads one tensor's bytes with plain file reads
at its data offsets into a caller's buffer instead: no mapped pages (which count in the
process's RSS once touched; the page cache does not), no handle kept open. Pickle weights (``pytorch_model.bin``, sharded
``pytorch_model.bin.index.json``, a single ``*.pt``) are refused unless the caller opts in
with ``allow_pickle=True``; they are then loaded with ``weights_only=True, mmap=True``.

Opening a safetensors checkpoint reads only its headers and does not import torch (``search
export`` and the dashboard stay light); torch is imported by the first tensor read, by
``Checkpoint.dtypes``, and by pickle weights.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import safe_open

from merges.errors import CheckpointError
from merges.layout import Layout, layout_of

if TYPE_CHECKING:
    import torch

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"

TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)

# safetensors dtype code -> the name of the torch dtype (names, so that torch loads only when
# needed), in the order of safetensors' ``Dtype`` enum, by which its header sorts tensors (widest
# last): the one table of dtype codes, read here, written by merges.save (tests/test_save.py pins
# its bytes against save_file) and folded to by merges.lora.
_SAFETENSORS_DTYPES: dict[str, str] = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn",
    "I16": "int16", "U16": "uint16", "F16": "float16", "BF16": "bfloat16", "I32": "int32",
    "U32": "uint32", "F32": "float32", "C64": "complex64", "F64": "float64", "I64": "int64",
    "U64": "uint64",
}
_CODE_OF_TORCH_NAME: dict[str, str] = {torch_name: code for code, torch_name in _SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """One checkpoint folder: config, tensor shapes and dtypes, layer map, lazy tensor reads."""

    path: Path
    config: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]  # every tensor, checkpoint order
    dtype_codes: dict[str, str]  # safetensors dtype codes ("F32", "BF16", ...), checkpoint order
    layout: Layout
    _file_of: dict[str, Path] = field(repr=False, compare=False)
    _pickle: bool = field(default=False, repr=False, compare=False)
    # Open shards, filled on first read: safetensors handles or mmap'd pickle state dicts.
    _handles: dict[Path, Any] = field(default_factory=dict, repr=False, compare=False)
    # Safetensors data offsets, filled on first ``read_into``: name -> (shard, start, end) in bytes.
    _offsets: dict[str, tuple[Path, int, int]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def label(self) -> str:
        """The folder name, for messages."""
        return self.path.name

    @property
    def folder(self) -> Path:
        """The folder config.json and the tokenizer files come from (``path`` but for a LoRA source)."""
        return self.path

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.shapes)

    @cached_property
    def dtypes(self) -> dict[str, torch.dtype]:
        """Each tensor's torch dtype (imports torch)."""
        import torch

        return {name: getattr(torch, _SAFETENSORS_DTYPES[code]) for name, code in self.dtype_codes.items()}

    def read(
        self,
        name: str,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """One tensor, read from its shard's memory map, on ``device`` in ``dtype``."""
        file = self._file_of.get(name)
        if file is None:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}")
        handle = self._handle(file)
        tensor = handle[name] if self._pickle else handle.get_tensor(name)
        return tensor.to(device=device, dtype=dtype or tensor.dtype)

    @property
    def readable_by_offset(self) -> bool:
        """Whether ``read_into`` works: a plain safetensors checkpoint (not pickle weights, not a
        tensor computed at read time such as a LoRA source's or a vocabulary view's)."""
        return type(self) is Checkpoint and not self._pickle

    def offset_source(self, name: str) -> Checkpoint | None:
        """The plain safetensors checkpoint whose ``read_into`` gives ``name`` as ``read`` gives it
        here (itself when ``readable_by_offset``), or None: read it with ``read``."""
        return self if self.readable_by_offset else None

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Tensor ``name`` as stored, read with plain file reads (``os.preadv``) into ``out`` (a
        contiguous CPU tensor of its entries, any shape, the stored dtype); returns ``out``.

        Nothing is memory-mapped and no file stays open (``readable_by_offset`` must hold)."""
        import torch

        if not self.readable_by_offset:
            raise CheckpointError(f"{self.path}: {name!r} cannot be read by offset (not plain safetensors)")
        if name not in self._file_of:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}")
        if not self._offsets:  # every shard's at once: one update, so a reader thread sees none or all
            found: dict[str, tuple[Path, int, int]] = {}
            for file in dict.fromkeys(self._file_of.values()):
                found.update(_data_offsets(file))
            self._offsets.update(found)
        file, start, end = self._offsets[name]
        if out.device.type != "cpu" or not out.is_contiguous() or out.dtype != self.dtypes[name]:
            raise CheckpointError(f"{self.path}: read_into {name!r} needs a contiguous CPU {self.dtypes[name]} buffer")
        if out.numel() * out.element_size() != end - start:
            raise CheckpointError(f"{self.path}: {name!r} holds {end - start} bytes, the buffer "
                                  f"{out.numel() * out.element_size()}")
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        fd = os.open(file, os.O_RDONLY)
        try:
            done = 0
            while done < len(view):  # a read returns at most ~2 GiB (Linux), or less near the end
                got = os.preadv(fd, [view[done:]], start + done)
                if got <= 0:
                    raise CheckpointError(f"{file}: ends inside tensor {name!r}")
                done += got
        finally:
            os.close(fd)
        return out

    def remote_code(self) -> dict[str, tuple[str, ...]]:
        """The Python classes the folder asks transformers to import: file -> ``Auto… -> module.Class``.

        Read from the ``auto_map`` of config.json and tokenizer_config.json. transformers
        runs that code only with ``trust_remote_code=True``; the study decides
        (``models.trust_remote_code``), so every load must pass the flag explicitly.
        """
        found: dict[str, tuple[str, ...]] = {}
        tokenizer_config = self.folder / "tokenizer_config.json"
        sources = [("config.json", self.config)]
        if tokenizer_config.is_file():
            sources.append(("tokenizer_config.json", _read_json(tokenizer_config, what="tokenizer_config.json")))
        for file, data in sources:
            auto_map = data.get("auto_map") if isinstance(data, dict) else None
            if not auto_map:
                continue
            if isinstance(auto_map, dict):
                entries = [
                    f"{auto} -> {', '.join(str(c) for c in (target if isinstance(target, list) else [target]) if c)}"
                    for auto, target in auto_map.items()
                ]
            else:  # an older list form: class names only
                entries = [str(auto_map)]
            found[file] = tuple(entries)
        return found

    def tokenizer_files(self) -> tuple[Path, ...]:
        """The tokenizer files present in the folder (copied next to a saved merge)."""
        return tuple(self.folder / f for f in TOKENIZER_FILES if (self.folder / f).is_file())

    def write_tokenizer(self, folder: Path) -> None:
        """Copy the tokenizer files into ``folder`` (a merge's output)."""
        for file in self.tokenizer_files():
            shutil.copy2(file, folder / file.name)

    def __getstate__(self) -> dict[str, Any]:
        # Open handles do not pickle (e.g. to a Ray worker); they are reopened on first read.
        return {**self.__dict__, "_handles": {}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            object.__setattr__(self, key, value)

    def release(self) -> None:
        """Close the open shards: their memory-mapped pages leave the process (a later read reopens)."""
        self._handles.clear()

    def _handle(self, file: Path) -> Any:
        handle = self._handles.get(file)
        if handle is None:
            handle = _load_pickle(file) if self._pickle else _open_safetensors(file)
            self._handles[file] = handle
        return handle


def open_checkpoint(path: str | Path, *, allow_pickle: bool = False) -> Checkpoint:
    """Open a local checkpoint folder: parse config.json and index every tensor (no data read).

    ``MODEL+ADAPTER`` (mergekit's ``model+lora``) opens ``MODEL`` with the PEFT LoRA adapter in
    ``ADAPTER`` folded in (``merges.lora``); an existing folder whose name holds ``+`` is a plain one.
    """
    from merges.lora import open_lora_source, split_reference

    model, adapter = split_reference(path)
    if adapter is not None:
        return open_lora_source(open_checkpoint(model, allow_pickle=allow_pickle), adapter)
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    config = _read_json(folder / "config.json", what="config.json")
    if not isinstance(config, dict):
        raise CheckpointError(f"{folder / 'config.json'}: expected a JSON object")

    files = _weight_files(folder, allow_pickle=allow_pickle)
    pickle = files.pickle
    shapes: dict[str, tuple[int, ...]] = {}
    dtype_codes: dict[str, str] = {}
    file_of: dict[str, Path] = {}
    handles: dict[Path, Any] = {}  # pickle state dicts, kept for reads
    for file in files.shards:
        if pickle:
            import torch

            handle = handles[file] = _load_pickle(file)
        else:  # headers only: numpy needs no torch; tensor reads open the file for torch
            handle = _open_safetensors(file, framework="numpy")
        names = list(handle) if pickle else list(handle.offset_keys())
        for name in names:
            if name in file_of:
                raise CheckpointError(f"{file}: tensor {name!r} is also in {file_of[name]}")
            if pickle:
                tensor = handle[name]
                if not isinstance(tensor, torch.Tensor):
                    raise CheckpointError(f"{file}: entry {name!r} is not a tensor")
                shapes[name] = tuple(tensor.shape)
                code = _CODE_OF_TORCH_NAME.get(str(tensor.dtype).removeprefix("torch."), str(tensor.dtype))
            else:
                sl = handle.get_slice(name)
                shapes[name], code = tuple(sl.get_shape()), sl.get_dtype()
            dtype_codes[name] = _dtype_code(code, file, name)
            file_of[name] = file
    if files.expected is not None:
        missing = [n for n in files.expected if n not in file_of]
        if missing:
            raise CheckpointError(
                f"{files.expected_from}: tensor {missing[0]!r} is listed but not in its shard "
                f"{files.expected[missing[0]]}"
            )
    if not shapes:
        raise CheckpointError(f"{folder}: the weight files hold no tensors")
    try:
        layout = layout_of(list(shapes), config, shapes)
    except CheckpointError as exc:
        raise CheckpointError(f"{folder}: {exc}") from None
    return Checkpoint(folder, config, shapes, dtype_codes, layout, file_of, pickle, handles)


# -- weight files -----------------------------------------------------------------


@dataclass(frozen=True)
class _WeightFiles:
    shards: tuple[Path, ...]
    pickle: bool
    expected: dict[str, Path] | None = None  # tensor -> shard, from an index
    expected_from: Path | None = None


def _weight_files(folder: Path, *, allow_pickle: bool) -> _WeightFiles:
    if (folder / SAFETENSORS_INDEX).is_file():
        return _from_index(folder / SAFETENSORS_INDEX, pickle=False)
    if (folder / SAFETENSORS_FILE).is_file():
        return _WeightFiles((folder / SAFETENSORS_FILE,), pickle=False)
    pickled: list[Path] = []
    if (folder / PICKLE_INDEX).is_file():
        pickled = [folder / PICKLE_INDEX]
    elif (folder / PICKLE_FILE).is_file():
        pickled = [folder / PICKLE_FILE]
    else:
        pickled = sorted(folder.glob("*.pt")) + sorted(folder.glob("*.bin"))
    if not pickled:
        raise CheckpointError(
            f"{folder}: no weights found (expected {SAFETENSORS_FILE} or {SAFETENSORS_INDEX})"
        )
    if not allow_pickle:
        raise CheckpointError(
            f"{folder}: only pickle weights ({pickled[0].name}); pickle files can run code when "
            "loaded, so they are refused unless you opt in with allow_pickle=True "
            "(or convert the checkpoint to safetensors)"
        )
    if pickled[0].name == PICKLE_INDEX:
        return _from_index(pickled[0], pickle=True)
    if len(pickled) > 1:
        raise CheckpointError(
            f"{folder}: several pickle weight files ({', '.join(p.name for p in pickled)}) and no "
            f"{PICKLE_INDEX} saying how they fit together"
        )
    return _WeightFiles((pickled[0],), pickle=True)


def _from_index(index_path: Path, *, pickle: bool) -> _WeightFiles:
    index = _read_json(index_path, what=index_path.name)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: missing or empty 'weight_map'")
    expected = {str(name): index_path.parent / str(shard) for name, shard in weight_map.items()}
    shards = tuple(sorted(set(expected.values())))
    for shard in shards:
        if not shard.is_file():
            raise CheckpointError(f"{index_path}: shard {shard} named in the index is missing")
    return _WeightFiles(shards, pickle, expected, index_path)


def _open_safetensors(file: Path, *, framework: str = "pt") -> Any:
    try:
        return safe_open(str(file), framework=framework, device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError / OSError
        raise CheckpointError(f"{file}: cannot open as safetensors ({exc})") from exc


def _data_offsets(file: Path) -> dict[str, tuple[Path, int, int]]:
    """Each tensor's byte range in a safetensors file (its header: an 8-byte little-endian length,
    then JSON with ``data_offsets`` relative to the end of the header)."""
    try:
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
    except (OSError, struct.error, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: cannot read its safetensors header ({exc})") from exc
    data = 8 + length
    return {name: (file, data + int(entry["data_offsets"][0]), data + int(entry["data_offsets"][1]))
            for name, entry in header.items() if name != "__metadata__"}


def _load_pickle(file: Path) -> Mapping[str, Any]:
    import torch

    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ...
        raise CheckpointError(f"{file}: cannot load pickle weights ({exc})") from exc
    if (
        isinstance(state, Mapping)
        and "state_dict" in state
        and isinstance(state["state_dict"], Mapping)
    ):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{file}: expected a state dict, got {type(state).__name__}")
    return state


def _dtype_code(code: str, file: Path, name: str) -> str:
    if code not in _SAFETENSORS_DTYPES:
        raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {code}")
    return code


def _read_json(path: Path, *, what: str) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot parse {what} ({exc})") from exc
