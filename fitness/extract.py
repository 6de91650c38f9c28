"""Generation tasks as plain data: decoding settings, answer extraction, normalisation, verdicts.

Nothing here imports torch (reading a study file stays light); decoding is in
:mod:`fitness.generation`. A generated answer is judged in four steps, each set per task by
the ``[tasks.generate]`` table (:class:`GenerateSpec`):

1. the completion is cut at the first stop string (the stop string itself is cut too), and
   leading / trailing whitespace is stripped;
2. ``extract`` (a regular expression) picks the answer out of it: the first group when the
   pattern has groups, else the whole match; ``extract_match = "last"`` takes the last match
   (e.g. the last number in a worked solution). No match: the verdict is 0. Without
   ``extract`` the whole completion is the answer. With ``extract_gold = true`` the same
   pattern is applied to the gold answer (e.g. a worked gold solution ending ``#### 42``);
3. ``normalize`` (a list, applied in this order to both sides): ``"thousands"`` drops the
   commas, underscores and thin spaces between digit groups (``1,234`` -> ``1234``),
   ``"case"`` lower-cases, ``"punctuation"`` drops punctuation characters, ``"whitespace"``
   collapses runs of whitespace to one space and strips the ends (the default);
4. ``compare``: ``"exact"`` (equal strings), ``"contains"`` (the gold answer occurs in the
   prediction), or ``"numeric"`` (both parse as numbers, after dropping thousands separators
   and a leading ``$``, and differ by at most ``tolerance``). The verdict is 1.0 or 0.0.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fitness.errors import FitnessError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

NORMALIZERS: tuple[str, ...] = ("thousands", "case", "punctuation", "whitespace")
COMPARISONS: tuple[str, ...] = ("exact", "contains", "numeric")
MATCHES: tuple[str, ...] = ("first", "last")

_THOUSANDS = re.compile(r"(?<=\d)[,_\u2009\u202f](?=\d{3}(?!\d))")
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")
_NUMBER = re.compile(r"^[+-]?\$?[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


@dataclass(frozen=True)
class GenerateSpec:
    """How a generation task decodes and judges (the ``[tasks.generate]`` table)."""

    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()  # the row stops at the first one; it is cut from the text
    extract: str | None = None  # regex; None: the whole completion
    extract_match: str = "first"  # first | last
    extract_gold: bool = False  # apply `extract` to the gold answer too
    normalize: tuple[str, ...] = ("whitespace",)
    compare: str = "exact"  # exact | contains | numeric
    tolerance: float = 1e-6  # numeric: largest accepted |prediction - gold|
    fewshot: int = 0  # examples put before every prompt
    fewshot_file: Path | None = None  # where they come from (never a scored row)
    fewshot_seed: int = 0  # which rows: the same for every trial
    fewshot_separator: str = "\n\n"  # between examples (plain prompts)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise FitnessError(f"generate.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        for index, stop in enumerate(self.stop):
            if not isinstance(stop, str) or not stop:
                raise FitnessError(f"generate.stop[{index}] is an empty string (a stop string must have text)")
        if self.extract is not None:
            compile_pattern(self.extract)
        _check_choice("extract_match", self.extract_match, MATCHES)
        _check_choice("compare", self.compare, COMPARISONS)
        for name in self.normalize:
            _check_choice("normalize", name, NORMALIZERS)
        if self.extract_gold and self.extract is None:
            raise FitnessError("generate.extract_gold = true needs generate.extract (the pattern to apply)")
        if not (math.isfinite(self.tolerance) and self.tolerance >= 0):
            raise FitnessError(f"generate.tolerance must be a finite number >= 0, got {self.tolerance}")
        if self.fewshot < 0:
            raise FitnessError(f"generate.fewshot must be >= 0, got {self.fewshot}")
        if self.fewshot and self.fewshot_file is None:
            raise FitnessError("generate.fewshot > 0 needs generate.fewshot_file (the rows to take examples from)")


def _check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise FitnessError(f"generate.{key}: unknown value {value!r} (expected one of {', '.join(allowed)})")


def compile_pattern(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise FitnessError(f"generate.extract: regular expression '{pattern}' does not compile: {exc}") from None


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """``text`` up to the earliest stop string (excluded), and whether one occurred."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


def extract_answer(spec: GenerateSpec, text: str) -> str | None:
    """The answer ``spec.extract`` picks out of ``text`` (``text`` itself without a pattern)."""
    if spec.extract is None:
        return text
    matches = list(compile_pattern(spec.extract).finditer(text))
    if not matches:
        return None
    match = matches[0] if spec.extract_match == "first" else matches[-1]
    return match.group(1) if match.re.groups else match.group(0)


def normalize(spec: GenerateSpec, text: str) -> str:
    for name in spec.normalize:
        if name == "thousands":
            text = _THOUSANDS.sub("", text)
        elif name == "case":
            text = text.lower()
        elif name == "punctuation":
            text = _PUNCTUATION.sub("", text)
        else:  # whitespace
            text = " ".join(text.split())
    return text


def parse_number(text: str) -> float | None:
    """``text`` as a number (thousands separators and a ``$`` allowed), else None."""
    cleaned = _THOUSANDS.sub("", text.strip()).rstrip(".")
    if not _NUMBER.match(cleaned):
        return None
    return float(cleaned.replace("$", ""))


def gold_answer(spec: GenerateSpec, answer: str) -> str | None:
    """The gold answer as compared (extracted when ``extract_gold``, normalised); None: unusable."""
    picked = extract_answer(spec, answer) if spec.extract_gold else answer
    if picked is None:
        return None
    gold = normalize(spec, picked)
    if spec.compare == "numeric" and parse_number(gold) is None:
        return None
    return gold


def gold_problem(spec: GenerateSpec, answer: str) -> str | None:
    """Why a gold answer cannot be judged (for errors naming the row), or None."""
    if spec.extract_gold and extract_answer(spec, answer) is None:
        return f"the pattern '{spec.extract}' (extract_gold = true) does not match it"
    if gold_answer(spec, answer) is None:
        return "it is not a number (compare = \"numeric\")"
    return None


def verdict(spec: GenerateSpec, completion: str, gold: str) -> tuple[float, str | None]:
    """1.0 or 0.0 for a (cut, stripped) completion against a prepared gold answer; the extracted answer."""
    picked = extract_answer(spec, completion)
    if picked is None:
        return 0.0, None
    predicted = normalize(spec, picked)
    if spec.compare == "exact":
        return float(predicted == gold), predicted
    if spec.compare == "contains":
        return float(gold in predicted), predicted
    value, target = parse_number(predicted), parse_number(gold)
    if value is None or target is None:
        return 0.0, predicted
    return float(abs(value - target) <= spec.tolerance), predicted


@dataclass(frozen=True, eq=False)
class GenerationPlan:
    """What a generation slice needs besides its prompts: settings, tokenizer, prepared gold answers."""

    spec: GenerateSpec
    tokenizer: PreTrainedTokenizerBase
    golds: tuple[str, ...]  # per example, extracted and normalised (see fitness.extract)
    pad_id: int
    batch_size: int

    @classmethod
    def build(cls, spec: GenerateSpec, tokenizer: PreTrainedTokenizerBase, answers: Sequence[str],
              batch_size: int) -> GenerationPlan:
        golds = []
        for answer in answers:
            gold = gold_answer(spec, answer)
            # a gold answer that cannot be judged is refused by load_task / check_task first
            golds.append("\0unusable" if gold is None else gold)
        pad = next((int(t) for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
        return cls(spec=spec, tokenizer=tokenizer, golds=tuple(golds), pad_id=pad, batch_size=batch_size)
