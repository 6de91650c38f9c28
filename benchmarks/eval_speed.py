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
    args = parser.parse_args(argv)
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
    print(json.dumps(result))
    return 0 if not disagreements and result["generate_agree"] else 1


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


if __name__ == "__main__":
    raise SystemExit(main())
