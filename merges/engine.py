"""The in-memory merge engine: resident tensors, precomputed statistics, one pass per trial.

A ``MergeEngine`` reads the base and the sources once, keeps the base and the task
vectors (source - base) resident on its device in the arithmetic dtype, and merges a
``Recipe`` straight into a live model's parameter storage (``merge_into``) or into new
tensors (``materialize``). Everything that does not depend on a recipe's numbers is
computed once per engine, lazily, on the first recipe that needs it:

* per delta, ``|delta|`` sorted (kept in CPU memory; only looked up): a TIES or breadcrumbs density becomes an exact magnitude band by one lookup, with
  no sort per trial. Where equal nonzero magnitudes straddle the cut, mergekit's sort
  order decides which are kept, so for that tensor the engine keeps mergekit's sort
  positions (int32) and masks by position instead;
* DARE / DELLA: uniform int32 keys per entry from a ``torch.Generator`` seeded by a
  stable hash of (recipe seed, tensor name, source position); one seed is cached;
* per delta, its L1 norm (for ``rescale``); DELLA's in-row rank positions; per tensor,
  the slerp angle between the base and the other model;
* per source, its own tensors again (``_exact_source``) for the methods that take whole
  models rather than deltas (linear, slerp, model_stock, passthrough): ``base + (source -
  base)`` is not always ``source`` in floating point, and mergekit sums the sources
  themselves, so only they give its result bit for bit.

Dtypes follow mergekit 0.1.5: every input is read in the recipe's ``dtype`` (mergekit casts
at load); linear, slerp and passthrough accumulate in float32 and round once into that
dtype; model_stock and the task-vector family compute in that dtype; ``out_dtype`` is one
more rounding of the result (mergekit's save).

A trial is then one fused elementwise pass per tensor (``merges.methods.fused``): a C
kernel on CPU split over a thread pool, or chunked torch operations on other devices
(CUDA is the default device when available). Methods that rescale (DARE by default)
make one more pass over the kept entries to get their L1 norm.

Memory bound (N parameters, K sources, float32): ``resident = 4 N (1 + K)`` bytes for
base and deltas, plus ``4 N K`` for the sorted magnitudes once TIES / breadcrumbs run,
plus ``4 N K`` of random keys for the DARE seed in use (DELLA adds ``4 N K`` of row
positions), plus ``4`` bytes per entry of tensors whose cut is tied, plus ``4 N K`` (the
dtype's size) of the sources themselves once linear, slerp, model_stock or passthrough run. During a trial
``merge_into`` allocates nothing model-sized: it writes into the live parameters, with a
temporary only for a parameter whose dtype or device differs from the engine's.
``materialize`` allocates its output (N entries). DELLA and model_stock build per-tensor
temporaries (K copies of one tensor).

Engine plans (``plan=``; ``search.memory`` picks one from checkpoint headers before
anything loads): ``"resident"`` is all of the above. ``"lean"`` keeps only the base and the
sources as stored (a bf16 checkpoint stays bf16 in memory; a storage dtype wider than the
arithmetic one is held in the arithmetic one; a LoRA source or a vocabulary view, computed
at read time, in the arithmetic one) and runs a trial in chunks of tensors (each chunk at
most the largest tensor's entries): per chunk it forms the task vectors in the arithmetic
dtype, finds each magnitude cut by selection (at the one or two ranks a band needs, no sorted
copy: on the CPU in float32 inside the one bucket of a ``magnitude_sketch`` histogram, built per
tensor and source at load, that holds the rank; else ``np.partition`` / ``torch.kthvalue`` over
the tensor), decides a tied cut by ``tie_order`` (torch's sort replayed only where a cut lies; a
full sort where the replay is unavailable), draws the DARE keys, then runs the same planners (the
chunk's tensors side by side on the pool) and fused passes and drops all of it (on the CPU its
buffers are reused by the next chunk and trial: no fresh model-sized pages per trial). The
tensors are the resident plan's bit for bit: the inputs are the same values (a cast at read
time and a cast later round alike), and a band from selected values is the band from
sorted ones. Memory: the held checkpoints and histograms plus one chunk's deltas (none for a task
vector only the fused pass reads: ``_task_vector``; a formed TIES delta's tied cut zeroes its run's
dropped entries in place and a magnitude band drops the rest, no keys; over bf16 checkpoints in
float32 no float32 base: see ``_narrow_base``), the keys its method draws and sort temporaries; the
live model is built from the held base (``new_model``), not mapped from the file again. A source
tensor equal to the base's bit for bit is held once (the base's tensor stands for it; stream does
not read it per chunk): most of a LoRA-merged fine-tune's tensors.

``"stream"`` is the lean plan holding no checkpoint: each chunk's tensors of the base and the
sources are read when the chunk runs, as the lean plan would hold them (``_held_dtype``), into
buffers reused from chunk to chunk (two arenas: the next chunk is read on two reader threads
while this one merges, ``_prefetch``). A plain safetensors checkpoint is read by ``os.preadv`` at
the tensor's data offsets (``Checkpoint.read_into``): no memory map, whose touched pages count in
the process's RSS (the page cache that serves the reads does not); others (pickle weights, a
LoRA source, a vocabulary view) through ``Checkpoint.read``. At load every tensor is read once
the same way, checked finite and its histograms built (``_load_stream``); ``new_model`` reads the
base again, in the arithmetic dtype, which ``from_pretrained`` takes as the parameters themselves.
Memory: the histograms, two chunks' read buffers and the lean chunk's terms, and the live model.
The tensors are the lean plan's bit for bit (the same values, read the same way).

``iter_materialize`` yields ``materialize``'s tensors chunk by chunk (for a writer that streams
them to disk): under lean / stream on the CPU the results of one chunk live in memory the next
one reuses, so that is all of the merge that is alive.

If ``merge_into`` raises ``NonFiniteMergeError`` (or any error after it started writing),
the model holds a partial merge: merge a recipe into it again before using it.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import transformers

from merges.buffers import Arena, BufferPool, release_freed_heap
from merges.checkpoint import Checkpoint
from merges.errors import MergeError, NonFiniteMergeError, RecipeError
from merges.grouping import consecutive_groups
from merges.layout import Layout, TensorInfo
from merges.methods import magnitude_sketch, sparsify, tie_order
from merges.methods.fused import (
    Delta,
    FusedJob,
    PairDelta,
    bf16_delta,
    masked_l1_many,
    native_library,
    native_supports,
    run_eager,
    run_native_many,
)
from merges.methods.planning import BASE, HALF, Plan, RankKey, TensorContext
from merges.methods.registry import METHODS, MethodSpec, non_base_sources, validate_recipe
from merges.preflight import preflight
from merges.recipe import Recipe

_T = TypeVar("_T")
ENGINE_PLANS = ("resident", "lean", "stream")  # fastest first; search.memory costs each


@dataclass(frozen=True)
class _Target:
    """One output tensor: its name in the merged model and the input tensor it comes from."""

    out_name: str
    info: TensorInfo
    model: int | None = None  # passthrough: which model supplies it
    scale: float = 1.0  # passthrough scale


@dataclass
class _Work:
    """One output tensor being computed, as its method planned it."""

    target: _Target
    out: torch.Tensor  # flat, engine dtype and device
    plan: Plan

    @property
    def job(self) -> FusedJob | None:
        return self.plan.job

    @property
    def eager(self) -> Callable[[], torch.Tensor] | None:
        return self.plan.eager

    @property
    def rescale(self) -> list[int] | None:
        return self.plan.rescale

    @property
    def ranks(self) -> list[tuple[int, RankKey]] | None:
        return self.plan.ranks


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _stable_seed(*parts: object) -> int:
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or inf in ``tensor``. A NaN or inf makes the sum non-finite, and one sum is ~20x
    cheaper than ``isfinite(t).all()`` (which writes a bool per entry); only a non-finite sum
    (also reached by overflow of finite entries) is checked entry by entry."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


class MergeEngine:
    """Merges recipes over one base and its sources, with every input tensor resident."""

    def __init__(self, base: Checkpoint | None, sources: Sequence[Checkpoint], *,
                 device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                 threads: int | None = None, plan: str = "resident") -> None:
        if plan not in ENGINE_PLANS:
            raise MergeError(f"MergeEngine: plan must be one of {ENGINE_PLANS}, got {plan!r}")
        if base is None and not sources:
            raise MergeError("MergeEngine needs a base or at least one source checkpoint")
        if not dtype.is_floating_point:
            raise MergeError(f"MergeEngine: arithmetic dtype must be floating point, got {dtype}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        self._dtype = dtype
        self._plan_name = plan
        self._lean = plan in ("lean", "stream")  # stream: the lean plan, reading its inputs per chunk
        self._stream = plan == "stream"
        self._threads = max(1, threads or torch.get_num_threads())
        self._base_ckpt = base
        self._sources = tuple(sources)
        anchor = base if base is not None else self._sources[0]
        others = [s for s in self._sources if s is not anchor]
        self._layout = preflight(anchor, others) if others else anchor.layout
        self._anchor = anchor
        self._index: dict[Path, int] = {}
        for i, source in enumerate(self._sources):
            self._index.setdefault(source.path.resolve(), i)
        if base is not None:
            self._index[base.path.resolve()] = BASE
        self._index_by_text: dict[str, int] = {}
        self._shapes = {info.name: tuple(anchor.shapes[info.name]) for info in self._layout.tensors}
        self._floating = {name: anchor.dtypes[name].is_floating_point for name in self._shapes}
        self._pool = ThreadPoolExecutor(self._threads) if self._threads > 1 else None
        self._lib = native_library() if self._device.type == "cpu" and dtype == torch.float32 else None

        # resident: base (None without a base checkpoint: deltas are then the sources)
        self._base: dict[str, torch.Tensor] = {}
        self._deltas: dict[str, list[torch.Tensor]] = {}
        self._fixed: dict[str, torch.Tensor] = {}  # non-floating tensors, taken from the anchor
        # lean: each floating tensor as held ([base,] sources...), and one chunk's derived tensors;
        # stream: the held tensors of one chunk only, read when it runs
        self._models = ([anchor] if base is not None else []) + list(self._sources)
        self._held: dict[str, list[torch.Tensor]] = {}
        self._chunk: dict[tuple[str, str, int], torch.Tensor] = {}  # (kind, name, model)
        self._order: dict[tuple[str, int], object] = {}  # one chunk's |delta| order statistics
        # lean, CPU float32: per (tensor, source) counts of |delta| per bucket (magnitude_sketch)
        self._sketch: dict[tuple[str, int], np.ndarray] = {}
        # lean / stream, sketched tensors a source left bit for bit as the base: their task vector
        # is +0.0 everywhere (x - x), read from one zero buffer (``_zero_delta``), never formed
        self._same: set[tuple[str, int]] = set()
        self._zeros: torch.Tensor | None = None
        # lean, one chunk: the (tensor, source) task vectors handed out not formed (``_task_vector``)
        self._pairs: set[tuple[str, int]] = set()
        self._names = [name for name in self._shapes if self._floating[name]]
        self._largest = max((self._numel(name) for name in self._names), default=0)
        # lean on the CPU: one chunk's base and task vectors, and its tied cuts' keys, in memory
        # reused from trial to trial (see Arena); replay scratch likewise, one per replay at once
        reuse = self._lean and self._device.type == "cpu"
        k = len(self._sources)
        slack = Arena.ALIGN * len(self._names)  # each tensor's start rounded up to a line
        self._arena = Arena((self._largest + slack) * (1 + k) if reuse else 0, dtype, self._device)
        self._key_arena = Arena((self._largest + slack) * k if reuse else 0, torch.int32, self._device)
        self._replay_scratch = BufferPool(self._largest if reuse else 0, torch.int32,
                                           max(1, min(k, self._threads)))
        # stream on the CPU: one chunk's tensors of every checkpoint as read (bytes; a held tensor
        # is never wider than the arithmetic dtype), twice: the next chunk is read into the other
        # while this one merges (_prefetch, on the reader threads)
        read_bytes = len(self._models) * (self._largest * dtype.itemsize + slack)
        self._read_arenas = tuple(Arena(read_bytes if reuse and self._stream else 0, torch.uint8, self._device)
                                  for _ in range(2))
        self._reader: ThreadPoolExecutor | None = None  # stream: started by the first merge
        self._load()
        release_freed_heap()  # what loading freed (read buffers, the sketches' temporaries)
        # lazily computed statistics (see the module docstring)
        self._ascending: dict[tuple[str, int], torch.Tensor] = {}  # |delta| ascending, CPU: lookups
        self._rank: dict[tuple[str, str, int], torch.Tensor] = {}  # (kind, name, source), ties only
        self._random_seed: int | None = None
        self._random: dict[tuple[str, int, int], torch.Tensor] = {}  # (name, position, source)
        self._della_position: dict[str, list[torch.Tensor]] = {}
        self._l1: dict[tuple[str, int], float] = {}
        self._statistics: dict[tuple[object, ...], object] = {}  # planners' own (slerp angles...)
        self._exact: dict[tuple[str, int], torch.Tensor] = {}  # (name, source): its own values

    # -- public ---------------------------------------------------------------------

    @property
    def layout(self) -> Layout:
        return self._layout

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def plan(self) -> str:
        """The engine plan (``ENGINE_PLANS``)."""
        return self._plan_name

    def resident_bytes(self) -> int:
        """Bytes of every tensor the engine holds (inputs and cached statistics), each tensor once
        (lean holds a source tensor left as the base as the base's tensor itself)."""
        tensors: list[torch.Tensor] = [*self._base.values(), *self._fixed.values(),
                                       *self._random.values(), *self._ascending.values(),
                                       *self._rank.values(), *self._exact.values()]
        for group in (self._deltas, self._della_position, self._held):
            for per_source in group.values():
                tensors.extend(per_source)
        distinct = {(t.data_ptr(), t.numel()): t.numel() * t.element_size() for t in tensors}
        return sum(distinct.values()) + sum(counts.nbytes for counts in self._sketch.values())

    def new_model(self, *, trust_remote_code: bool = False) -> transformers.PreTrainedModel:
        """A live model of the base's config with the base's weights, on the engine's device.

        ``trust_remote_code`` (the study's ``models.trust_remote_code``) goes to every
        transformers call explicitly: left unset, transformers asks ``[y/N]`` on a terminal
        before running a checkpoint's own Python (``auto_map``) and fails without one.
        """
        path = self._anchor.folder  # a LoRA source's model folder (merges.lora)
        config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        architecture = (getattr(config, "architectures", None) or [None])[0]
        model_class = getattr(transformers, architecture, None) if architecture else None
        if model_class is None:
            model_class = transformers.AutoModelForCausalLM
        held = self._held_state_dict()
        bars = transformers.utils.logging.is_progress_bar_enabled()
        transformers.utils.logging.disable_progress_bar()  # a local load: the bar is noise in logs
        try:
            if held is not None:
                model = model_class.from_pretrained(None, config=config, state_dict=held, dtype=self._dtype,
                                                    trust_remote_code=trust_remote_code)
            else:
                model = model_class.from_pretrained(
                    path, dtype=self._dtype, trust_remote_code=trust_remote_code
                ).to(self._device)
        finally:
            if bars:
                transformers.utils.logging.enable_progress_bar()
        vocab_size = self._anchor.config.get("vocab_size")
        if isinstance(vocab_size, int) and vocab_size != model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(vocab_size, mean_resizing=False)  # an output vocabulary (tokenizer_union)
        if self._device.type == "cpu":
            # from_pretrained leaves CPU weights mapped from the checkpoint file, or (held) the
            # engine's own tensors where no cast was needed: give them their own memory, so merges
            # write to RAM, not to copy-on-write file pages or the engine's inputs
            # (stream: the floating tensors were read for the model alone, they are its own)
            kept = self._fixed.values() if self._stream else held.values() if held is not None else ()
            shared = None if held is None else {t.untyped_storage().data_ptr() for t in kept}
            with torch.no_grad():
                for tensor in [*model.parameters(), *model.buffers()]:
                    if shared is None or tensor.untyped_storage().data_ptr() in shared:
                        tensor.data = tensor.data.clone()
            release_freed_heap()
        return model.eval()

    def _held_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Lean on the CPU: the anchor's tensors as the engine holds them (its own checkpoint's,
        not computed at read time), for ``new_model`` to build the live model from instead of the
        file: the same values (a bf16 tensor cast to float32 once, either way), without the file's
        mapped pages on top of the held copies and the live model (the lean plan's peak). Stream:
        read again the same way (``_read_held``) and cast to the arithmetic dtype tensor by tensor:
        ``from_pretrained`` takes tensors of its dtype as the parameters themselves, so the live
        model is all that is built (no second copy)."""
        if not self._lean or self._device.type != "cpu" or type(self._anchor) is not Checkpoint:
            return None
        if self._stream:
            state = {name: self._read_held(self._anchor, name).to(self._dtype).view(self._shapes[name])
                     for name in self._names}
        else:
            state = {name: self._held[name][0].view(self._shapes[name]) for name in self._names}
        state.update({name: tensor.view(self._shapes[name]) for name, tensor in self._fixed.items()})
        return state

    def merge_into(self, model: torch.nn.Module, recipe: Recipe) -> None:
        """Write the merge of ``recipe`` into ``model``'s parameters, in place.

        The recipe is validated before anything is written. After a
        ``NonFiniteMergeError`` the model is partly merged: re-merge before use.
        """
        targets = self._plan(recipe)
        live = self._model_tensors(model)
        chosen = self._dedupe_tied(targets, live)
        outputs: list[tuple[_Target, torch.Tensor, torch.Tensor]] = []
        for target in chosen:
            param = live.get(target.out_name)
            if param is None:
                raise RecipeError(f"model has no tensor {target.out_name!r} (recipe method "
                                  f"{recipe.method!r}, {recipe.n_layers} output layers)")
            if tuple(param.shape) != self._shapes[target.info.name]:
                raise MergeError(f"model tensor {target.out_name!r} has shape {tuple(param.shape)}, "
                                 f"the checkpoints have {self._shapes[target.info.name]}")
            dtype = self._compute_dtype(target.info.name)
            direct = (param.dtype == dtype and param.device == self._device
                      and param.is_contiguous())
            out = param.data.view(-1) if direct else torch.empty(
                param.numel(), dtype=dtype, device=self._device)
            outputs.append((target, out, param))
        with torch.no_grad():
            self._run(recipe, [(t, out) for t, out, _ in outputs])
            for _target, out, param in outputs:
                if out.data_ptr() != param.data_ptr():
                    param.data.copy_(out.view(param.shape))

    def materialize(self, recipe: Recipe, *, device: str | torch.device = "cpu"
                    ) -> dict[str, torch.Tensor]:
        """The merged tensors by output name, in ``recipe.out_dtype`` (default: as mergekit
        returns them, the arithmetic dtype or float32 for ``MethodSpec.float32_result``)."""
        targets = self._plan(recipe)
        out_dtype = self._out_dtype(recipe) if recipe.out_dtype is not None else None
        spec = METHODS[recipe.method]
        outputs = [(t, torch.empty(self._numel(t.info.name), dtype=self._result_dtype(spec, t.info.name),
                                   device=self._device)) for t in targets]
        with torch.no_grad():
            self._run(recipe, outputs)
        return {target.out_name: self._returned(spec, target, out, out_dtype, device) for target, out in outputs}

    def output_specs(self, recipe: Recipe) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """``(name, shape, dtype)`` of each tensor ``materialize`` / ``iter_materialize`` return,
        in their order, without merging: what a streamed save writes its headers from."""
        targets = self._plan(recipe)
        out_dtype = self._out_dtype(recipe) if recipe.out_dtype is not None else None
        spec = METHODS[recipe.method]
        return [(t.out_name, self._shapes[t.info.name], self._returned_dtype(spec, t.info.name, out_dtype))
                for t in targets]

    def iter_materialize(self, recipe: Recipe, *, device: str | torch.device = "cpu"
                         ) -> Iterator[tuple[str, torch.Tensor]]:
        """``materialize``'s tensors one chunk at a time: the same names, dtypes and values, in
        layout order, each valid only until the iterator is advanced past its chunk (write it
        out at once). Lean / stream on the CPU: the chunk's results live in memory reused by the
        next chunk, so one chunk's outputs are all that is alive of the merge."""
        targets = self._plan(recipe)  # validated before the first tensor
        out_dtype = self._out_dtype(recipe) if recipe.out_dtype is not None else None
        spec = METHODS[recipe.method]
        dtypes = {t.info.name: self._result_dtype(spec, t.info.name) for t in targets}
        width = max((dtypes[n].itemsize for n in dtypes if self._floating[n]), default=1)  # others: own memory
        reuse = self._lean and self._device.type == "cpu"
        slack = Arena.ALIGN * len(self._names)
        arena = Arena((self._largest * width + slack) if reuse else 0, torch.uint8, self._device)
        groups = list(consecutive_groups(targets, lambda t: self._numel(t.info.name), self._largest))

        def allocated() -> Iterator[list[tuple[_Target, torch.Tensor]]]:
            for group in groups:
                arena.reset()  # the previous chunk's tensors: the caller is done with them
                yield [(t, arena.take(self._numel(t.info.name) * dtypes[t.info.name].itemsize)
                        .view(dtypes[t.info.name])) for t in group]

        if self._lean:
            merged = self._run_lean(recipe, allocated(), [[t.info.name for t in g] for g in groups])
        else:
            merged = (self._run_resident(recipe, chunk) for chunk in allocated())
        for chunk in merged:
            for target, out in chunk:
                yield target.out_name, self._returned(spec, target, out, out_dtype, device)

    def _returned_dtype(self, spec: MethodSpec, name: str, out_dtype: torch.dtype | None) -> torch.dtype:
        """The dtype a merged tensor is returned in: ``out_dtype`` for a floating one, else as its
        method returns it (``_result_dtype``)."""
        return out_dtype if self._floating[name] and out_dtype is not None else self._result_dtype(spec, name)

    def _returned(self, spec: MethodSpec, target: _Target, out: torch.Tensor, out_dtype: torch.dtype | None,
                  device: str | torch.device) -> torch.Tensor:
        """A merged output as ``materialize`` / ``iter_materialize`` return it: shaped, in
        ``_returned_dtype``, on ``device`` (no copy where neither changes)."""
        name = target.info.name
        return out.view(self._shapes[name]).to(dtype=self._returned_dtype(spec, name, out_dtype), device=device)

    def _run_resident(self, recipe: Recipe, chunk: list[tuple[_Target, torch.Tensor]]
                      ) -> list[tuple[_Target, torch.Tensor]]:
        with torch.no_grad():
            self._run_chunk(recipe, chunk, [target.info.name for target, _ in chunk])
        return chunk

    def close(self) -> None:
        """Stop the worker threads (the engine stays usable, single-threaded; stream reads
        start their reader threads again)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        if self._reader is not None:
            self._reader.shutdown()
            self._reader = None

    # -- loading --------------------------------------------------------------------

    def _load(self) -> None:
        anchor = self._anchor
        has_base = self._base_ckpt is not None
        if self._stream:
            self._load_stream()
            return
        if self._lean:
            self._load_lean()
            return
        for info in self._layout.tensors:
            name = info.name
            if not self._floating[name]:
                self._fixed[name] = anchor.read(name, device=self._device).reshape(-1)
                continue
            base = None
            if has_base:
                base = self._read(anchor, name).clone()  # own memory, not the file's pages
                self._check_finite(anchor, name, base, base)
            deltas = []
            for source in self._sources:
                raw = self._read(source, name)
                delta = torch.sub(raw, base) if base is not None else raw.clone()
                self._check_finite(source, name, delta, raw)
                deltas.append(delta)
            if base is not None:
                self._base[name] = base
            self._deltas[name] = deltas

    def _load_lean(self) -> None:
        """Checkpoint by checkpoint, each closed once read: at most one file's mapped pages at a time."""
        for name in self._shapes:
            if not self._floating[name]:
                self._fixed[name] = self._anchor.read(name, device=self._device).reshape(-1)
        models = ([self._anchor] if self._base_ckpt is not None else []) + list(self._sources)
        for index, checkpoint in enumerate(models):
            for name in self._names:
                base = self._held[name][0] if index > 0 and self._base_ckpt is not None else None
                self._held.setdefault(name, []).append(self._hold(checkpoint, name, base))
            checkpoint.release()
        self._build_sketches()

    def _load_stream(self) -> None:
        """Nothing held: every tensor of every checkpoint read once as a chunk would read it
        (``_read_held``, on the pool), checked finite, its sketches built, and dropped; a
        checkpoint read through its memory map (not plain safetensors) is closed after."""
        for name in self._shapes:
            if not self._floating[name]:
                self._fixed[name] = self._anchor.read(name, device=self._device).reshape(-1)

        def check(name: str) -> list[np.ndarray | None]:
            found: list[np.ndarray | None] = []
            base = held_base = None
            for i, checkpoint in enumerate(self._models):
                held = self._read_held(checkpoint, name)
                self._check_finite(checkpoint, name, held, held)
                if i == 0 and self._base_ckpt is not None:
                    base = held.to(self._dtype) if self._sketched(name) else None
                    held_base = held
                elif base is not None and held_base is not None:
                    found.append(self._histogram(held, base))
                    self._note_same(name, i - 1, found[-1], held, held_base)
            return found

        results = self._pool.map(check, self._names) if self._pool is not None else map(check, self._names)
        self._keep_sketches(self._names, results)
        self._make_zeros()
        for checkpoint in self._models:
            if not checkpoint.readable_by_offset:
                checkpoint.release()

    def _sketched(self, name: str) -> bool:
        """Whether the lean plan keeps ``|delta|`` histograms of ``name`` (``_build_sketches``)."""
        return (self._device.type == "cpu" and self._dtype == torch.float32 and self._base_ckpt is not None
                and self._numel(name) >= magnitude_sketch.MIN_NUMEL)

    def _histogram(self, held: torch.Tensor, base: torch.Tensor) -> np.ndarray | None:
        """One source's ``|delta|`` histogram from its held tensor and the base in the arithmetic dtype."""
        delta = torch.sub(held, base) if held.dtype == self._dtype else held.to(self._dtype).sub_(base)
        return magnitude_sketch.histogram(delta.numpy())

    def _keep_sketches(self, names: Sequence[str], results: Iterable[list[np.ndarray | None]]) -> None:
        for name, per_source in zip(names, results, strict=True):
            for model, counts in enumerate(per_source):
                if counts is not None:
                    self._sketch[(name, model)] = counts

    def _build_sketches(self) -> None:
        """Lean, on the CPU in float32: each large tensor's ``|delta|`` histogram per source
        (``magnitude_sketch``), so a trial's magnitude cut is selected from one bucket. The
        deltas are formed once here, tensor by tensor, on the pool."""
        names = [n for n in self._names if self._sketched(n)]

        def build(name: str) -> list[np.ndarray | None]:
            base = self._held[name][0].to(self._dtype)
            found = [self._histogram(held, base) for held in self._held[name][1:]]
            for model, (counts, held) in enumerate(zip(found, self._held[name][1:], strict=True)):
                self._note_same(name, model, counts, held, self._held[name][0])
            return found

        results = self._pool.map(build, names) if self._pool is not None else map(build, names)
        self._keep_sketches(names, results)
        self._make_zeros()

    def _note_same(self, name: str, model: int, counts: np.ndarray | None, held: torch.Tensor,
                   base: torch.Tensor) -> None:
        """Record a source tensor that is the base's bit for bit (a fine-tune that left it alone:
        LoRA-merged models leave most tensors so): every ``|delta|`` in the zero bucket, then the
        bits compared (a -0.0 against a +0.0 would give a -0.0 delta, not the zero buffer's +0.0)."""
        if counts is None or int(counts[0]) != held.numel() or held.dtype != base.dtype:
            return
        if torch.equal(held.view(torch.uint8), base.view(torch.uint8)):  # any width: float8 is held as stored
            self._same.add((name, model))

    def _zero_delta(self, numel: int) -> torch.Tensor:
        """+0.0 x ``numel`` in the arithmetic dtype, from one buffer of the largest tensor's size that
        nothing writes: calloc'd pages never touched map the kernel's zero page, so reading it costs
        neither memory traffic nor resident memory. Its readers only read (a tied cut's in-place
        replay needs a delta no other item reads, and a zero cut is never tied)."""
        assert self._zeros is not None, "made once the loading found a tensor left as the base"
        return self._zeros[:numel]

    def _make_zeros(self) -> None:
        if self._same:
            self._zeros = torch.from_numpy(np.zeros(self._largest, dtype=np.float32))

    def _read(self, checkpoint: Checkpoint, name: str) -> torch.Tensor:
        return checkpoint.read(name, device=self._device, dtype=self._dtype).reshape(-1)

    def _held_dtype(self, checkpoint: Checkpoint, name: str) -> torch.dtype:
        """The dtype the lean plan holds ``name`` of ``checkpoint`` in: as stored when that is
        narrower than the arithmetic dtype (a later cast rounds as ``read``'s does), else the
        arithmetic dtype. A LoRA source or vocabulary view computes its tensor at read time:
        arithmetic dtype."""
        stored = checkpoint.dtypes[name]
        narrower = stored.itemsize < self._dtype.itemsize and type(checkpoint) is Checkpoint
        return stored if narrower else self._dtype

    def _hold(self, checkpoint: Checkpoint, name: str, base: torch.Tensor | None = None) -> torch.Tensor:
        """The lean plan's copy of one tensor (flat, ``_held_dtype``), in memory of its own; where it
        is ``base`` (the held base tensor) bit for bit, that tensor itself: a fine-tune leaves many
        tensors as the base (a LoRA-merged one most of them), and nothing writes to held tensors."""
        dtype = self._held_dtype(checkpoint, name)
        read = checkpoint.read(name, device=self._device, dtype=dtype).reshape(-1)
        if (base is not None and base.dtype == read.dtype and base.numel() == read.numel()
                and torch.equal(read.view(torch.uint8), base.view(torch.uint8))):
            return base
        held = read.clone()
        self._check_finite(checkpoint, name, held, held)
        return held

    def _read_held(self, checkpoint: Checkpoint, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Stream: ``name`` of ``checkpoint`` as the lean plan holds it (flat, ``_held_dtype``), read
        into ``out`` (a fresh tensor if None). A plain safetensors checkpoint is read by plain file
        reads at the tensor's offsets (``Checkpoint.read_into``: no mapped pages); a stored dtype
        wider than the held one is read as stored and cast once, as ``read`` casts. Any other
        tensor (pickle, LoRA source, a vocabulary view's re-indexed rows: ``offset_source`` None)
        is read by ``Checkpoint.read``."""
        dtype = self._held_dtype(checkpoint, name)
        if out is None:
            out = torch.empty(self._numel(name), dtype=dtype, device=self._device)
        source = checkpoint.offset_source(name)  # a vocabulary view's tensors off the vocabulary too
        if source is None:
            return out.copy_(checkpoint.read(name, device=self._device, dtype=dtype).reshape(-1))
        stored = source.dtypes[name]
        if stored == dtype and out.device.type == "cpu":
            return source.read_into(name, out)
        return out.copy_(source.read_into(name, torch.empty(out.numel(), dtype=stored)))

    @staticmethod
    def _check_finite(checkpoint: Checkpoint, name: str, derived: torch.Tensor,
                      raw: torch.Tensor) -> None:
        """A NaN or inf in ``raw`` makes the sum of ``derived`` (raw or raw - base) non-finite;
        only then is ``raw`` checked entry by entry (a finite sum can also overflow)."""
        if bool(torch.isfinite(derived.sum())) or bool(torch.isfinite(raw).all()):
            return
        raise MergeError(f"{checkpoint.path}: tensor {name!r} holds NaN or inf")

    # -- recipe -> targets ------------------------------------------------------------

    def _model_of(self, path: str, what: str) -> int:
        index = self._index_by_text.get(path)
        if index is None:
            index = self._index.get(Path(path).resolve())
            if index is not None:  # resolving costs file system calls: once per spelling
                self._index_by_text[path] = index
        if index is None:
            known = [str(c.path) for c in ([self._base_ckpt] if self._base_ckpt else [])
                     + list(self._sources)]
            raise RecipeError(f"{what} {path!r} is not one of the engine's checkpoints "
                              f"({', '.join(known)})")
        return index

    def _out_dtype(self, recipe: Recipe) -> torch.dtype:
        if recipe.out_dtype is None:
            return self._dtype
        dtype = getattr(torch, recipe.out_dtype, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise RecipeError(f"recipe out_dtype {recipe.out_dtype!r} is not a torch float dtype")
        return dtype

    def _plan(self, recipe: Recipe) -> list[_Target]:
        validate_recipe(recipe)
        if recipe.group_bases:  # one base per engine: merge Recipe.against each (search merge does)
            raise RecipeError(f"recipe merges its layer groups against {len(set(recipe.group_bases))} "
                              "bases; an engine merges against one (Recipe.against)")
        if recipe.dtype != _dtype_name(self._dtype):
            raise RecipeError(f"recipe dtype {recipe.dtype!r} differs from the engine's arithmetic "
                              f"dtype {_dtype_name(self._dtype)!r}; build the engine with that dtype")
        self._out_dtype(recipe)
        if recipe.base is not None and self._model_of(recipe.base, "base") != BASE:
            raise RecipeError(f"recipe base {recipe.base!r} is not the engine's base")
        for path in recipe.sources:
            self._model_of(path, "source")
        if recipe.method == "passthrough":
            return self._passthrough_targets(recipe)
        if recipe.n_layers != self._layout.n_layers:
            raise RecipeError(f"recipe groups cover {recipe.n_layers} layers, the checkpoints have "
                              f"{self._layout.n_layers}")
        return [_Target(info.name, info) for info in self._layout.tensors]

    def _passthrough_targets(self, recipe: Recipe) -> list[_Target]:
        layout = self._layout
        if not recipe.layer_slices:
            if recipe.n_layers != layout.n_layers:
                raise RecipeError(f"recipe groups cover {recipe.n_layers} layers, the checkpoints "
                                  f"have {layout.n_layers}")
            model = self._model_of(recipe.sources[0], "source")
            return [_Target(info.name, info, model, self._scale(recipe, info)) for info in
                    layout.tensors]
        pieces = []
        for piece in recipe.layer_slices:
            if piece.end > layout.n_layers:
                raise RecipeError(f"layer slice [{piece.start}, {piece.end}) of {piece.model} is "
                                  f"outside its {layout.n_layers} layers")
            pieces.append((piece, self._model_of(piece.model, "layer slice model")))
        targets: list[_Target] = []
        first, last = pieces[0], pieces[-1]
        for info in layout.tensors:
            if info.layer is None:  # mergekit: embeddings from the first slice, head from the last
                piece, model = last if info.role == "head" else first
                targets.append(_Target(info.name, info, model, piece.scale))
        out_layer = 0
        for piece, model in pieces:
            for layer in range(piece.start, piece.end):
                for info in layout.layer_tensors(layer):
                    targets.append(_Target(layout.rename_layer(info.name, out_layer), info, model,
                                           piece.scale))
                out_layer += 1
        return targets

    def _scale(self, recipe: Recipe, info: TensorInfo) -> float:
        if "scale" not in recipe.tensor_params:
            return 1.0
        group, role = self._cell(recipe, info)
        return recipe.tensor_values("scale", group, role)[0]

    @staticmethod
    def _model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
        tensors.update(dict(model.named_buffers(remove_duplicate=False)))
        return tensors

    @staticmethod
    def _dedupe_tied(targets: Iterable[_Target], live: dict[str, torch.Tensor]) -> list[_Target]:
        """Where two outputs share one storage (tied head), keep the embedding's."""
        by_storage: dict[int, _Target] = {}
        order: list[_Target] = []
        for target in targets:
            param = live.get(target.out_name)
            if param is None:
                order.append(target)
                continue
            key = param.data_ptr()
            seen = by_storage.get(key)
            if seen is None:
                by_storage[key] = target
                order.append(target)
            elif target.info.role == "embed" and seen.info.role != "embed":
                order[order.index(seen)] = target
                by_storage[key] = target
        return order

    # -- parameter lookup -------------------------------------------------------------

    @staticmethod
    def _cell(recipe: Recipe, info: TensorInfo) -> tuple[int, str]:
        if info.layer is not None:
            return recipe.group_of_layer(info.layer), info.role
        if info.role == "head":
            return len(recipe.groups) - 1, "head"
        return 0, info.role

    @staticmethod
    def _tensor_values(recipe: Recipe, spec: MethodSpec, name: str, cell: tuple[int, str]
                       ) -> tuple[float, ...]:
        if name in recipe.tensor_params:
            return recipe.tensor_values(name, *cell)
        default = spec.tensor_default(name)
        if default is None:
            raise RecipeError(f"method {spec.name!r} needs per-source parameter {name!r}")
        return (float(default),) * len(recipe.sources)

    @staticmethod
    def _global(recipe: Recipe, spec: MethodSpec, name: str, cell: tuple[int, str]
                ) -> float | bool:
        if name in recipe.global_params:
            return recipe.global_value(name, *cell)
        default = spec.global_default(name)
        if default is None:
            raise RecipeError(f"method {spec.name!r} needs global parameter {name!r}")
        return default

    # -- computing ----------------------------------------------------------------------

    def _compute_dtype(self, name: str) -> torch.dtype:
        """The arithmetic dtype; a non-floating tensor (a mask buffer) keeps its own."""
        return self._dtype if self._floating[name] else self._fixed[name].dtype

    def _result_dtype(self, spec: MethodSpec, name: str) -> torch.dtype:
        """What ``materialize`` returns: the arithmetic dtype, or float32 where mergekit's kernel
        promotes float16 / bfloat16 inputs and writes that (``MethodSpec.float32_result``)."""
        dtype = self._compute_dtype(name)
        if spec.float32_result and dtype in HALF:
            return torch.float32
        return dtype

    def _numel(self, name: str) -> int:
        numel = 1
        for size in self._shapes[name]:
            numel *= size
        return numel

    def _exact_source(self, name: str, model: int) -> torch.Tensor:
        """``model``'s own tensor (flat, arithmetic dtype): the base, a source without a base
        (its delta is itself), or on first use every tensor of that source read again."""
        if model == BASE:
            base = self._base_of(name)
            assert base is not None
            return base
        if self._base_ckpt is None:
            return self._delta(name, model)
        if self._lean:
            return self._derived("source", name, model,
                                 lambda: self._held[name][model + 1].to(self._dtype))
        found = self._exact.get((name, model))
        if found is None:
            checkpoint = self._sources[model]
            for n in self._deltas:
                if (n, model) not in self._exact:
                    self._exact[(n, model)] = self._read(checkpoint, n).clone()  # own memory
            found = self._exact[(name, model)]
        return found

    # -- the task vectors: resident, or formed per chunk (lean) ---------------------------

    def _base_of(self, name: str) -> torch.Tensor | None:
        """The base tensor (flat, arithmetic dtype); None without a base checkpoint."""
        if not self._lean or self._base_ckpt is None:
            return self._base.get(name)
        held = self._held[name][0]
        if held.dtype == self._dtype:
            return held
        return self._derived("base", name, BASE, lambda: self._arena.take(held.numel()).copy_(held))

    def _narrow_base(self, name: str) -> torch.Tensor | None:
        """Lean on the CPU, float32 arithmetic, bfloat16 base and native code: the base as held,
        which the fused pass and ``bf16_delta`` widen exactly (no float32 copy per chunk)."""
        if not self._lean or self._base_ckpt is None or self._lib is None:
            return None
        held = self._held[name][0]
        return held if held.dtype == torch.bfloat16 and self._dtype == torch.float32 else None

    def _fused_base(self, name: str) -> torch.Tensor | None:
        """``FusedJob.base``: the narrow held base where there is one, else ``_base_of``."""
        narrow = self._narrow_base(name)
        return narrow if narrow is not None else self._base_of(name)

    def _delta(self, name: str, model: int) -> torch.Tensor:
        """Source ``model``'s task vector (flat, arithmetic dtype): its tensor without a base."""
        if not self._lean:
            return self._deltas[name][model]
        if (name, model) in self._same:
            return self._zero_delta(self._numel(name))
        if self._base_ckpt is None:
            return self._derived("delta", name, model, lambda: self._held[name][model].to(self._dtype))
        held = self._held[name][model + 1]
        narrow = self._narrow_base(name)

        def compute() -> torch.Tensor:
            out = self._arena.take(held.numel())
            if narrow is not None and held.dtype == torch.bfloat16:
                assert self._lib is not None
                return bf16_delta(self._lib, held, narrow, out)  # the cast and subtraction in one pass
            base = self._base_of(name)
            if held.dtype == self._dtype:
                return torch.sub(held, base, out=out)
            return out.copy_(held).sub_(base)  # the cast, then the subtraction, in place

        return self._derived("delta", name, model, compute)

    def _task_vector(self, name: str, model: int) -> Delta:
        """Source ``model``'s task vector for a fused job alone: lean on the CPU with native code, for a
        sketched tensor whose source and base are held alike (float32, or bfloat16 under float32
        arithmetic), one the fused pass forms itself (``PairDelta``: no pass writes it and reads it
        back, and no chunk memory holds it; its magnitude cut is then gathered without forming it
        either, and a tied cut's dropped entries are masked by a bitmap). Else ``_delta``."""
        inputs = self._pair_inputs(name, model)
        if inputs is None:
            return self._delta(name, model)
        self._pairs.add((name, model))
        return PairDelta(*inputs)

    def _pair_inputs(self, name: str, model: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(held source, ``FusedJob.base``) where ``_task_vector`` hands out a ``PairDelta``, else None."""
        if (not self._lean or self._lib is None or not self._sketched(name) or (name, model) in self._same
                or ("delta", name, model) in self._chunk):
            return None
        held, base = self._held[name][model + 1], self._fused_base(name)
        if base is None or held.dtype != base.dtype or held.dtype not in (torch.float32, torch.bfloat16):
            return None
        return held, base

    def _prefetch_sorted(self, name: str, wanted: Mapping[int, Sequence[int]]) -> None:
        """Lean: the sketch buckets that ``wanted``'s positions lie in, for every model whose task
        vector is not formed, gathered in one pass over the base and those sources
        (``magnitude_sketch.pair_gather_many``: the base read once, not once per source)."""
        orders: list[tuple[magnitude_sketch.SketchedOrder, tuple[int, int], torch.Tensor]] = []
        base: torch.Tensor | None = None
        for model, positions in wanted.items():
            inputs = self._pair_inputs(name, model)
            if inputs is None:
                continue
            order = self._sorted(name, model)
            missing = order.missing(positions) if isinstance(order, magnitude_sketch.SketchedOrder) else None
            if missing is not None:
                orders.append((order, missing, inputs[0]))
                base = inputs[1]
        if base is None:
            return
        bits = {torch.bfloat16: torch.int16}.get(base.dtype, base.dtype)  # numpy has no bf16
        for start in range(0, len(orders), magnitude_sketch.MAX_GATHER):
            batch = orders[start:start + magnitude_sketch.MAX_GATHER]
            found = magnitude_sketch.pair_gather_many(
                [held.view(bits).numpy() for _, _, held in batch], base.view(bits).numpy(),
                [buckets for _, buckets, _ in batch], [order.count(*buckets) for order, buckets, _ in batch])
            for (order, buckets, _), values in zip(batch, found, strict=True):
                order.supply(*buckets, values)

    def _derived(self, kind: str, name: str, model: int, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A tensor the lean plan forms once per chunk (kept until the chunk is merged)."""
        key = (kind, name, model)
        found = self._chunk.get(key)
        if found is None:
            found = self._chunk[key] = compute()
        return found

    def _chunks(self, outputs: Sequence[tuple[_Target, torch.Tensor]]
                ) -> Iterable[Sequence[tuple[_Target, torch.Tensor]]]:
        """Consecutive outputs of at most the largest tensor's entries together (lean)."""
        return consecutive_groups(outputs, lambda item: item[1].numel(), self._largest)

    def _drop_chunk(self) -> None:
        """Forget one lean chunk's tensors: task vectors, keys, tie positions, large statistics."""
        self._chunk.clear()
        self._pairs.clear()
        self._arena.reset()
        self._key_arena.reset()
        self._order.clear()
        self._rank.clear()
        self._random.clear()
        self._della_position.clear()
        self._l1.clear()  # keyed by storage address, which the next chunk's tensors reuse
        for key in [k for k, v in self._statistics.items() if _tensor_sized(v)]:
            del self._statistics[key]
        if self._stream:
            self._held = {}

    def _read_chunk(self, names: Sequence[str], arena: Arena) -> list[tuple[str, Future[torch.Tensor] | None]]:
        """Stream: start reading the chunk's tensors of every checkpoint into ``arena`` (on the
        reader threads); ``_held``'s entries, in order, once done. A source tensor found at load to be
        the base's bit for bit (``_same``) is not read: None, the base's tensor stands for it."""
        if self._reader is None:
            self._reader = ThreadPoolExecutor(2, thread_name_prefix="stream-read")
        reader = self._reader

        def read(name: str, i: int) -> torch.Tensor:
            checkpoint = self._models[i]
            dtype = self._held_dtype(checkpoint, name)
            buffer = arena.take(self._numel(name) * dtype.itemsize).view(dtype)
            return self._read_held(checkpoint, name, buffer)

        arena.reset()  # its last chunk was merged and dropped before this one was asked for
        based = self._base_ckpt is not None
        return [(name, None if based and i > 0 and (name, i - 1) in self._same else reader.submit(read, name, i))
                for name in dict.fromkeys(names) if self._floating[name] for i in range(len(self._models))]

    def _prefetch(self, groups: Sequence[Sequence[str]]) -> Iterator[dict[str, list[torch.Tensor]]]:
        """Stream: each group's held tensors, in turn; the next group's are read (into the other
        arena) while the caller merges this one. Closing it waits for the reads in flight, so
        that none writes into a buffer once the merge has moved on."""
        pending = self._read_chunk(groups[0], self._read_arenas[0]) if groups else []
        try:
            for i in range(len(groups)):
                held: dict[str, list[torch.Tensor]] = {}
                for name, future in pending:  # None: a source tensor left as the base, not read
                    held.setdefault(name, []).append(held[name][0] if future is None else future.result())
                pending = (self._read_chunk(groups[i + 1], self._read_arenas[(i + 1) % 2])
                           if i + 1 < len(groups) else [])
                yield held
        finally:
            wait([future for _, future in pending if future is not None])

    def _run(self, recipe: Recipe, outputs: Sequence[tuple[_Target, torch.Tensor]]) -> None:
        if not self._lean:
            self._run_chunk(recipe, outputs, self._names)
            return
        chunks = list(self._chunks(outputs))
        for _ in self._run_lean(recipe, chunks, [[t.info.name for t, _ in chunk] for chunk in chunks]):
            pass

    def _run_lean(self, recipe: Recipe, chunks: Iterable[Sequence[tuple[_Target, torch.Tensor]]],
                  groups: Sequence[Sequence[str]]) -> Iterator[Sequence[tuple[_Target, torch.Tensor]]]:
        """Merge the lean chunks (``groups``: their tensor names, known before the chunks' outputs
        exist) one by one, yielding each once merged; its tensors are dropped before the next.
        Stream: each chunk's inputs are read while the one before merges (``_prefetch``)."""
        reads = self._prefetch(groups) if self._stream else None
        try:
            for chunk in chunks:
                try:
                    if reads is not None:
                        self._held = next(reads)
                    with torch.no_grad():
                        self._run_chunk(recipe, chunk, [target.info.name for target, _ in chunk])
                finally:
                    self._drop_chunk()
                yield chunk
        finally:
            if reads is not None:
                reads.close()

    def _run_chunk(self, recipe: Recipe, outputs: Sequence[tuple[_Target, torch.Tensor]],
                   names: Sequence[str]) -> None:
        spec = METHODS[recipe.method]
        if spec.random:
            self._prefetch_random_keys(recipe, [n for n in names if self._floating[n]])
        def plan(item: tuple[_Target, torch.Tensor]) -> _Work:
            return self._work(recipe, spec, item[0], item[1])

        # lean: planning forms the task vectors and selects the thresholds (numpy and torch
        # release the GIL), so the chunk's tensors are planned side by side on the pool
        parallel = self._lean and self._pool is not None and len(outputs) > 1
        works = list(self._pool.map(plan, outputs) if parallel else map(plan, outputs))  # type: ignore[union-attr]
        self._fill_ranks(works)
        self._apply_rescale(works)
        native = [w for w in works if w.job is not None and self._lib is not None
                  and native_supports(w.job)]
        native_ids = {id(w) for w in native}
        if native:
            assert self._lib is not None
            counts = run_native_many(self._lib, [w.job for w in native if w.job is not None],
                                     self._pool)
            for work, count in zip(native, counts, strict=True):
                if count:
                    self._non_finite(recipe, work.target)
        for work in works:
            if id(work) in native_ids:
                continue
            if work.job is not None:
                run_eager(work.job)
            elif work.eager is not None:
                work.out.copy_(work.eager())
            if self._floating[work.target.info.name] and not all_finite(work.out):
                self._non_finite(recipe, work.target)

    @staticmethod
    def _non_finite(recipe: Recipe, target: _Target) -> None:
        raise NonFiniteMergeError(f"merged tensor {target.out_name!r} holds NaN or inf (method "
                                  f"{recipe.method!r}); the model is partly merged: re-merge "
                                  "before using it")

    def _work(self, recipe: Recipe, spec: MethodSpec, target: _Target, out: torch.Tensor) -> _Work:
        name = target.info.name
        if not self._floating[name]:
            fixed = self._fixed[name]
            return _Work(target, out, Plan(eager=lambda: fixed))
        cell = (0, "embed") if spec.uses_layer_slices else self._cell(recipe, target.info)
        return _Work(target, out, _planner(spec)(_Context(self, recipe, spec, target, cell, out)))

    def _apply_rescale(self, works: Sequence[_Work]) -> None:
        """Fill in the L1 rescale factors of every job at once (one pass, on the pool)."""
        items: list[tuple[_Work, int]] = [(w, i) for w in works if w.rescale for i in w.rescale]
        if not items:
            return
        jobs = [(work.job, i) for work, i in items if work.job is not None]
        after = masked_l1_many(self._lib, jobs, self._pool)
        for (work, i), kept in zip(items, after, strict=True):
            assert work.job is not None
            before = self._l1_norm(work.target.info.name, work.job.deltas[i])
            before32 = torch.tensor(before, dtype=torch.float32)
            after32 = torch.tensor(kept, dtype=torch.float32)
            if before32 < sparsify.RESCALE_EPS or after32 < sparsify.RESCALE_EPS:
                continue
            scales = list(work.job.scales)
            scales[i] = float(before32 / after32)
            work.job.scales = scales

    def _l1_norm(self, name: str, delta: torch.Tensor) -> float:
        key = (name, delta.data_ptr())
        value = self._l1.get(key)
        if value is None:
            value = float(delta.abs().sum())
            self._l1[key] = value
        return value

    # -- cached statistics --------------------------------------------------------------

    def _sorted(self, name: str, model: int) -> torch.Tensor:
        """Ascending ``|delta|``; on first use computed for every tensor of ``model`` at once.
        Lean: its values looked up by selection instead, within the sketch's bucket where the
        tensor has one (``magnitude_sketch``), else in the whole tensor (``_OrderStatistics``);
        kept for the chunk (a tied cut's value is read from it again)."""
        if self._lean:
            order = self._order.get((name, model))
            if order is None:
                counts = self._sketch.get((name, model))
                if counts is None:
                    order = _OrderStatistics(self._delta(name, model))
                else:
                    order = magnitude_sketch.SketchedOrder(
                        counts, lambda bucket, count: self._gather(name, model, bucket, count))
                self._order[(name, model)] = order
            return order  # type: ignore[return-value]
        found = self._ascending.get((name, model))
        if found is None:
            names = [n for n in self._names if (n, model) not in self._ascending]

            def compute(n: str) -> torch.Tensor:
                return sparsify.sorted_magnitudes(self._delta(n, model))

            results = self._pool.map(compute, names) if self._pool is not None else map(compute, names)
            for n, values in zip(names, results, strict=True):
                self._ascending[(n, model)] = values
            found = self._ascending[(name, model)]
        return found

    def _gather(self, name: str, model: int, bucket: int, count: int) -> np.ndarray:
        """Lean, sketched: one bucket's magnitudes of the task vector; where the chunk has not formed
        it yet, formed in the same pass from the held float32 or bf16 tensors
        (``magnitude_sketch.delta_gather``: the values ``_delta`` forms, not read again to gather)."""
        gathered: list[np.ndarray] = []
        if ("delta", name, model) not in self._chunk and self._base_ckpt is not None:
            held, narrow = self._held[name][model + 1], self._narrow_base(name)
            base = narrow if narrow is not None else self._held[name][0]
            bits = {torch.bfloat16: torch.int16}.get(held.dtype, held.dtype)  # numpy has no bf16
            if (name, model) in self._pairs:  # the fused pass forms it: gathered without forming it
                return magnitude_sketch.pair_gather(held.view(bits).numpy(), base.view(bits).numpy(), bucket, count)
            if held.dtype == base.dtype and (held.dtype == self._dtype or narrow is not None):

                def compute() -> torch.Tensor:
                    out = self._arena.take(held.numel())
                    gathered.append(magnitude_sketch.delta_gather(
                        held.view(bits).numpy(), base.view(bits).numpy(), out.numpy(), bucket, count))
                    return out

                self._derived("delta", name, model, compute)
        if gathered:
            return gathered[0]
        return magnitude_sketch.gather_bucket(self._delta(name, model).numpy(), bucket, count)

    def _fill_ranks(self, works: Sequence[_Work]) -> None:
        """Compute (on the pool) and plug in mergekit's sort positions where a cut was tied.

        They are kept from then on for any density, and replace the delta's sorted magnitudes
        (dropped; recomputed if the other kind of cut needs them again).
        """
        if self._lean and self._fill_windows(works):
            return
        wanted = {key for w in works if w.ranks for _, key in w.ranks}
        missing = sorted(key for key in wanted if key not in self._rank)

        def compute(key: tuple[str, str, int]) -> torch.Tensor:
            kind, name, model = key
            ranks = sparsify.descending_ranks if kind == "descending" else sparsify.ascending_ranks
            return ranks(self._delta(name, model))

        results = self._pool.map(compute, missing) if self._pool is not None else map(compute, missing)
        for key, ranks in zip(missing, results, strict=True):
            self._rank[key] = ranks
            _, name, model = key
            self._ascending.pop((name, model), None)
        for work in works:
            if work.job is None or not work.ranks:
                continue
            keys = list(work.job.keys)
            for item, key in work.ranks:
                keys[item] = self._rank[key]
            work.job.keys = keys

    def _fill_windows(self, works: Sequence[_Work]) -> bool:
        """Lean: plug in keys that keep exactly mergekit's entries of each tied item's window
        (``tie_order``: std::sort replayed only where a cut lies; on the pool). False where the
        replay cannot be used: then full sort positions for the items still without keys.

        A one-cut item whose task vector is not formed (``PairDelta``) gets no keys: the replay
        reads the source and the base and marks the tied run's dropped entries in a bitmap
        (``tie_order.tied_cut_drops``, ``FusedJob.drops``: n / 8 bytes), and the item gets the
        magnitude band that drops the rest. A formed one whose delta no other item reads and that
        the native kernel merges gets no keys either: the replay zeroes the tied run's dropped entries in the delta itself
        (``tie_order.tied_cut_apply``; the kernel's mask gives them +0.0 alike) and the item gets
        the magnitude band that drops the rest (``tie_order.applied_band``), which saves the
        chunk 4 bytes per entry and the fused pass a read; a rescaled item's L1 norm before the
        cut is taken first (``_apply_rescale`` reads it from ``_l1``)."""
        uses: dict[int, int] = {}
        for work in works:
            if work.job is not None:
                for delta in work.job.deltas:
                    if not isinstance(delta, PairDelta):
                        uses[delta.data_ptr()] = uses.get(delta.data_ptr(), 0) + 1
        # (rank key, window, whether the item's delta is a PairDelta) -> (whether it may be applied in
        # place, whether it is rescaled, the PairDelta)
        Wanted = tuple[RankKey, tuple[int, int], bool]
        wanted: dict[Wanted, tuple[bool, bool, PairDelta | None]] = {}
        wanted_of: dict[tuple[int, int], Wanted] = {}  # (id(work), item) -> its key in ``wanted``
        for work in works:
            if work.job is not None and work.ranks:
                native = self._lib is not None and native_supports(work.job)
                for item, key in work.ranks:
                    delta = work.job.deltas[item]
                    pair = delta if isinstance(delta, PairDelta) else None
                    sole = native and pair is None and uses.get(delta.data_ptr(), 0) == 1  # type: ignore[union-attr]
                    wanted_of[(id(work), item)] = (key, work.job.windows[item], pair is not None)
                    wanted[wanted_of[(id(work), item)]] = (sole, item in (work.rescale or ()), pair)

        def compute(wanted_key: Wanted) -> torch.Tensor | float | tuple[float, torch.Tensor] | None:
            (kind, name, model), (lo, hi), _ = wanted_key
            sole, rescaled, pair = wanted[wanted_key]
            order = self._order.get((name, model))
            numel = self._numel(name)
            if kind == "descending" and lo == 0 and order is not None:
                # one cut, inside one run of equal magnitudes: the replay that carries only
                # that run's indices (the cut's value was selected while planning)
                tied = order[numel - hi]  # type: ignore[index]
                scratch = self._replay_scratch.take()
                try:
                    if pair is not None:  # not formed: the run's dropped entries as a bitmap
                        drop = tie_order.tied_cut_drops(pair.source, pair.base, hi, tied, descending=True,
                                                        scratch=scratch)
                        if drop is not None:
                            return tied, drop
                    delta = self._delta(name, model)
                    if sole:
                        if rescaled:
                            self._l1_norm(name, delta)  # before the cut zeroes entries
                        if tie_order.tied_cut_apply(delta, hi, tied, descending=True, scratch=scratch):
                            return tied  # applied: the band from this value drops the rest
                    keys = tie_order.tied_cut_keys(delta, hi, tied, descending=True,
                                                   keys=self._key_arena.take(numel), scratch=scratch)
                finally:
                    self._replay_scratch.give(scratch)
                if keys is not None:
                    return keys
            return tie_order.window_keys(self._delta(name, model), lo, hi, descending=kind == "descending")

        items = list(wanted)
        results = list(self._pool.map(compute, items) if self._pool is not None else map(compute, items))
        found = dict(zip(items, results, strict=True))
        for work in works:
            if work.job is None or not work.ranks:
                continue
            keys = list(work.job.keys)
            bands = list(work.job.bands) if work.job.bands else [None] * len(keys)
            drops = list(work.job.drops) if work.job.drops else [None] * len(keys)
            for item, _ in work.ranks:
                result = found[wanted_of[(id(work), item)]]
                if isinstance(result, torch.Tensor):
                    keys[item] = result
                elif isinstance(result, float):
                    bands[item] = tie_order.applied_band(result, descending=True)
                elif isinstance(result, tuple):
                    bands[item] = tie_order.applied_band(result[0], descending=True)
                    drops[item] = result[1]
            work.job.keys = keys
            work.job.bands = bands
            work.job.drops = drops
            # what is left for full sort positions: the items the replay could not decide
            work.plan.ranks = [(item, key) for item, key in work.ranks
                               if found[wanted_of[(id(work), item)]] is None]
        return not any(result is None for result in results)

    def _generator(self, seed: int, name: str, position: int) -> torch.Generator:
        return torch.Generator(device=self._device).manual_seed(_stable_seed(seed, name, position))

    def _random_key(self, seed: int, name: str, position: int, model: int) -> torch.Tensor:
        """Uniform keys of ``(seed, tensor, source position)``; only one seed is kept."""
        if self._random_seed != seed:
            self._random.clear()
            self._random_seed = seed
        cache_key = (name, position, model)
        keys = self._random.get(cache_key)
        if keys is None:
            keys = sparsify.random_keys((self._numel(name),), self._generator(seed, name, position))
            self._random[cache_key] = keys
        return keys

    def _prefetch_random_keys(self, recipe: Recipe, names: Sequence[str]) -> None:
        """Draw the keys of ``names`` for every source that some cell sparsifies, on the thread pool."""
        if self._random_seed != recipe.seed:
            self._random.clear()
            self._random_seed = recipe.seed
        table = recipe.tensor_params.get("density")
        if table is None:  # density defaults to 1: nothing is dropped
            return
        positions = [p for p in non_base_sources(recipe)
                     if any(cell[p] < 1 for row in table for cell in row)]
        wanted = [(name, p, self._model_of(recipe.sources[p], "source"))
                  for name in names for p in positions]
        missing = [item for item in wanted if item not in self._random]

        def draw(item: tuple[str, int, int]) -> torch.Tensor:
            name, position, _ = item
            return sparsify.random_keys((self._numel(name),),
                                        self._generator(recipe.seed, name, position))

        results = self._pool.map(draw, missing) if self._pool is not None else map(draw, missing)
        for item, keys in zip(missing, results, strict=True):
            self._random[item] = keys

    def _della(self, seed: int, name: str, position: int, model: int, density: float,
               epsilon: float, rescale: bool) -> torch.Tensor:
        positions = self._della_position.get(name)
        shape = self._shapes[name]
        if positions is None:
            positions = [sparsify.della_row_position(self._delta(name, m).view(shape)).reshape(-1)
                         for m in range(len(self._sources))]
            self._della_position[name] = positions
        keys = self._random_key(seed, name, position, model)
        generator = self._generator(seed, name, position)
        return sparsify.della_magprune(self._delta(name, model), density, epsilon,
                                       generator=generator, rescale=rescale, keys=keys,
                                       row_position=positions[model])

    def __del__(self) -> None:
        for pool in (getattr(self, "_pool", None), getattr(self, "_reader", None)):
            if pool is not None:
                pool.shutdown(wait=False)


def _planner(spec: MethodSpec) -> Callable[[TensorContext], Plan]:
    """The method's ``plan`` function (its module is imported on first use)."""
    found = _PLANNERS.get(spec.planner)
    if found is None:
        found = importlib.import_module(f"merges.methods.{spec.planner}").plan
        _PLANNERS[spec.planner] = found
    return found


_PLANNERS: dict[str, Callable[[TensorContext], Plan]] = {}


def _tensor_sized(value: object) -> bool:
    """A planner statistic the lean plan does not keep across chunks: one holding a tensor
    of more than a few entries (scalars and small per-tensor numbers stay)."""
    if isinstance(value, torch.Tensor):
        return value.numel() > 64
    if isinstance(value, tuple | list):
        return any(_tensor_sized(v) for v in value)
    return False


class _OrderStatistics:
    """``|delta|`` ascending as a magnitude band reads it (``numel()`` and ``[i]``), without a
    sorted copy: a position asked is selected from a float32 copy of ``|delta|`` together with
    its two neighbours (a band's tie check reads them next); sorted and selected values are the
    same numbers. On the CPU numpy's introselect does it (~10x faster than ``torch.kthvalue``)."""

    def __init__(self, delta: torch.Tensor) -> None:
        self._magnitudes = delta.abs().reshape(-1).float()
        self._found: dict[int, float] = {}

    def numel(self) -> int:
        return self._magnitudes.numel()

    def __getitem__(self, index: int) -> float:
        found = self._found.get(index)
        if found is None:
            n = self._magnitudes.numel()
            wanted = [i for i in (index - 1, index, index + 1) if 0 <= i < n]
            if self._magnitudes.device.type == "cpu":
                selected = self._magnitudes.numpy()
                selected.partition(wanted)  # in place: the copy is ours, and its values stay the same
                values = [float(selected[i]) for i in wanted]
            else:
                values = [float(torch.kthvalue(self._magnitudes, i + 1).values) for i in wanted]
            self._found.update(zip(wanted, values, strict=True))
            found = self._found[index]
        return found


class _Context:
    """``TensorContext`` of one output tensor: the engine's resident data for a planner."""

    def __init__(self, engine: MergeEngine, recipe: Recipe, spec: MethodSpec, target: _Target,
                 cell: tuple[int, str], out: torch.Tensor) -> None:
        self._engine = engine
        self._recipe = recipe
        self._cell = cell
        self.spec = spec
        self.name = target.info.name
        self.shape = engine._shapes[self.name]
        self.shapes = engine._shapes
        self.numel = out.numel()
        self.out = out
        self.seed = recipe.seed
        self.dtype = engine._dtype
        # a method that ignores the base (linear, karcher) takes a listed base as one more model
        self.positions = (non_base_sources(recipe) if spec.takes_base
                          else tuple(range(len(recipe.sources))))
        self.uses_base = recipe.base is not None and spec.takes_base
        self.model = target.model
        self.scale = target.scale

    @property
    def base(self) -> torch.Tensor | None:
        return self._engine._base_of(self.name)

    @property
    def fused_base(self) -> torch.Tensor | None:
        return self._engine._fused_base(self.name)

    def model_of(self, position: int) -> int:
        return self._engine._model_of(self._recipe.sources[position], "source")

    def delta(self, model: int) -> torch.Tensor:
        return self._engine._delta(self.name, model)

    def task_vector(self, model: int) -> Delta:
        return self._engine._task_vector(self.name, model)

    def tensor(self, model: int) -> torch.Tensor:
        return self._engine._exact_source(self.name, model)

    def tensor_values(self, param: str) -> tuple[float, ...]:
        return self._engine._tensor_values(self._recipe, self.spec, param, self._cell)

    def global_value(self, param: str) -> float | bool:
        return self._engine._global(self._recipe, self.spec, param, self._cell)

    def cached(self, key: tuple[object, ...], compute: Callable[[], _T]) -> _T:
        store = self._engine._statistics
        if key not in store:
            store[key] = compute()
        return store[key]  # type: ignore[return-value]

    def sorted_magnitudes(self, model: int) -> torch.Tensor:
        return self._engine._sorted(self.name, model)

    def prefetch_sorted(self, wanted: Mapping[int, Sequence[int]]) -> None:
        if self._engine._lean:
            self._engine._prefetch_sorted(self.name, wanted)

    def rank(self, key: RankKey) -> torch.Tensor | None:
        return self._engine._rank.get(key)

    def generator(self, position: int) -> torch.Generator:
        return self._engine._generator(self.seed, self.name, position)

    def random_key(self, position: int, model: int) -> torch.Tensor:
        return self._engine._random_key(self.seed, self.name, position, model)

    def della(self, position: int, model: int, density: float, epsilon: float,
              rescale: bool) -> torch.Tensor:
        return self._engine._della(self.seed, self.name, position, model, density, epsilon,
                                   rescale)
