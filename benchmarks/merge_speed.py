"""Merge speed: the in-memory engine (per engine plan) vs ``search merge`` vs ``mergekit-yaml``.

Builds (once, cached under ``$MERGESEARCH_CACHE/bench/<size>/``, else ``.cache/bench``) a
Llama-style base with three fine-tune-like sources (``1b``: TinyLlama-1.1B's shapes, bf16
on disk), then for each method and each engine plan (``--plan``) prints

* ``engine_s``: median ``MergeEngine.merge_into`` time of one recipe into a live model
  (after a first merge that also builds the engine's statistics: ``engine_first_s``),
* ``search_merge_s``: ``search merge recipe.yaml OUT --seed 0``, disk to disk (tmpfs),
* ``mergekit_s``: ``mergekit-yaml recipe.yaml OUT``, disk to disk (tmpfs),
* ``floor_s``: a memcpy pass over the bytes a merge must touch (read K+1, write one),
* peak RSS of each process (each runs as a child, measured with ``os.wait4``); for the
  engine ``peak_rss_mb`` is the child's own peak up to its last merge (loading, engine, live
  model, merges), before the floor's buffers (``child_peak_rss_mb``: with them);
* with ``--phases``: where the timed merges spent their time (``engine_phases``, seconds per
  recipe): thread-seconds of forming task vectors, selecting the cuts, replaying tied cuts and
  the fused passes (summed over the pool's threads), and the wall time of each step of a chunk.

The last line is one JSON object keyed by method (the engine's figures under ``plans``,
keyed by plan). Usage::

    python -m benchmarks.merge_speed --size small --methods linear,ties
    python -m benchmarks.merge_speed --size 1b --methods ties --plan lean
    python -m benchmarks.merge_speed --size 250m --methods linear,ties --plan lean,stream \
        --skip-search-merge --skip-mergekit
    python -m benchmarks.merge_speed --size 1b --methods ties --plan lean --phases --repeats 1 \
        --skip-search-merge --skip-mergekit
    python -m benchmarks.merge_speed --size 250m --skip-mergekit
    python -m benchmarks.merge_speed --size 250m --methods new --skip-engine --skip-search-merge
    python -m benchmarks.merge_speed --size small --methods ties,new   # new: NEW_METHODS
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from merges.methods.registry import METHODS, REQUIRED
from merges.recipe import Recipe

REPO = Path(__file__).resolve().parents[1]
N_SOURCES = 3
WEIGHTS = [0.5, 0.3, 0.8]
DENSITY = 0.5
DEFAULT_METHODS = "linear,task_arithmetic,ties,dare_ties"
NEW_METHODS = "nearswap,nuslerp,multislerp,sce,karcher,arcee_fusion,ram,ramplus_tl"  # issue 13


@dataclass(frozen=True)
class Size:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    kv_heads: int | None = None  # grouped-query attention (None: one per head)
    storage: str = "float32"  # the checkpoints' dtype on disk
    structured: bool = False  # fine-tune-like deltas (low rank + noise, unchanged rows), not noise


SIZES = {
    "small": Size(hidden=256, intermediate=688, layers=4, heads=4, vocab=4000),
    "small-bf16": Size(hidden=256, intermediate=688, layers=4, heads=4, vocab=4000, storage="bfloat16"),
    "250m": Size(hidden=1024, intermediate=2816, layers=14, heads=16, vocab=32000),
    # TinyLlama-1.1B's shapes, bf16 on disk as fine-tunes ship
    "1b": Size(hidden=2048, intermediate=5632, layers=22, heads=32, vocab=32000, kv_heads=4,
               storage="bfloat16", structured=True),
}


# -- the checkpoint family --------------------------------------------------------------


def build_family(root: Path, size: Size, seed: int = 0) -> tuple[Path, list[Path]]:
    """Base + sources as safetensors folders; reused when ``root/complete`` exists."""
    base_dir, source_dirs = root / "base", [root / f"source{i}" for i in range(N_SOURCES)]
    if (root / "complete").exists():
        return base_dir, source_dirs
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    shutil.rmtree(root, ignore_errors=True)
    config = LlamaConfig(hidden_size=size.hidden, intermediate_size=size.intermediate,
                         num_hidden_layers=size.layers, num_attention_heads=size.heads,
                         num_key_value_heads=size.kv_heads or size.heads, vocab_size=size.vocab,
                         max_position_embeddings=512, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         architectures=["LlamaForCausalLM"])
    words = ["<pad>", "<bos>", "<eos>", "<unk>"] + [f"w{i}" for i in range(size.vocab - 4)]
    tokenizer = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")
    shapes = llama_shapes(size)
    gen = torch.Generator().manual_seed(seed)
    storage = getattr(torch, size.storage)
    # the base in the storage dtype, each source tensor by tensor: a 1.1B bf16 family builds in ~5 GB
    base = {name: (torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen).mul_(0.02)
                   ).to(storage) for name, shape in shapes.items()}
    for index, folder in enumerate([base_dir, *source_dirs]):
        tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
        tmp.mkdir(parents=True)
        config.save_pretrained(tmp)
        fast.save_pretrained(tmp)
        if index == 0:
            tensors = base
        else:  # a fine-tune: small noise on most tensors, every fifth left as the base
            tensors = {}
            for position, (name, tensor) in enumerate(base.items()):
                if position % 5 == 4:
                    tensors[name] = tensor
                elif size.structured:
                    tensors[name] = _fine_tune(tensor, 0.002 * index, gen).to(storage)
                else:
                    noise = torch.randn(tensor.shape, generator=gen)
                    tensors[name] = noise.mul_(0.002 * index).add_(tensor).to(storage)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        os.replace(tmp, folder)
    (root / "complete").write_text("ok\n")
    return base_dir, source_dirs


def _fine_tune(tensor: torch.Tensor, scale: float, gen: torch.Generator) -> torch.Tensor:
    """``tensor`` (float32) plus a fine-tune-like delta: rank 8 plus a quarter as much noise,
    with one row in ten unchanged (its delta exactly zero once stored), as fine-tunes that
    leave some rows (unused tokens, frozen units) alone. One tensor in float32 at a time."""
    base = tensor.float()
    if base.dim() == 1:
        return torch.randn(base.shape, generator=gen).mul_(scale).add_(base)
    rows, cols = base.shape
    rank = 8
    left = torch.randn((rows, rank), generator=gen).mul_(scale / rank ** 0.5)
    delta = left @ torch.randn((rank, cols), generator=gen)
    delta.add_(torch.randn(base.shape, generator=gen), alpha=scale / 4)
    delta[torch.rand(rows, generator=gen) < 0.1] = 0
    return delta.add_(base)


def llama_shapes(size: Size) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a Llama checkpoint of ``size`` (untied head)."""
    h, m = size.hidden, size.intermediate
    kv = h // size.heads * (size.kv_heads or size.heads)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (size.vocab, h)}
    for layer in range(size.layers):
        p = f"model.layers.{layer}."
        for proj, rows in (("q", h), ("k", kv), ("v", kv), ("o", h)):
            shapes[f"{p}self_attn.{proj}_proj.weight"] = (rows, h)
        shapes[f"{p}mlp.gate_proj.weight"] = (m, h)
        shapes[f"{p}mlp.up_proj.weight"] = (m, h)
        shapes[f"{p}mlp.down_proj.weight"] = (h, m)
        shapes[f"{p}input_layernorm.weight"] = (h,)
        shapes[f"{p}post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (size.vocab, h)
    return shapes


def make_recipe(method: str, base: Path, sources: list[Path], n_layers: int) -> Recipe:
    """Weights and density as above; every other required or searchable parameter (besides
    lambda) at the catalogue's untuned value; as many sources as the method takes (<= 3)."""
    spec = METHODS[method]
    count = min(N_SOURCES, spec.max_sources or N_SOURCES)
    if method == "multislerp":  # norms the sources leave unchanged: mergekit refuses 3 zero vectors
        count = 2
    params: dict[str, list[float]] = {}
    shared: dict[str, float | bool] = {}
    for param in spec.params:
        if param.name == "weight":
            params["weight"] = WEIGHTS[:count]
        elif param.name == "density":
            if param.search is not None:
                params["density"] = [DENSITY] * count
        elif param.name != "lambda" and (param.default is REQUIRED or param.search is not None):
            assert isinstance(param.untuned, float | bool), (method, param.name)
            shared[param.name] = param.untuned
    return Recipe.uniform(method, None if method == "linear" else str(base),
                          [str(s) for s in sources[:count]], n_layers, params, shared)


# -- measurements ----------------------------------------------------------------------------


def run_child(command: list[str]) -> tuple[float, float, int, str]:
    """Wall seconds, peak RSS (MB), exit status and output of one child process."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - started, usage.ru_maxrss / 1024, process.returncode, output


class Phases:
    """Seconds spent inside wrapped engine functions, summed over threads (``--phases``)."""

    def __init__(self) -> None:
        import threading

        self.seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    def wrap(self, owner: object, attribute: str, phase: str) -> None:
        """Replace ``owner.attribute`` (a function) by one that adds its time to ``phase``."""
        import functools

        inner = getattr(owner, attribute)

        @functools.wraps(inner)
        def timed(*args: object, **kwargs: object) -> object:
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.add(phase, time.perf_counter() - started)

        setattr(owner, attribute, timed)

    def add(self, phase: str, seconds: float) -> None:
        with self._lock:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    def install(self) -> None:
        """Time the lean plan's steps: thread-seconds of each kind of work, wall time of each
        step of a chunk (``wall:`` entries; planning = forming deltas + selecting cuts)."""
        import merges.engine as engine
        from merges.methods import tie_order

        original = engine.MergeEngine._derived

        def derived(this: object, kind: str, name: str, model: int, compute: object) -> object:
            def timed() -> object:
                started = time.perf_counter()
                try:
                    return compute()  # type: ignore[operator]
                finally:
                    self.add(f"threads: form {kind}", time.perf_counter() - started)
            return original(this, kind, name, model, timed)  # type: ignore[arg-type]

        engine.MergeEngine._derived = derived  # type: ignore[method-assign,assignment]
        self.wrap(engine._OrderStatistics, "__init__", "threads: select cut (copy |delta|)")
        self.wrap(engine._OrderStatistics, "__getitem__", "threads: select cut")
        self.wrap(engine.magnitude_sketch.SketchedOrder, "__getitem__", "threads: select cut")
        self.wrap(tie_order, "window_keys", "threads: replay tied cuts")
        self.wrap(tie_order, "tied_cut_keys", "threads: replay tied cuts")
        self.wrap(tie_order, "tied_cut_apply", "threads: replay tied cuts")
        self.wrap(engine, "run_native_many", "wall: fused passes")
        self.wrap(engine.MergeEngine, "_fill_ranks", "wall: tied cuts")
        self.wrap(engine.MergeEngine, "_apply_rescale", "wall: rescale")
        self.wrap(engine.MergeEngine, "_drop_chunk", "wall: drop chunk")
        self.wrap(engine.MergeEngine, "_run_chunk", "wall: chunks")
        self.wrap(engine.MergeEngine, "_read_chunk", "wall: read chunk")  # stream: the chunk's inputs
        self.wrap(engine.MergeEngine, "merge_into", "wall: merge_into")

    def report(self, merges: int) -> dict[str, float]:
        """Per merge; ``wall: planning`` = chunks minus the other chunk steps."""
        per = {phase: seconds / merges for phase, seconds in sorted(self.seconds.items())}
        steps = ("wall: fused passes", "wall: tied cuts", "wall: rescale")
        per["wall: planning"] = per.get("wall: chunks", 0.0) - sum(per.get(s, 0.0) for s in steps)
        return per


def engine_child(method: str, root: Path, size_name: str, repeats: int, threads: int | None,
                 plan: str, phases: bool = False) -> None:
    """Runs inside a child: time merge_into under ``plan``, print one JSON line."""
    from merges.checkpoint import open_checkpoint
    from merges.engine import MergeEngine

    base_dir, source_dirs = build_family(root, SIZES[size_name])
    base = open_checkpoint(base_dir)
    sources = [open_checkpoint(s) for s in source_dirs]
    started = time.perf_counter()
    engine = MergeEngine(base, sources, device="cpu", threads=threads, plan=plan)
    load_s = time.perf_counter() - started
    model = engine.new_model()
    recipe = make_recipe(method, base_dir, source_dirs, engine.layout.n_layers)
    started = time.perf_counter()
    engine.merge_into(model, recipe)
    first_s = time.perf_counter() - started
    timers = Phases() if phases else None
    if timers is not None:
        timers.install()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        engine.merge_into(model, recipe)
        times.append(time.perf_counter() - started)
    # the peak so far: loading, the engine and the live model, the merges (not the floor's buffers below)
    import resource

    merge_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # memcpy floor: a copy reads N and writes N; a merge reads (K+1) N and writes N
    params = list(model.parameters())
    scratch = [torch.empty_like(p) for p in params]
    copies = []
    for _ in range(5):
        started = time.perf_counter()
        with torch.no_grad():
            for param, buffer in zip(params, scratch, strict=True):
                buffer.copy_(param)
        copies.append(time.perf_counter() - started)
    del scratch
    n_params = sum(p.numel() for p in params)
    print(json.dumps({"engine_s": statistics.median(times), "engine_first_s": first_s,
                      "engine_load_s": load_s, "copy_s": min(copies), "n_params": n_params,
                      "merge_peak_rss_mb": merge_peak_mb,
                      "resident_mb": engine.resident_bytes() / 2**20,
                      **({"engine_phases": timers.report(repeats)} if timers is not None else {})}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma list (default {DEFAULT_METHODS})")
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--skip-mergekit", action="store_true", help="do not run mergekit-yaml")
    parser.add_argument("--skip-search-merge", action="store_true", help="do not run search merge")
    parser.add_argument("--skip-engine", action="store_true",
                        help="do not time the in-memory engine (e.g. mergekit-yaml alone)")
    parser.add_argument("--repeats", type=int, default=5, help="timed merges per method (median)")
    parser.add_argument("--threads", type=int, default=None, help="engine threads (default: torch's)")
    parser.add_argument("--plan", default="resident,lean",
                        help="engine plans to measure, comma list (default resident,lean)")
    parser.add_argument("--phases", action="store_true",
                        help="also time the engine's steps per merge (engine_phases)")
    parser.add_argument("--engine-child", metavar="METHOD", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cache = os.environ.get("MERGESEARCH_CACHE")
    root = (Path(cache) if cache else REPO / ".cache") / "bench" / args.size
    plans = [p.strip() for p in args.plan.split(",") if p.strip()]
    if args.engine_child:
        engine_child(args.engine_child, root, args.size, args.repeats, args.threads, plans[0],
                     args.phases)
        return 0

    size = SIZES[args.size]
    started = time.perf_counter()
    base_dir, source_dirs = build_family(root, size)
    print(f"family {root} ready in {time.perf_counter() - started:.1f} s", flush=True)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    methods = [n for m in methods for n in (NEW_METHODS.split(",") if m == "new" else [m])]
    search_cli = shutil.which("search")
    mergekit_cli = shutil.which("mergekit-yaml")
    scratch = Path(tempfile.mkdtemp(prefix="mergesearch-bench-", dir="/dev/shm"))
    results: dict[str, dict[str, object]] = {}
    try:
        for method in methods:
            row: dict[str, object] = {"plans": {}}
            n_params = sum(torch.Size(shape).numel() for shape in llama_shapes(size).values())
            for plan in [] if args.skip_engine else plans:
                command = [sys.executable, "-m", "benchmarks.merge_speed", "--size", args.size,
                           "--engine-child", method, "--repeats", str(args.repeats), "--plan", plan]
                if args.threads:
                    command += ["--threads", str(args.threads)]
                if args.phases:
                    command.append("--phases")
                _, rss, status, output = run_child(command)
                if status != 0:
                    print(f"{method}: engine ({plan}) failed:\n{output[-3000:]}", flush=True)
                    continue
                engine = json.loads(output.strip().splitlines()[-1])
                n_params = engine["n_params"]
                # memcpy floor: the copy pass moves 2N floats; a merge moves (K+2)N
                floor = engine["copy_s"] * (N_SOURCES + 2) / 2
                row["plans"][plan] = dict(  # type: ignore[index]
                    engine_s=engine["engine_s"], engine_first_s=engine["engine_first_s"],
                    engine_load_s=engine["engine_load_s"], floor_s=floor,
                    peak_rss_mb=engine["merge_peak_rss_mb"], child_peak_rss_mb=rss,
                    resident_mb=engine["resident_mb"])
                if "engine_phases" in engine:
                    row["plans"][plan]["phases"] = engine["engine_phases"]  # type: ignore[index]
                    print(f"{method} {plan} phases (s per merge): "
                          + ", ".join(f"{k} {v:.2f}" for k, v in engine["engine_phases"].items()),
                          flush=True)
            yaml_path = scratch / f"{method}.yaml"
            row["search_merge_s"] = row["search_merge_rss_mb"] = None
            row["mergekit_s"] = row["mergekit_rss_mb"] = None
            try:
                from merges.checkpoint import open_checkpoint
                from merges.mergekit_yaml import recipe_to_mergekit

                recipe = make_recipe(method, base_dir, source_dirs, size.layers)
                yaml_path.write_text(recipe_to_mergekit(recipe, open_checkpoint(base_dir).layout))
            except Exception as exc:  # the exporter is another module: report, keep measuring
                print(f"{method}: no YAML ({exc!r}); disk-to-disk runs skipped", flush=True)
                yaml_path = None
            if yaml_path is not None and search_cli and not args.skip_search_merge:
                out = scratch / f"{method}-search"
                wall, rss, status, output = run_child([search_cli, "merge", str(yaml_path), str(out),
                                                       "--seed", "0"])
                if status == 0:
                    row["search_merge_s"], row["search_merge_rss_mb"] = wall, rss
                else:
                    print(f"{method}: search merge failed:\n{output[-2000:]}", flush=True)
                shutil.rmtree(out, ignore_errors=True)
            if yaml_path is not None and mergekit_cli and not args.skip_mergekit:
                out = scratch / f"{method}-mergekit"
                wall, rss, status, output = run_child([mergekit_cli, str(yaml_path), str(out),
                                                       "--random-seed", "0", "--quiet"])
                if status == 0:
                    row["mergekit_s"], row["mergekit_rss_mb"] = wall, rss
                else:
                    print(f"{method}: mergekit-yaml failed:\n{output[-2000:]}", flush=True)
                shutil.rmtree(out, ignore_errors=True)
            results[method] = row
            for line in _lines(method, row, n_params):
                print(line, flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(results))
    return 0


def _fmt(value: float | None, unit: str = "s") -> str:
    return "n/a" if value is None else f"{value:.3f} {unit}"


def _lines(method: str, row: dict[str, object], n_params: int) -> list[str]:
    """One line per engine plan, then one for the disk-to-disk runs."""
    mergekit = row["mergekit_s"]
    lines = []
    for plan, figures in row["plans"].items():  # type: ignore[attr-defined]
        engine, floor = figures["engine_s"], figures["floor_s"]
        parts = [f"{method:>16} {plan:>8}: engine {_fmt(engine)} (first {_fmt(figures['engine_first_s'])}, "
                 f"load {_fmt(figures['engine_load_s'])})", f"floor {_fmt(floor)}",
                 f"engine/floor {engine / floor:.1f}x"]
        if mergekit:
            parts.append(f"mergekit/engine {mergekit / engine:.0f}x")  # type: ignore[operator]
        parts.append(f"peak RSS {_fmt(figures['peak_rss_mb'], 'MB')} (engine tensors "
                     f"{_fmt(figures['resident_mb'], 'MB')})")
        lines.append("; ".join(parts))
    lines.append(f"{method:>16} disk: search merge {_fmt(row['search_merge_s'])} "  # type: ignore[arg-type]
                 f"({_fmt(row['search_merge_rss_mb'], 'MB')}), mergekit {_fmt(mergekit)} "  # type: ignore[arg-type]
                 f"({_fmt(row['mergekit_rss_mb'], 'MB')}); {n_params / 1e6:.1f}M params")  # type: ignore[arg-type]
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
