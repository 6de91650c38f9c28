"""LoRA sources: a base checkpoint plus a PEFT adapter, folded into full weights as mergekit 0.1.5 does.

A source written ``MODEL+ADAPTER`` (mergekit's ``model+lora`` syntax; ``models.sources.NAME =
{model = ..., lora = ...}`` in study.toml) is the checkpoint ``MODEL`` with the LoRA adapter
folder ``ADAPTER`` (``adapter_config.json`` + ``adapter_model.safetensors``) merged in.

mergekit 0.1.5 (``ModelReference.merged``) loads ``MODEL`` with transformers (dtype ``"auto"``:
config.json's ``dtype`` / ``torch_dtype``, else the weights' own), applies the adapter with
``peft.PeftModel.from_pretrained`` and ``merge_and_unload()``, saves the result and merges
that. :class:`LoraCheckpoint` reproduces those tensors bit for bit without loading a model:

* every floating tensor is the model's, cast to that load dtype ``D``;
* peft keeps adapter weights in float32 (``autocast_adapter_dtype``), so ``A`` and ``B`` are
  the file's values in float32 and ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with
  ``use_rslora``);
* a linear target gets ``W += transpose(B @ A, fan_in_fan_out) * scaling`` (in-place in ``D``,
  the sum computed in float32); GPT-2's ``Conv1D`` layers are stored transposed, which peft
  handles by forcing ``fan_in_fan_out``;
* an embedding target gets ``W += ((B @ A).T * scaling).to(D)`` (peft rounds the delta first).

Adapters that need more than that (DoRA, LoRA biases, ``modules_to_save``, rank / alpha
patterns, other PEFT types...) are refused with the key that asks for it: nothing is
approximated. Opening reads JSON and safetensors headers only (no torch), so a mismatched
adapter is named at ``search validate``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import safe_open

from merges.checkpoint import _CODE_OF_TORCH_NAME, _SAFETENSORS_DTYPES, Checkpoint
from merges.errors import CheckpointError

if TYPE_CHECKING:
    import torch

LORA_SEPARATOR = "+"  # mergekit's ``model+lora``
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."  # how peft names the wrapped model's modules in an adapter file

# adapter_config.json keys that ask for something a plain fold cannot reproduce; a key counts when its value is truthy.
_UNFOLDABLE_KEYS: dict[str, str] = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "lora_bias": "LoRA biases",
    "modules_to_save": "fully trained modules (modules_to_save)",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "layer_replication": "replicated layers (layer_replication)",
    "megatron_config": "Megatron layers (megatron_config)",
}


def split_reference(reference: str | Path) -> tuple[str, str | None]:
    """``MODEL+ADAPTER`` -> (MODEL, ADAPTER); a plain path -> (path, None).

    An existing folder is a plain checkpoint even when its name holds ``+``; otherwise a
    ``+`` separates the model from the adapter as in mergekit (which allows only one).
    """
    text = str(reference)
    if LORA_SEPARATOR not in text or Path(text).expanduser().is_dir():
        return text, None
    parts = text.split(LORA_SEPARATOR)
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise CheckpointError(
            f"{text!r}: expected MODEL{LORA_SEPARATOR}ADAPTER, a model with a LoRA adapter "
            f"(one '{LORA_SEPARATOR}', as mergekit reads it)"
        )
    return parts[0], parts[1]


def lora_reference(model: str | Path, adapter: str | Path) -> str:
    """The ``MODEL+ADAPTER`` text of a LoRA source."""
    return f"{model}{LORA_SEPARATOR}{adapter}"


def map_reference(reference: str | Path, rename: Any) -> str:
    """``rename`` applied to each folder of a reference (both halves of ``MODEL+ADAPTER``)."""
    model, adapter = split_reference(reference)
    if adapter is None:
        return str(rename(model))
    return lora_reference(rename(model), rename(adapter))


def reference_folders(reference: str | Path) -> tuple[Path, ...]:
    """The folders a source reference reads: the model, and the adapter for a LoRA source."""
    model, adapter = split_reference(reference)
    return tuple(Path(p).expanduser() for p in (model, adapter) if p is not None)


@dataclass(frozen=True)
class _Target:
    """One tensor of the model that the adapter changes."""

    a_key: str
    b_key: str
    embedding: bool
    transposed: bool  # peft's fan_in_fan_out: the stored weight is (in, out)
    replacement: str | None = None  # a saved ``base_layer.weight`` peft loads over the model's first


@dataclass(frozen=True)
class LoraAdapter:
    """A PEFT LoRA adapter folder, checked against the model it is folded into."""

    path: Path
    scaling: float
    targets: dict[str, _Target]  # model tensor name -> adapter tensors
    file: Path


@dataclass(frozen=True, eq=False)
class LoraCheckpoint(Checkpoint):
    """A checkpoint with a LoRA adapter folded in on read: ``path`` is ``MODEL+ADAPTER``."""

    model: Checkpoint | None = None
    adapter: LoraAdapter | None = None
    fold_dtype: str = "float32"  # torch dtype name mergekit's transformers load gives every floating tensor
    _adapter_handle: list[Any] = field(default_factory=list, repr=False, compare=False)

    @property
    def folder(self) -> Path:
        assert self.model is not None
        return self.model.folder

    @property
    def label(self) -> str:
        assert self.model is not None and self.adapter is not None
        return f"{self.model.label}{LORA_SEPARATOR}{self.adapter.path.name}"

    def read(
        self,
        name: str,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        import torch

        assert self.model is not None and self.adapter is not None
        target = self.adapter.targets.get(name)
        if target is not None and target.replacement is not None:
            weight = self._adapter().get_tensor(target.replacement)
        else:
            weight = self.model.read(name)
        if weight.is_floating_point():
            # the fold adds in place: into a copy, never into the tensor read (it can be the
            # open file's mapped memory, which the next read of this tensor returns again)
            weight = weight.to(getattr(torch, self.fold_dtype), copy=target is not None)
            if target is not None:
                weight = self._fold(weight, target)
        return weight.to(device=device, dtype=dtype or weight.dtype)

    def _fold(self, weight: torch.Tensor, target: _Target) -> torch.Tensor:
        import torch

        assert self.adapter is not None
        handle = self._adapter()
        # peft keeps adapter weights in float32 (autocast_adapter_dtype) whatever the file holds.
        a = handle.get_tensor(target.a_key).to(torch.float32)
        b = handle.get_tensor(target.b_key).to(torch.float32)
        if target.embedding:  # peft lora.Embedding.merge: the delta is rounded to the weight's dtype first
            weight += ((b @ a).T * self.adapter.scaling).to(weight.dtype)
        else:  # peft lora.Linear.merge: in place, the sum computed in float32
            product = b @ a
            weight += (product.T if target.transposed else product) * self.adapter.scaling
        return weight

    def _adapter(self) -> Any:
        assert self.adapter is not None
        if not self._adapter_handle:
            try:
                self._adapter_handle.append(safe_open(str(self.adapter.file), framework="pt", device="cpu"))
            except Exception as exc:  # safetensors raises its own SafetensorError / OSError
                raise CheckpointError(f"{self.adapter.file}: cannot open as safetensors ({exc})") from exc
        return self._adapter_handle[0]

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_adapter_handle": []}


def open_lora_source(model: Checkpoint, adapter_dir: str | Path) -> LoraCheckpoint:
    """``model`` with the adapter in ``adapter_dir`` folded in; every mismatch named (no tensor read)."""
    folder = Path(adapter_dir).expanduser()
    adapter = _read_adapter(folder, model)
    fold_dtype = _load_dtype(model)
    dtype_codes = {
        name: (_CODE_OF_TORCH_NAME[fold_dtype] if _SAFETENSORS_DTYPES[code].startswith(("float", "bfloat")) else code)
        for name, code in model.dtype_codes.items()
    }
    return LoraCheckpoint(
        Path(lora_reference(model.path, folder)), model.config, dict(model.shapes), dtype_codes, model.layout,
        {}, model=model, adapter=adapter, fold_dtype=fold_dtype,
    )


def _load_dtype(model: Checkpoint) -> str:
    """The dtype transformers' ``dtype="auto"`` loads ``model`` in (what mergekit folds in)."""
    for key in ("dtype", "torch_dtype"):
        value = model.config.get(key)
        if isinstance(value, str) and value.startswith(("float", "bfloat")) and value in _SAFETENSORS_DTYPES.values():
            return value
    # No dtype in config.json: transformers takes the first floating tensor's.
    for code in model.dtype_codes.values():
        name = _SAFETENSORS_DTYPES[code]
        if name.startswith(("float", "bfloat")) and not name.startswith("float8"):
            return name
    return "float32"


def _read_adapter(folder: Path, model: Checkpoint) -> LoraAdapter:
    where = f"LoRA adapter {folder}"
    if not folder.is_dir():
        raise CheckpointError(f"{where}: the folder does not exist")
    config_file = folder / ADAPTER_CONFIG
    if not config_file.is_file():
        raise CheckpointError(f"{where}: {ADAPTER_CONFIG} is missing (is this a PEFT adapter folder?)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_file}: cannot parse ({exc})") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file}: expected a JSON object")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise CheckpointError(
            f"{config_file}: peft_type {peft_type!r}: only LoRA adapters (peft_type 'LORA') can be folded in"
        )
    for key, what in _UNFOLDABLE_KEYS.items():
        if config.get(key):
            raise CheckpointError(f"{config_file}: {key} = {config[key]!r}: {what} cannot be folded in")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise CheckpointError(f"{config_file}: r: expected a positive integer, got {r!r}")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise CheckpointError(f"{config_file}: lora_alpha: expected a number, got {alpha!r}")
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r

    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        found = sorted(p.name for p in folder.glob("adapter_model.*"))
        hint = f" (found {', '.join(found)}; only safetensors adapters are read)" if found else ""
        raise CheckpointError(f"{where}: {ADAPTER_WEIGHTS} is missing{hint}")
    try:
        handle = safe_open(str(weights), framework="numpy", device="cpu")
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.offset_keys()}
    except Exception as exc:  # safetensors raises its own SafetensorError / OSError
        raise CheckpointError(f"{weights}: cannot open as safetensors ({exc})") from exc
    targets = _targets(weights, shapes, model, r)
    if not targets:
        raise CheckpointError(f"{weights}: holds no LoRA tensors")
    return LoraAdapter(folder, scaling, targets, weights)


_BASE_LAYER = ".base_layer.weight"
_SUFFIXES = {
    ".lora_A.weight": ("A", False),
    ".lora_B.weight": ("B", False),
    ".lora_embedding_A": ("A", True),
    ".lora_embedding_B": ("B", True),
}


def _targets(file: Path, shapes: dict[str, tuple[int, ...]], model: Checkpoint, r: int) -> dict[str, _Target]:
    halves: dict[str, dict[str, str]] = {}
    kinds: dict[str, bool] = {}
    replaced: dict[str, str] = {}
    for key in shapes:
        if key.startswith(_PREFIX) and key.endswith(_BASE_LAYER):
            # peft saves a targeted embedding's own weight (save_embedding_layers) and loads it back.
            replaced[key[len(_PREFIX):-len(_BASE_LAYER)]] = key
            continue
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if suffix is None or not key.startswith(_PREFIX):
            raise CheckpointError(
                f"{file}: tensor {key!r} is not a LoRA A/B matrix of a module; such adapters cannot be folded in"
            )
        half, embedding = _SUFFIXES[suffix]
        module = key[len(_PREFIX):-len(suffix)]
        halves.setdefault(module, {})[half] = key
        kinds[module] = embedding
    targets: dict[str, _Target] = {}
    for module, pair in halves.items():
        if set(pair) != {"A", "B"}:
            missing = "B" if "A" in pair else "A"
            raise CheckpointError(f"{file}: module {module!r} has no LoRA {missing} matrix")
        name = f"{module}.weight"
        if name not in model.shapes:
            raise CheckpointError(
                f"{file}: tensor {pair['A']!r} targets {name!r}, which model {model.path} does not have "
                "(an adapter for another base?)"
            )
        target = _check_shapes(file, name, pair, shapes, model, r, embedding=kinds[module])
        replacement = replaced.pop(module, None)
        if replacement is not None:
            if shapes[replacement] != tuple(model.shapes[name]):
                raise CheckpointError(
                    f"{file}: tensor {replacement!r} has shape {list(shapes[replacement])}, but tensor "
                    f"{name!r} of model {model.path} has shape {list(model.shapes[name])} (an adapter for another base?)"
                )
            target = _Target(target.a_key, target.b_key, target.embedding, target.transposed, replacement)
        targets[name] = target
    if replaced:
        key = next(iter(replaced.values()))
        raise CheckpointError(f"{file}: tensor {key!r} belongs to no LoRA module; such adapters cannot be folded in")
    return targets


def _check_shapes(file: Path, name: str, pair: dict[str, str], shapes: dict[str, tuple[int, ...]],
                  model: Checkpoint, r: int, *, embedding: bool) -> _Target:
    a_shape, b_shape, w_shape = shapes[pair["A"]], shapes[pair["B"]], model.shapes[name]
    for key, shape in ((pair["A"], a_shape), (pair["B"], b_shape)):
        if len(shape) != 2:
            raise CheckpointError(f"{file}: tensor {key!r} has shape {list(shape)}; expected a matrix")
    if a_shape[0] != r:
        raise CheckpointError(f"{file}: tensor {pair['A']!r} has shape {list(a_shape)}; its rank is not r = {r}")
    if b_shape[1] != r:
        raise CheckpointError(f"{file}: tensor {pair['B']!r} has shape {list(b_shape)}; its rank is not r = {r}")
    if embedding:  # A: (r, vocab), B: (dim, r); the weight is (vocab, dim)
        delta = (a_shape[1], b_shape[0])
        transposed = False
    else:  # A: (r, in), B: (out, r); nn.Linear stores (out, in), GPT-2's Conv1D (in, out)
        transposed = _is_conv1d(model, name)
        delta = (a_shape[1], b_shape[0]) if transposed else (b_shape[0], a_shape[1])
    if tuple(w_shape) != delta:
        raise CheckpointError(
            f"{file}: tensors {pair['A']!r} {list(a_shape)} and {pair['B']!r} {list(b_shape)} make a "
            f"{list(delta)} update, but tensor {name!r} of model {model.path} has shape {list(w_shape)} "
            "(an adapter for another base?)"
        )
    return _Target(pair["A"], pair["B"], embedding, transposed)


def _is_conv1d(model: Checkpoint, name: str) -> bool:
    """GPT-2's in-layer projections are transformers ``Conv1D`` (weights stored (in, out))."""
    if model.config.get("model_type") != "gpt2":
        return False
    return any(info.name == name and info.layer is not None for info in model.layout.tensors)
