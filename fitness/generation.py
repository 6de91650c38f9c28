"""Generation tasks: greedy decoding of many prompts at once, then a verdict per answer.

:func:`greedy_generate` decodes pre-tokenised prompts in batches of similar length, left
padded, with the model's KV cache: one forward pass over the prompts, then one single-token
pass per new token; only the last position's logits are projected onto the vocabulary when
the model's ``forward`` takes ``logits_to_keep``. A row stops at an end token (the
tokenizer's eos and the model's ``generation_config.eos_token_id``, what ``generate`` stops
on), at the first stop string in its decoded text, or after ``max_new_tokens``; the batch
ends as soon as every row has stopped. Position ids count each row's real tokens, so a row's
arithmetic is that of the same prompt decoded alone. The text is the decoded tokens (special
tokens skipped) cut at the first stop string and stripped; :mod:`fitness.extract` turns it
into a verdict.

:func:`reference_generate` is the plain per-prompt ``model.generate`` loop with the same
stops; the tests and ``benchmarks/eval_speed.py`` check the two give the same text.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

from fitness.extract import cut_at_stop, verdict
from fitness.scoring import _eval_mode, _model_device, _takes_logits_to_keep, stop_token_ids

if TYPE_CHECKING:
    from fitness.slices import EncodedSlice


@dataclass(frozen=True)
class GeneratedAnswer:
    """One example's generated text and its verdict."""

    completion: str  # cut at the first stop string, stripped
    extracted: str | None  # what the comparison saw (None: the pattern did not match)
    verdict: float  # 1.0 or 0.0


def generate_slice(model: PreTrainedModel, data: EncodedSlice,
                   device: torch.device | str | None = None) -> list[GeneratedAnswer]:
    """Decode every example of a generation slice and judge it; example (file) order."""
    plan = data.generation
    if plan is None:
        raise ValueError(f"task {data.task!r} is not a generation task")
    completions = greedy_generate(
        model, [e.prompt_ids for e in data.examples], tokenizer=plan.tokenizer,
        max_new_tokens=plan.spec.max_new_tokens, stops=plan.spec.stop, end_ids=end_token_ids(model, plan.tokenizer),
        pad_id=plan.pad_id, batch_size=plan.batch_size, device=device,
    )
    answers = []
    for text, gold in zip(completions, plan.golds, strict=True):
        value, extracted = verdict(plan.spec, text, gold)
        answers.append(GeneratedAnswer(text, extracted, value))
    return answers


def generation_records(data: EncodedSlice, answers: Sequence[GeneratedAnswer]) -> list[dict[str, object]]:
    """One JSON-ready record per example: where it came from, what was asked, answered and judged."""
    return [
        {"task": data.task, "split": data.split, "file": str(example.file), "row": example.row,
         "prompt": example.prompt, "answer": example.answer, "completion": answer.completion,
         "extracted": answer.extracted, "verdict": answer.verdict}
        for example, answer in zip(data.examples, answers, strict=True)
    ]


def end_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokenizer's eos plus the model's ``generation_config.eos_token_id`` (what generate stops on)."""
    return stop_token_ids(model, tokenizer.eos_token_id)


def greedy_generate(model: PreTrainedModel, prompts: Sequence[Sequence[int]], *,
                    tokenizer: PreTrainedTokenizerBase, max_new_tokens: int, stops: Sequence[str],
                    end_ids: Sequence[int], pad_id: int, batch_size: int,
                    device: torch.device | str | None = None) -> list[str]:
    """Greedy completions of ``prompts`` (token ids), batched with a KV cache; prompt order."""
    target = torch.device(device) if device is not None else _model_device(model)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # little padding per batch
    texts = [""] * len(prompts)
    with _eval_mode(model), torch.inference_mode():
        for start in range(0, len(order), batch_size):
            members = order[start: start + batch_size]
            batch = _generate_batch(model, [prompts[i] for i in members], tokenizer, max_new_tokens,
                                    tuple(stops), end_ids, pad_id, target)
            for index, text in zip(members, batch, strict=True):
                texts[index] = text
    return texts


def _generate_batch(model: PreTrainedModel, prompts: Sequence[Sequence[int]], tokenizer: PreTrainedTokenizerBase,
                    max_new_tokens: int, stops: tuple[str, ...], end_ids: Sequence[int], pad_id: int,
                    device: torch.device) -> list[str]:
    rows = len(prompts)
    width = max(len(p) for p in prompts)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((rows, width), dtype=torch.long)
    for row, prompt in enumerate(prompts):  # left padding: every row's next token is in the last column
        input_ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        attention_mask[row, width - len(prompt):] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # as if each row were alone
    ends = torch.tensor(list(end_ids), dtype=torch.long, device=device)
    keep_last = {"logits_to_keep": 1} if _takes_logits_to_keep(model) else {}
    cache_key = _cache_argument(model)
    generated: list[list[int]] = [[] for _ in range(rows)]
    texts: list[str | None] = [None] * rows  # set when the row stops
    cache = None
    for _ in range(max_new_tokens):
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=True, **{cache_key: cache}, **keep_last)
        cache = out.cache if cache_key == "cache" else out.past_key_values
        next_ids = out.logits[:, -1].argmax(dim=-1)
        ended = torch.isin(next_ids, ends).tolist()
        for row, token in enumerate(next_ids.tolist()):
            if texts[row] is not None:
                continue
            if ended[row]:
                texts[row] = _finish(tokenizer, generated[row], stops)
                continue
            generated[row].append(token)
            if stops:
                text, stopped = cut_at_stop(tokenizer.decode(generated[row], skip_special_tokens=True), stops)
                if stopped:
                    texts[row] = text.strip()
        if all(text is not None for text in texts):
            break  # early exit: every row has stopped
        input_ids = next_ids.unsqueeze(1)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((rows, 1))], dim=1)
        position_ids = position_ids[:, -1:] + 1
    return [text if text is not None else _finish(tokenizer, generated[row], stops) for row, text in enumerate(texts)]


def _finish(tokenizer: PreTrainedTokenizerBase, tokens: Sequence[int], stops: tuple[str, ...]) -> str:
    text, _ = cut_at_stop(tokenizer.decode(list(tokens), skip_special_tokens=True), stops)
    return text.strip()


def _cache_argument(model: PreTrainedModel) -> str:
    """``cache`` (transformers 5.2x) or ``past_key_values`` (older models): what ``forward`` names it."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


class _StopOnText(StoppingCriteria):
    """Stops a one-row ``generate`` once its decoded continuation holds a stop string."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_length: int, stops: tuple[str, ...]) -> None:
        self.tokenizer, self.prompt_length, self.stops = tokenizer, prompt_length, stops

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> torch.BoolTensor:
        text = self.tokenizer.decode(input_ids[0, self.prompt_length:].tolist(), skip_special_tokens=True)
        stopped = any(stop in text for stop in self.stops)
        return torch.full((input_ids.shape[0],), stopped, dtype=torch.bool, device=input_ids.device)


def reference_generate(model: PreTrainedModel, prompts: Sequence[Sequence[int]], *,
                       tokenizer: PreTrainedTokenizerBase, max_new_tokens: int, stops: Sequence[str],
                       end_ids: Sequence[int], pad_id: int) -> list[str]:
    """The plain loop: ``model.generate(do_sample=False)`` on one prompt at a time, same stops."""
    device = _model_device(model)
    texts = []
    with _eval_mode(model), torch.inference_mode():
        for prompt in prompts:
            input_ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
            criteria = StoppingCriteriaList([_StopOnText(tokenizer, len(prompt), tuple(stops))] if stops else [])
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=list(end_ids), pad_token_id=pad_id,
                                 stopping_criteria=criteria)
            tokens = out[0, len(prompt):].tolist()
            cut = next((i for i, t in enumerate(tokens) if t in end_ids), len(tokens))
            texts.append(_finish(tokenizer, tokens[:cut], tuple(stops)))
    return texts
