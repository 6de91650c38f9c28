"""Fast teacher-forced exact match vs greedy ``generate`` on the demo family's slices.

Usage::

    python benchmarks/eval_speed.py [--model shipping] [--split heldout] [--repeats 5]
                                    [--batch-size 64] [--generate-batch-size 64] [--threads N]
                                    [--root FAMILY_DIR]

Scores every demo task's slice with one model twice: with
:func:`fitness.scoring.score_examples` (one forward pass per pre-tokenised batch) and
with ``model.generate(do_sample=False)`` on the same prompt tokens, one prompt at a time
(plain greedy decoding; ``--generate-batch-size N`` uses left-padded batches instead),
decoding each continuation up to ``<eos>`` and comparing it with the answer text. The
model is a demo checkpoint folder (``base``, ``shipping``, ``refunds``, ``catalog``) or
``task_arithmetic`` (default): base + the sum of the three specialists' task vectors
(what a merge search starts from), whose exact match is neither all 0 nor all 1, so the
agreement check means something. Prints examples
per second for both (median of ``--repeats`` runs for the fast scorer; generate runs
once), the ratio, whether every per-example result agrees, and, for reference, batched
generate (batch 64) too; ends with one JSON line::

    {"fast_examples_per_s": ..., "generate_examples_per_s": ..., "ratio": ..., "agree": true,
     "generate_fast_examples_per_s": ..., "generate_reference_examples_per_s": ..., "generate_ratio": ...,
     "generate_agree": true}

The ``generate_*`` keys time generation tasks (``metric = "generate"``, :mod:`fitness.generation`):
the same slices scored by generated text (batched greedy decoding with a KV cache, left padding,
early exit; median of ``--repeats``) against the plain per-prompt ``model.generate`` loop with
the same stops (:func:`fitness.generation.reference_generate`, run once), and whether every
example's text and verdict agree. Both decode up to ``--max-new-tokens`` (default 8: the demo
answers are at most 7 tokens).

Tokenisation (``load_task``) happens once per study and is not timed.

``--lmeval-trials N`` (N > 0) also times the lm-eval path on the three lm-eval tasks of
``studies/logistics_lmeval`` (multiple_choice, generate_until, loglikelihood; ``--lmeval-limit``
documents of the search split each) for N seeded random recipes of that study's genome:
in memory (merge into the live model that lm-eval's HFLM wraps, run the tasks: what a
trial worker does) against mergekit-evolve's disk path (write the merged checkpoint, load
it into lm-eval's HFLM, run the tasks, delete it), and adds to the JSON line
``lmeval_in_memory_s_per_trial``, ``lmeval_disk_s_per_trial``, ``lmeval_ratio`` and
``lmeval_agree`` (identical per-document results and scores on every trial). The worker's
one-time setup (engine, HFLM, task loading) is not timed; the disk path's task manager is
built once too, as mergekit-evolve does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fitness.extract import GenerateSpec, gold_answer, verdict  # noqa: E402
from fitness.generation import end_token_ids, generate_slice, reference_generate  # noqa: E402
from fitness.scoring import score_examples  # noqa: E402
from fitness.slices import EncodedSlice, load_task  # noqa: E402
from fitness.spec import TaskSpec  # noqa: E402

TASKS: tuple[str, ...] = ("shipping", "refunds", "catalog")


def family_root(root: Path | None) -> Path:
    if root is not None:
        return root
    from studies.demo_family import shipped_family

    return shipped_family().root


def load_model(root: Path, name: str) -> PreTrainedModel:
    """A demo checkpoint, or ``task_arithmetic``: base + sum of (specialist - base), lambda 1."""
    if name != "task_arithmetic":
        return AutoModelForCausalLM.from_pretrained(root / name).eval()
    model = AutoModelForCausalLM.from_pretrained(root / "base").eval()
    base = {key: tensor.clone() for key, tensor in model.state_dict().items()}
    specialists = [AutoModelForCausalLM.from_pretrained(root / task).state_dict() for task in TASKS]
    model.load_state_dict({key: base[key] + sum(s[key] - base[key] for s in specialists) for key in base})
    return model


def generate_exact(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data: EncodedSlice,
                   batch_size: int) -> list[float]:
    """Greedy ``generate`` per example: 1.0 when the text up to eos equals the answer."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    results: list[float] = []
    examples = data.examples
    for start in range(0, len(examples), batch_size):
        chunk = examples[start: start + batch_size]
        width = max(len(e.prompt_ids) for e in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, example in enumerate(chunk):  # left padding, as generate expects
            input_ids[row, width - len(example.prompt_ids):] = torch.tensor(example.prompt_ids)
            attention_mask[row, width - len(example.prompt_ids):] = 1
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                max_new_tokens=max(len(e.answer_ids) for e in chunk) + 1,
                pad_token_id=pad, eos_token_id=eos,
            )
        for row, example in enumerate(chunk):
            continuation = out[row, width:].tolist()
            stopped = eos in continuation
            if stopped:
                continuation = continuation[: continuation.index(eos)]
            text = tokenizer.decode(continuation, skip_special_tokens=True)
            results.append(float(stopped and text == example.answer))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="task_arithmetic",
                        help="demo checkpoint folder, or 'task_arithmetic' (default)")
    parser.add_argument("--split", choices=("search", "heldout"), default="heldout")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of the fast scorer (median)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--generate-batch-size", type=int, default=1, help="1: plain per-prompt generate")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--root", type=Path, default=None, help="an already built family folder")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="generation path: tokens per answer")
    parser.add_argument("--lmeval-trials", type=int, default=0,
                        help="also time the lm-eval path on this many recipes (0: skip)")
    parser.add_argument("--lmeval-limit", type=int, default=40, help="search documents per lm-eval task")
    parser.add_argument("--lmeval-only", action="store_true", help="time only the lm-eval path")
    args = parser.parse_args(argv)
    if args.lmeval_only:
        result = lmeval_speed(trials=max(1, args.lmeval_trials), limit=args.lmeval_limit)
        print(json.dumps(result))
        return 0 if result["lmeval_agree"] else 1
    if args.threads:
        torch.set_num_threads(args.threads)

    root = family_root(args.root)
    tokenizer = AutoTokenizer.from_pretrained(root / "base")
    model = load_model(root, args.model)
    slices = []
    for task in TASKS:
        folder = root / "data" / task
        data = load_task(TaskSpec(task, folder / "search.jsonl", folder / "heldout.jsonl"), tokenizer,
                         batch_size=args.batch_size)
        slices.append(data.search if args.split == "search" else data.heldout)
    n = sum(s.n for s in slices)
    print(f"model {args.model}, {args.split} slices of {', '.join(TASKS)}: {n} examples, "
          f"torch threads {torch.get_num_threads()}, cpu count {os.cpu_count()}")

    score_examples(model, slices[0])  # warm-up (first-call allocations)
    fast_times: list[float] = []
    fast: list[float] = []
    for _ in range(max(1, args.repeats)):
        start = time.perf_counter()
        fast = [value for data in slices for value in score_examples(model, data)]
        fast_times.append(time.perf_counter() - start)
    fast_s = statistics.median(fast_times)

    start = time.perf_counter()
    slow = [value for data in slices for value in generate_exact(model, tokenizer, data, args.generate_batch_size)]
    slow_s = time.perf_counter() - start

    start = time.perf_counter()
    batched = [value for data in slices for value in generate_exact(model, tokenizer, data, 64)]
    batched_s = time.perf_counter() - start

    disagreements = [i for i, (a, b) in enumerate(zip(fast, slow, strict=True)) if a != b]
    batched_disagreements = sum(a != b for a, b in zip(fast, batched, strict=True))
    offset = 0
    for data in slices:
        accuracy = sum(fast[offset: offset + data.n]) / data.n
        offset += data.n
        print(f"  {data.task:<9} exact match {accuracy:.3f} ({data.n} examples)")
    print(f"fast scorer: {fast_s:.3f} s median of {len(fast_times)} "
          f"({', '.join(f'{t:.3f}' for t in fast_times)}): {n / fast_s:.1f} examples/s")
    print(f"generate (greedy, batch {args.generate_batch_size}): {slow_s:.3f} s: {n / slow_s:.1f} examples/s")
    print(f"generate (greedy, batch 64, for reference): {batched_s:.3f} s: {n / batched_s:.1f} examples/s, "
          f"{batched_s / fast_s:.1f}x the fast scorer's time, "
          f"agreement {n - batched_disagreements}/{n}")
    print(f"ratio {slow_s / fast_s:.1f}x; per-example agreement: {n - len(disagreements)}/{n}")
    result = {
        "fast_examples_per_s": round(n / fast_s, 2),
        "generate_examples_per_s": round(n / slow_s, 2),
        "ratio": round(slow_s / fast_s, 2),
        "agree": not disagreements,
        **generation_path(model, tokenizer, root, args),
    }
    if args.lmeval_trials > 0:
        result.update(lmeval_speed(trials=args.lmeval_trials, limit=args.lmeval_limit))
    print(json.dumps(result))
    return 0 if not disagreements and result["generate_agree"] and result.get("lmeval_agree", True) else 1


def generation_path(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, root: Path,
                    args: argparse.Namespace) -> dict[str, float | bool]:
    """Generation scoring vs the per-prompt generate loop on the same slices: speed and agreement."""
    spec = GenerateSpec(max_new_tokens=args.max_new_tokens)
    slices = []
    for task in TASKS:
        folder = root / "data" / task
        data = load_task(TaskSpec(task, folder / "search.jsonl", folder / "heldout.jsonl", metric="generate",
                                  generate=spec), tokenizer, batch_size=args.batch_size)
        slices.append(data.search if args.split == "search" else data.heldout)
    n = sum(s.n for s in slices)
    generate_slice(model, slices[0])  # warm-up
    times: list[float] = []
    fast: list[tuple[str, float]] = []
    for _ in range(max(1, args.repeats)):
        start = time.perf_counter()
        fast = [(a.completion, a.verdict) for data in slices for a in generate_slice(model, data)]
        times.append(time.perf_counter() - start)
    fast_s = statistics.median(times)
    start = time.perf_counter()
    reference = []
    for data in slices:
        texts = reference_generate(model, [e.prompt_ids for e in data.examples], tokenizer=tokenizer,
                                   max_new_tokens=spec.max_new_tokens, stops=spec.stop,
                                   end_ids=end_token_ids(model, tokenizer), pad_id=tokenizer.pad_token_id)
        reference += [(text, verdict(spec, text, gold_answer(spec, e.answer) or "")[0])
                      for text, e in zip(texts, data.examples, strict=True)]
    reference_s = time.perf_counter() - start
    agree = sum(a == b for a, b in zip(fast, reference, strict=True))
    print(f"generation scoring (batch {args.batch_size}, KV cache, early exit): {fast_s:.3f} s median of "
          f"{len(times)} ({', '.join(f'{t:.3f}' for t in times)}): {n / fast_s:.1f} examples/s, "
          f"accuracy {sum(v for _, v in fast) / n:.3f}")
    print(f"per-prompt generate loop: {reference_s:.3f} s: {n / reference_s:.1f} examples/s; "
          f"ratio {reference_s / fast_s:.1f}x; same text and verdict: {agree}/{n}")
    return {
        "generate_fast_examples_per_s": round(n / fast_s, 2),
        "generate_reference_examples_per_s": round(n / reference_s, 2),
        "generate_ratio": round(reference_s / fast_s, 2),
        "generate_agree": agree == n,
    }


def lmeval_speed(*, trials: int, limit: int, seed: int = 0) -> dict[str, float | bool]:
    """Seconds per trial of lm-eval in memory vs on disk (see the module docstring)."""
    import dataclasses
    import random
    import shutil
    import tempfile

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from fitness.lm_eval_task import LmEvalTask
    from genome.space import decode, gene_space
    from merges.checkpoint import open_checkpoint
    from merges.save import save_checkpoint
    from search.config import load_study
    from search.driver import worker_setup
    from search.worker import TrialWorker

    study = Path(__file__).resolve().parents[1] / "studies" / "logistics_lmeval" / "study.toml"
    config = load_study(study)
    config = dataclasses.replace(config, tasks=tuple(dataclasses.replace(t, limit=limit) for t in config.tasks))
    worker = TrialWorker(worker_setup(config))  # setup: engine, live model, HFLM, tasks (not timed)
    tasks = {name: data for name, data in worker.tasks.items() if isinstance(data, LmEvalTask)}
    base = open_checkpoint(config.models.base)
    n_layers = base.layout.n_layers
    space = gene_space(config.genome, sources=config.models.sources, n_layers=n_layers)
    rng = random.Random(seed)
    recipes = []
    for trial in range(trials):
        params = {name: rng.uniform(d.low, d.high) for name, d in space.items()}  # float genes only here
        recipes.append(decode(config.genome, params, base=str(config.models.base), sources=config.models.sources,
                              n_layers=n_layers, seed=trial))
    manager = TaskManager(include_path=str(next(iter(tasks.values())).spec.lm_eval.include), include_defaults=False)
    lm_names = {name: data.spec.lm_eval.task for name, data in tasks.items()}

    memory_s, disk_s, agree = [], [], True
    with tempfile.TemporaryDirectory(prefix="lmeval-disk-") as scratch:
        for index, recipe in enumerate(recipes):
            start = time.perf_counter()
            worker.engine.merge_into(worker.model, recipe)
            with torch.inference_mode():
                ours = {name: data.run("search", log_samples=True) for name, data in tasks.items()}
            memory_s.append(time.perf_counter() - start)

            start = time.perf_counter()
            folder = Path(scratch) / f"merged-{index}"
            save_checkpoint(worker.engine.materialize(recipe), folder, like=base)
            lm = HFLM(pretrained=str(folder), batch_size=config.execution.batch_size, device="cpu")
            simple_evaluate(model=lm, tasks=list(lm_names.values()), task_manager=manager, bootstrap_iters=0,
                            samples={task: tasks[name].split["search"] for name, task in lm_names.items()})
            shutil.rmtree(folder)
            disk_s.append(time.perf_counter() - start)  # mergekit-evolve's cost: all tasks in one call
            # The agreement check, not timed: one task per call, as a trial worker runs them (in one
            # call lm-eval batches several tasks' requests together, which moves float rounding).
            results = {
                name: simple_evaluate(model=lm, tasks=[task], task_manager=manager,
                                      samples={task: tasks[name].split["search"]}, bootstrap_iters=0,
                                      log_samples=True)
                for name, task in lm_names.items()
            }
            del lm
            for name, mine in ours.items():
                task = lm_names[name]
                theirs = results[name]["results"][task][tasks[name].key]
                same_docs = [(s["doc_id"], s["filtered_resps"]) for s in mine.samples] == [
                    (s["doc_id"], s["filtered_resps"]) for s in results[name]["samples"][task]]
                agree = agree and same_docs and mine.score == theirs
            print(f"  lm-eval trial {index}: in memory {memory_s[-1]:.2f} s, disk {disk_s[-1]:.2f} s, "
                  + ", ".join(f"{name} {mine.score:.3f}" for name, mine in ours.items()))
    memory = statistics.median(memory_s)
    disk = statistics.median(disk_s)
    print(f"lm-eval ({len(tasks)} tasks, {limit} search documents each): in memory {memory:.2f} s/trial, "
          f"disk path {disk:.2f} s/trial (median of {trials}): {disk / memory:.1f}x; identical results: {agree}")
    return {"lmeval_in_memory_s_per_trial": round(memory, 3), "lmeval_disk_s_per_trial": round(disk, 3),
            "lmeval_ratio": round(disk / memory, 2), "lmeval_agree": agree}


if __name__ == "__main__":
    raise SystemExit(main())
