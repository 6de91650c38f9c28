"""What a study scores, as plain data: metric names and directions, user scorers, ``TaskSpec``.

Nothing here imports torch, transformers or datasets, so reading a study file (and the
light commands ``status``, ``export``, ``dashboard``) stays light. The metrics' arithmetic
is in :mod:`fitness.metrics` (its docstring says what each metric computes, and a user
scorer's signature); loading and tokenising a task's rows is in :mod:`fitness.slices`.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fitness.errors import FitnessError
from fitness.extract import GenerateSpec
from fitness.gates import GateSpec
from fitness.lm_eval_task import (
    LmEvalSpec,
    is_lm_eval_metric,
    lm_eval_higher_is_better,
    metric_name,
)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from fitness.slices import EncodedBatch, SliceExample

BUILTIN_METRICS: tuple[str, ...] = ("exact_match", "choice", "choice_norm", "loglik", "perplexity", "generate")
CHOICE_METRICS: tuple[str, ...] = ("choice", "choice_norm")
SPLITS: tuple[str, ...] = ("search", "heldout")  # every task's two slices; trials are scored on one
TEST_SPLIT = "test"  # optional third slice (TaskSpec.test): only the final recipe is scored on it, once
LOWER_IS_BETTER: frozenset[str] = frozenset({"perplexity"})
# data file suffix -> the `datasets` loader that reads it
FORMATS: dict[str, str] = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}

UserScorer = Callable[["PreTrainedModel", "EncodedBatch", Sequence["SliceExample"]],
                      "Sequence[float] | torch.Tensor"]


def is_user_metric(metric: str) -> bool:
    return metric not in BUILTIN_METRICS and ":" in metric


def check_metric_name(metric: str, where: str) -> None:
    """Raise unless ``metric`` is a built-in name, ``lm_eval/<metric>`` or has the ``module:function`` shape."""
    if metric in BUILTIN_METRICS or is_lm_eval_metric(metric):
        return
    if ":" in metric:
        module, _, function = metric.partition(":")
        if module.strip() and function.strip() and ":" not in function:
            return
        raise FitnessError(f"{where}: metric {metric!r} is not of the form 'package.module:function'")
    raise FitnessError(
        f"{where}: unknown metric {metric!r} (expected one of {', '.join(BUILTIN_METRICS)} "
        "or 'package.module:function')"
    )


def load_user_scorer(metric: str) -> UserScorer:
    """Import the ``module:function`` scorer; errors name the module or the function."""
    check_metric_name(metric, "metric")
    module_name, _, function_name = metric.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:  # includes ModuleNotFoundError
        raise FitnessError(f"metric {metric!r}: cannot import module {module_name!r}: {exc}") from exc
    function = getattr(module, function_name, None)
    if function is None:
        raise FitnessError(f"metric {metric!r}: module {module_name!r} has no attribute {function_name!r}")
    if not callable(function):
        raise FitnessError(f"metric {metric!r}: {module_name}.{function_name} is not callable")
    return function


def higher_is_better(metric: str) -> bool:
    """The direction of ``metric``; user scorers may say ``higher_is_better = False``."""
    check_metric_name(metric, "metric")
    if is_lm_eval_metric(metric):
        return lm_eval_higher_is_better(metric)
    if not is_user_metric(metric):
        return metric not in LOWER_IS_BETTER
    flag = getattr(load_user_scorer(metric), "higher_is_better", True)
    if not isinstance(flag, bool):
        raise FitnessError(f"metric {metric!r}: attribute higher_is_better must be a bool, got {flag!r}")
    return flag


@dataclass(frozen=True)
class TaskSpec:
    name: str
    search: Path  # file (jsonl/csv/parquet) or a folder of them
    heldout: Path | None = None  # None: split `search` by heldout_fraction, seeded
    heldout_fraction: float = 0.5
    split_seed: int = 0
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    choices_field: str | None = None  # for metric "choice": a list of option strings
    label_field: str | None = None  # index of the right choice (default: the answer's index)
    metric: str = "exact_match"  # exact_match | choice | choice_norm | loglik | perplexity | "module:function"
    weight: float = 1.0
    limit: int | None = None  # a seeded subset of N rows of each split (fitness/subset.py)
    chat_template: bool = False  # wrap prompts with the base tokenizer's chat template
    gates: tuple[GateSpec, ...] = ()
    answer_separator: str | None = None  # None: " " (plain prompts) or "" (chat template)
    add_bos: bool | None = None  # None: decided from the tokenizer (see the module docstring)
    # metric "generate" (or a user scorer that also reads generated text): fitness.extract
    generate: GenerateSpec | None = None
    lm_eval: LmEvalSpec | None = None  # an lm-eval task (fitness.lm_eval_task); its metric is lm_eval/<name>
    test: Path | None = None  # the test slice no choice looks at (search/test_split.py); None: no test split

    def __post_init__(self) -> None:
        where = f"task {self.name!r}"
        if not self.name:
            raise FitnessError("task: name must not be empty")
        check_metric_name(self.metric, where)
        if (self.lm_eval is not None) != is_lm_eval_metric(self.metric) or (
            self.lm_eval is not None and self.metric != metric_name(self.lm_eval)
        ):
            raise FitnessError(f"{where}: metric {self.metric!r} and lm_eval {self.lm_eval!r} disagree")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise FitnessError(f"{where}: heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if self.limit is not None and self.limit < 1:
            raise FitnessError(f"{where}: limit must be >= 1, got {self.limit}")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise FitnessError(f"{where}: weight must be a finite number > 0, got {self.weight}")
        if self.metric == "generate" and self.generate is None:
            object.__setattr__(self, "generate", GenerateSpec())  # the defaults
        if self.generate is not None and not (self.metric == "generate" or is_user_metric(self.metric)):
            raise FitnessError(f"{where}: a generate table needs metric 'generate' or a user scorer, "
                               f"not {self.metric!r}")
        if self.metric in CHOICE_METRICS and self.choices_field is None:
            raise FitnessError(f"{where}: metric {self.metric!r} needs choices_field")
        for gate in self.gates:
            if gate.task != self.name:
                raise FitnessError(f"{where}: gate for task {gate.task!r} listed under another task")
