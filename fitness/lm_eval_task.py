"""lm-eval-harness tasks scored in memory on the trial worker's live merged model.

A ``[[tasks]]`` table with ``lm_eval = "NAME"`` (and ``lm_eval_include = "DIR"`` for task
YAMLs on local disk) is an :class:`LmEvalSpec` on its :class:`~fitness.spec.TaskSpec`.
The worker wraps its live model in lm-eval's ``HFLM`` once (no save, no reload: the
wrapper holds the model the engine merges into) and runs the task through
``lm_eval.evaluator.evaluate`` on one split of the task's documents.

The split: lm-eval has none between search and held-out, so the study defines it by
document index over the task's evaluation documents (its test split, else validation):
a ``random.Random(split_seed)`` permutation of ``range(n_docs)``, the first
``round(n_docs * heldout_fraction)`` indices held out, the rest searched; ``limit`` keeps
the first N of each split in permuted order. Each split is passed sorted as lm-eval's
``samples=`` (its per-document results keep their document index). The split is a pure
function of the document count and those keys, which the study's definition records;
:class:`DocumentSplit` is the split itself, which ``search start`` records on the study
(``search.lm_eval_splits``) in the compact form of :func:`compact_indices` (``"0-3,7,9-12"``).

The metric is ``lm_eval_metric`` (``"acc"`` or with its filter ``"acc,none"``; default:
the task's first, read from its YAML without importing lm-eval); the score is lm-eval's
own aggregate of that metric. ``TaskSpec.metric`` is ``"lm_eval/<metric>"``, whose
direction comes from :data:`LOWER_IS_BETTER` (``search validate`` checks it against
the task's own ``higher_is_better``).

Per-document values: when the task aggregates its metric with lm-eval's registered ``mean``
(:func:`aggregation_name`: ``acc``, ``acc_norm``, ``exact_match``, ... as the task's YAML or
lm-eval's registry sets it), a run keeps the metric's value of every document, in the split's
(sorted) document order: exactly the list lm-eval averages (its logged samples of the metric's
filter), so their mean is the score. Another aggregation (corpus ``bleu``, ``f1``,
``perplexity``, a task's own function) is not a mean of per-document values: no rows, and
:func:`no_rows_reason` says why, naming the metric and its aggregation.

Importing this module imports neither lm-eval nor torch (``search.config`` uses it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import logging
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fitness.errors import FitnessError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from fitness.spec import TaskSpec

LM_EVAL_REQUIREMENT = "lm_eval[hf]==0.4.13"
INSTALL_COMMAND = 'pip install -e ".[lm-eval]"'
METRIC_PREFIX = "lm_eval/"
# lm-eval 0.4.13's metrics registered with higher_is_better=False (lm_eval/api/metrics.py)
LOWER_IS_BETTER: frozenset[str] = frozenset(
    {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "ter", "brier_score"}
)
# lm-eval's defaults when a task YAML has no metric_list (lm_eval/api/registry.py)
DEFAULT_METRICS: dict[str, str] = {
    "loglikelihood": "perplexity", "loglikelihood_rolling": "word_perplexity",
    "multiple_choice": "acc", "generate_until": "exact_match",
}
# mergekit-evolve's NAUGHTY_PREFIXES (mergekit/evo/config.py): well-known public benchmarks
PUBLIC_BENCHMARK_PREFIXES: tuple[str, ...] = (
    "mmlu", "hendrycks", "agieval", "gsm8k", "hellaswag", "winogrande", "arc_", "ai2_arc", "truthfulqa",
    "bigbench", "piqa", "openbookqa", "leaderboard",
)
MEAN_AGGREGATION = "mean"  # lm-eval's registered `mean` (lm_eval/api/metrics.py): sum(values) / len(values)
ROW_FILE_PREFIX = "lm-eval:"  # a row id's "file" for an lm-eval document: lm-eval:<task>:<document index>
FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed (simple_evaluate, the CLI)
SPLITS = ("search", "heldout")


@dataclass(frozen=True)
class LmEvalSpec:
    """What a ``[[tasks]]`` table says about its lm-eval task (``lm_eval_*`` keys)."""

    task: str  # lm_eval: a task name (not a group)
    metric: str  # lm_eval_metric: "acc" or "acc,none" (metric,filter)
    include: Path | None = None  # lm_eval_include: a folder of task YAMLs
    num_fewshot: int | None = None  # lm_eval_num_fewshot; None: the task's own (else 0)
    fewshot_as_multiturn: bool = False  # lm_eval_fewshot_as_multiturn (with chat_template)

    def __post_init__(self) -> None:
        if not self.task.strip():
            raise FitnessError("lm_eval: the task name must not be empty")
        if not self.metric.strip() or self.metric.count(",") > 1:
            raise FitnessError(f"lm_eval_metric: expected 'metric' or 'metric,filter', got {self.metric!r}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise FitnessError(f"lm_eval_num_fewshot: must be >= 0, got {self.num_fewshot}")


def metric_name(spec: LmEvalSpec) -> str:
    """``TaskSpec.metric`` of an lm-eval task."""
    return METRIC_PREFIX + spec.metric


def is_lm_eval_metric(metric: str) -> bool:
    return metric.startswith(METRIC_PREFIX) and len(metric) > len(METRIC_PREFIX)


def lm_eval_higher_is_better(metric: str) -> bool:
    """The direction of ``lm_eval/<metric>[,filter]``."""
    return metric.removeprefix(METRIC_PREFIX).split(",")[0] not in LOWER_IS_BETTER


def benchmark_warning(task: str) -> str | None:
    """A loud warning when ``task`` is a well-known public benchmark (not its ``_train`` variant)."""
    if task.endswith("_train") or not task.startswith(PUBLIC_BENCHMARK_PREFIXES):
        return None
    return (
        f"lm-eval task {task!r} is a public benchmark: searching on its test documents tunes the merge "
        "to the benchmark, and the study's held-out split and gates then measure the benchmark, not "
        "the release. Report its score only from a run that did not search on it"
    )


def lm_eval_installed() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def require_lm_eval(where: str) -> None:
    """Raise with the install command unless lm-eval (with the hf extra's packages) imports."""
    missing = [name for name in ("lm_eval", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise FitnessError(
            f"{where}: lm-eval tasks need {LM_EVAL_REQUIREMENT} ({', '.join(missing)} not installed); "
            f"install it with: {INSTALL_COMMAND}"
        )


# -- the task's first metric, read from its YAML (no lm-eval import) --------------------------


def default_metric(task: str, include: Path | None) -> str | None:
    """The first metric of ``task``'s YAML (``include`` first, then lm-eval's own tasks); None if not found.

    Follows ``include:`` chains; a YAML without ``metric_list`` gets lm-eval's default for its
    ``output_type``. Reads files as text: lm-eval itself is not imported.
    """
    roots = [include] if include is not None else []
    spec = importlib.util.find_spec("lm_eval")
    if spec is not None and spec.submodule_search_locations:
        roots.append(Path(next(iter(spec.submodule_search_locations))) / "tasks")
    line = re.compile(rf"^task:\s*['\"]?{re.escape(task)}['\"]?\s*(#.*)?$", re.MULTILINE)
    for root in roots:
        for path in _yaml_files(root):
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            if line.search(text):
                metric = _first_metric(path, set())
                if metric is not None:
                    return metric
    return None


def _yaml_files(root: Path) -> Iterator[Path]:
    if not root.is_dir():
        return iter(())
    return iter(sorted(p for p in root.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file()))


def _first_metric(path: Path, seen: set[Path]) -> str | None:
    import yaml

    class Loader(yaml.SafeLoader):  # lm-eval YAMLs hold !function tags: read them as None
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    if path in seen or not path.is_file():
        return None
    seen.add(path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)  # noqa: S506 (a safe loader)
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(data, dict):
        return None
    metrics = data.get("metric_list")
    if isinstance(metrics, list) and metrics and isinstance(metrics[0], dict) and metrics[0].get("metric"):
        return str(metrics[0]["metric"])
    parent = data.get("include")
    if isinstance(parent, str):
        found = _first_metric((path.parent / parent).resolve(), seen)
        if found is not None:
            return found
    output_type = data.get("output_type")
    return DEFAULT_METRICS.get(output_type) if isinstance(output_type, str) else None


# -- the split -----------------------------------------------------------------------------


def split_documents(n_docs: int, *, seed: int, heldout_fraction: float, limit: int | None,
                    where: str = "lm_eval") -> dict[str, list[int]]:
    """Search and held-out document indices (each sorted, disjoint); see the module docstring."""
    order = list(range(n_docs))
    random.Random(seed).shuffle(order)
    n_heldout = round(n_docs * heldout_fraction)
    heldout, search = order[:n_heldout], order[n_heldout:]
    if not heldout or not search:
        raise FitnessError(
            f"{where}: {n_docs} documents cannot be split with heldout_fraction {heldout_fraction:g} "
            "(both splits need at least one document)"
        )
    if limit is not None:
        heldout, search = heldout[:limit], search[:limit]
    return {"search": sorted(search), "heldout": sorted(heldout)}


def compact_indices(indices: Sequence[int]) -> str:
    """Sorted distinct indices as ranges: ``[0, 1, 2, 3, 7, 9, 10]`` -> ``"0-3,7,9-10"`` (``""``: none)."""
    parts: list[str] = []
    start = previous = None
    for index in indices:
        if previous is not None and index <= previous:
            raise ValueError(f"indices must be sorted and distinct, got {index} after {previous}")
        if previous is None or index != previous + 1:
            if start is not None:
                parts.append(str(start) if start == previous else f"{start}-{previous}")
            start = index
        previous = index
    if start is not None:
        parts.append(str(start) if start == previous else f"{start}-{previous}")
    return ",".join(parts)


def expand_indices(text: str) -> list[int]:
    """The inverse of :func:`compact_indices`; a ``FitnessError`` for text it did not write."""
    indices: list[int] = []
    for part in filter(None, text.split(",")):
        low, _, high = part.partition("-")
        try:
            first, last = int(low), int(high or low)
        except ValueError:
            raise FitnessError(f"document indices: {part!r} in {text!r} is not N or N-M") from None
        if first > last or (indices and first <= indices[-1]):
            raise FitnessError(f"document indices: {part!r} in {text!r} is out of order")
        indices.extend(range(first, last + 1))
    return indices


@dataclass(frozen=True)
class DocumentSplit:
    """The study's split of one lm-eval task's evaluation documents (sorted document indices)."""

    task: str  # the lm-eval task's name
    documents: int  # how many evaluation documents the task has
    search: tuple[int, ...]
    heldout: tuple[int, ...]
    # the scored metric (metric,filter) and lm-eval's aggregation of it (aggregation_name); None
    # in a split recorded before they were kept. Not part of the split: a resume compares documents.
    metric: str | None = field(default=None, compare=False)
    aggregation: str | None = field(default=None, compare=False)

    def to_attr(self) -> dict[str, object]:
        """The compact JSON form a study stores."""
        aggregated = {} if self.aggregation is None else {"metric": self.metric, "aggregation": self.aggregation}
        return {"lm_eval": self.task, "documents": self.documents,
                "search": compact_indices(self.search), "heldout": compact_indices(self.heldout), **aggregated}

    @classmethod
    def from_attr(cls, value: Mapping[str, object]) -> DocumentSplit:
        try:
            metric, aggregation = value.get("metric"), value.get("aggregation")
            return cls(str(value["lm_eval"]), int(value["documents"]),  # type: ignore[call-overload]
                       tuple(expand_indices(str(value["search"]))), tuple(expand_indices(str(value["heldout"]))),
                       None if metric is None else str(metric), None if aggregation is None else str(aggregation))
        except (KeyError, TypeError, ValueError) as exc:
            raise FitnessError(f"a stored lm-eval document split is malformed ({exc}): {value!r}") from None

    def describe(self, name: str) -> str:
        """``lm-eval task NAME (TASK): N search docs, M held-out docs (of D)``."""
        return (f"lm-eval task {name} ({self.task}): {len(self.search)} search docs, "
                f"{len(self.heldout)} held-out docs (of {self.documents})")

    def no_rows_reason(self, name: str) -> str | None:
        """Why task ``name`` keeps no per-document values (:func:`no_rows_reason`); None when it
        keeps them or the split was recorded before aggregations were."""
        if self.metric is None or self.aggregation is None:
            return None
        return no_rows_reason(name, self.metric, self.aggregation)


def _task_split(spec: TaskSpec, n_docs: int, key: str | None = None, aggregation: str | None = None) -> DocumentSplit:
    lm = spec.lm_eval
    assert lm is not None
    split = split_documents(n_docs, seed=spec.split_seed, heldout_fraction=spec.heldout_fraction,
                            limit=spec.limit, where=f"task {spec.name!r}")
    return DocumentSplit(lm.task, n_docs, tuple(split["search"]), tuple(split["heldout"]), key, aggregation)


def aggregation_name(task: Any, key: str) -> str:
    """How lm-eval aggregates ``key``'s metric (``metric,filter``) on ``task``: the name its
    aggregation registry gives the task's function (``"mean"``, ``"perplexity"``, ``"bleu"``,
    ``"f1"``, ...), or, for a function of the task's own, its qualified name."""
    from lm_eval.api.registry import aggregation_registry

    function = task.aggregation()[key.split(",")[0]]
    for name in aggregation_registry:  # aliases
        if aggregation_registry.get(name) is function:
            return str(name)
    return str(getattr(function, "__qualname__", function))


def no_rows_reason(name: str, key: str, aggregation: str) -> str | None:
    """Why task ``name``'s score has no per-document values (None: lm-eval averages them)."""
    if aggregation == MEAN_AGGREGATION:
        return None
    return (f"task {name!r}: lm-eval aggregates its metric {key} with {aggregation!r}, "
            "not a mean of per-document values")


class _Indices(list):  # type: ignore[type-arg]
    """A sorted index list with a set's ``in``: lm-eval filters documents by ``i in samples``."""

    def __init__(self, values: Sequence[int]) -> None:
        super().__init__(values)
        self._set = frozenset(values)

    def __contains__(self, value: object) -> bool:
        return value in self._set


# -- loading and running -------------------------------------------------------------------


def task_manager(spec: LmEvalSpec) -> Any:
    """An lm-eval ``TaskManager`` that knows ``spec.task`` (the include folder alone when it has it)."""
    from lm_eval.tasks import TaskManager

    if spec.include is not None:
        manager = TaskManager(include_path=str(spec.include), include_defaults=False)
        if spec.task in manager.all_tasks:
            return manager
        return TaskManager(include_path=str(spec.include))
    return TaskManager()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval's progress bars and per-call info lines would flood every trial's output."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def load_lm_eval_task(spec: TaskSpec, where: str | None = None) -> tuple[Any, list[str]]:
    """lm-eval's ``Task`` object of ``spec`` and its result keys (``metric,filter``), or a named error."""
    lm = spec.lm_eval
    assert lm is not None
    where = where or f"task {spec.name!r}"
    require_lm_eval(where)
    with _quiet():
        manager = task_manager(lm)
        if lm.task not in manager.all_tasks:
            import difflib

            close = difflib.get_close_matches(lm.task, manager.all_tasks, n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
            place = f" in {lm.include} or lm-eval's own tasks" if lm.include else " among lm-eval's tasks"
            raise FitnessError(f"{where}: lm_eval: unknown task {lm.task!r}{place}{hint}")
        if lm.task in manager.all_groups or lm.task in manager.all_tags:
            raise FitnessError(
                f"{where}: lm_eval: {lm.task!r} is a group of tasks; name one task per [[tasks]] table"
            )
        try:
            loaded = manager.load([lm.task])
        except Exception as exc:  # a dataset that cannot be read, a YAML lm-eval refuses
            raise FitnessError(f"{where}: lm_eval: task {lm.task!r} cannot be loaded: {type(exc).__name__}: {exc}") from None
    task = loaded["tasks"].get(lm.task)
    if task is None:
        raise FitnessError(f"{where}: lm_eval: {lm.task!r} did not load as one task")
    filters = [f.name for f in getattr(task, "_filters", [])] or ["none"]
    keys = [f"{metric},{name}" for name in filters for metric in task.aggregation()]
    return task, keys


def result_key(spec: TaskSpec, keys: Sequence[str], directions: dict[str, bool] | None = None) -> str:
    """The ``metric,filter`` key ``spec``'s metric names among a task's ``keys``; a named error else."""
    lm = spec.lm_eval
    assert lm is not None
    where = f"task {spec.name!r}: lm_eval_metric"
    if "," in lm.metric:
        candidates = [lm.metric] if lm.metric in keys else []
    else:
        candidates = [k for k in keys if k.split(",")[0] == lm.metric]
        if len(candidates) > 1 and f"{lm.metric},none" in candidates:
            candidates = [f"{lm.metric},none"]
    if not candidates:
        raise FitnessError(f"{where}: task {lm.task!r} has no metric {lm.metric!r} (it has: {', '.join(keys)})")
    if len(candidates) > 1:
        raise FitnessError(
            f"{where}: {lm.metric!r} is computed under several filters ({', '.join(candidates)}); name one"
        )
    key = candidates[0]
    if directions is not None:
        theirs = directions.get(key.split(",")[0])
        ours = lm_eval_higher_is_better(spec.metric)
        if theirs is not None and bool(theirs) != ours:
            raise FitnessError(
                f"{where}: task {lm.task!r} says {key.split(',')[0]} is "
                f"{'higher' if theirs else 'lower'}-is-better; mergesearch only knows "
                f"{', '.join(sorted(LOWER_IS_BETTER))} as lower-is-better, so it would optimise the wrong way"
            )
    return key


def document_split(spec: TaskSpec) -> DocumentSplit:
    """What ``LmEvalTask`` would refuse, checked (task, metric, documents); then its split."""
    task, keys = load_lm_eval_task(spec)
    key = result_key(spec, keys, task.higher_is_better())
    try:
        n_docs = len(task.eval_docs)
    except Exception as exc:
        raise FitnessError(f"task {spec.name!r}: lm_eval: task has no test or validation documents: {exc}") from None
    return _task_split(spec, n_docs, key, aggregation_name(task, key))


def check_lm_eval_task(spec: TaskSpec, *, staged: bool = False) -> dict[str, int]:
    """What ``LmEvalTask`` would refuse (``search validate``): documents per split. ``staged``
    (``study.fidelity``): a metric lm-eval does not average cannot be scored in stages."""
    split = document_split(spec)
    reason = split.no_rows_reason(spec.name)
    if staged and reason is not None:
        raise FitnessError(f"{reason}, so it cannot be scored in stages (study.fidelity); "
                           "choose a metric lm-eval averages (lm_eval_metric) or remove study.fidelity")
    return {"search": len(split.search), "heldout": len(split.heldout)}


def wrap_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, batch_size: int) -> Any:
    """lm-eval's ``HFLM`` over the live model (it keeps the reference: later merges are seen)."""
    require_lm_eval("lm-eval tasks")
    with _quiet():
        from lm_eval.models.huggingface import HFLM

        class TokenCachingHFLM(HFLM):
            """HFLM that tokenises each (context, continuation) pair once per worker.

            The prompts are the same every trial and the tokenizer never changes, while
            tokenising them again was about a third of a log-likelihood task's time.
            """

            _pairs: dict[tuple[str, str], tuple[list[int], list[int]]]

            def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
                cache = self.__dict__.setdefault("_pairs", {})
                key = (context, continuation)
                if key not in cache:
                    cache[key] = super()._encode_pair(context, continuation)
                context_enc, continuation_enc = cache[key]
                return list(context_enc), list(continuation_enc)  # copies: callers own their lists

        return TokenCachingHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


@dataclass
class LmEvalResult:
    score: float
    samples: list[dict[str, Any]]  # lm-eval's logged per-document records (log_samples)
    # the metric's value per document, in the split's document order (what lm-eval averages);
    # None when its aggregation is not the mean
    rows: list[float] | None = None


class LmEvalTask:
    """One lm-eval task of a worker: the loaded ``Task``, its split and result key."""

    def __init__(self, spec: TaskSpec, lm: Any) -> None:
        self.spec = spec
        self.lm = lm
        self.task, keys = load_lm_eval_task(spec)
        self.key = result_key(spec, keys, self.task.higher_is_better())
        lm_spec = spec.lm_eval
        assert lm_spec is not None
        if lm_spec.num_fewshot is not None and self.task.get_config("num_fewshot") != 0:
            self.task.set_config(key="num_fewshot", value=lm_spec.num_fewshot)
        elif self.task.get_config("num_fewshot") is None:
            self.task.set_config(key="num_fewshot", value=0)
        self.aggregation = aggregation_name(self.task, self.key)
        self.per_row = self.aggregation == MEAN_AGGREGATION  # keep each document's value
        self.documents = _task_split(spec, len(self.task.eval_docs), self.key, self.aggregation)
        self.split = {"search": list(self.documents.search), "heldout": list(self.documents.heldout)}
        self._docs_as_list()
        self._build_requests_once()

    def _docs_as_list(self) -> None:
        """Hold the evaluation documents as a list: lm-eval walks all of them on every call to
        pick ``samples=``, and iterating a ``datasets.Dataset`` decodes each row again."""
        task = self.task
        name = "test_docs" if task.has_test_docs() else "validation_docs"
        docs = list(getattr(task, name)())
        setattr(task, name, lambda: docs)

    def _build_requests_once(self) -> None:
        """Build each split's requests once, not per trial.

        A trial changes the model, never the prompts: lm-eval's ``evaluate`` rebuilds every
        request (Jinja templates, few-shot contexts) on each call, a large share of a small
        task's time. The task's ``build_all_requests`` is shadowed on this instance: the first
        call per document set builds as lm-eval does, later calls reuse those ``Instance``s
        with their responses cleared (the correctness test checks results stay identical).
        """
        task = self.task
        build = task.build_all_requests
        built: dict[tuple[int, ...], list[Any]] = {}
        whole = tuple(self.split["search"])
        at = {doc: position for position, doc in enumerate(whole)}
        splits = {tuple(documents) for documents in self.split.values()}

        def build_all_requests(**kwargs: Any) -> None:
            key = tuple(kwargs.get("samples") or ())
            if key not in built and key and key not in splits and all(doc in at for doc in key):
                # A stage (some search documents): the search split's own requests for them, so
                # their few-shot contexts are the ones a full run gives (the few-shot generator
                # advances document by document: building the subset alone would draw others).
                if whole not in built:
                    self.task.set_fewshot_seed(seed=FEWSHOT_SEED)
                    build(**{**kwargs, "samples": _Indices(whole)})
                    built[whole] = list(task._instances)
                if len(built) > 64:  # resumed trials' odd stages: keep the cache small
                    for stale in [k for k in built if k not in splits]:
                        del built[stale]
                rank = {at[doc]: new_id for new_id, doc in enumerate(key)}  # lm-eval's doc_id: position in samples
                built[key] = [dataclasses.replace(instance, resps=[], filtered_resps={},
                                                  metadata=(instance.task_name, rank[instance.doc_id], instance.repeats))
                              for instance in built[whole] if instance.doc_id in rank]
            if key not in built:
                build(**kwargs)
                built[key] = list(task._instances)
                return
            for instance in built[key]:
                instance.resps = []
                instance.filtered_resps = {}
            task._instances = list(built[key])

        task.build_all_requests = build_all_requests

    def score(self, split: str) -> float:
        return self.run(split).score

    def row_ids(self, split: str) -> list[tuple[str, int]] | None:
        """What identifies each per-document value of ``split`` (``search.records.row_ids``'s
        ``(file, row)``: ``("lm-eval:<task>", document index)``); None without per-document values."""
        if not self.per_row or split not in self.split:
            return None
        return [(f"{ROW_FILE_PREFIX}{self.documents.task}", index) for index in self.split[split]]

    def run(self, split: str, *, log_samples: bool = False, rows: Sequence[int] | None = None) -> LmEvalResult:
        """lm-eval's aggregate of the metric on ``split``'s documents (the model as merged now),
        with each document's value when the aggregation is the mean (the module docstring).

        ``rows`` (a multi-fidelity stage): only these documents, by position in the search
        split, in the order wanted; ``rows`` of the result then follow that order, and the score
        is lm-eval's mean of them. Their requests are the search split's own (the few-shot
        contexts a full run gives them).
        """
        from lm_eval.evaluator import evaluate

        name = self.spec.lm_eval.task  # type: ignore[union-attr]
        documents = self.split[split]
        if rows is not None:
            if split != "search" or not self.per_row:
                raise FitnessError(f"task {self.spec.name!r}: only the search split of a task whose metric lm-eval "
                                   f"averages can be scored in stages ({split!r}, {self.aggregation!r})")
            if len(set(rows)) != len(rows) or not all(0 <= r < len(documents) for r in rows):
                raise FitnessError(f"task {self.spec.name!r}: stage rows must be distinct positions in the "
                                   f"{len(documents)} search documents")
            documents = sorted(documents[r] for r in rows)
        # The few-shot sampler's generator advances with each use: reseed it so every trial
        # sees the same few-shot examples (as each fresh `lm_eval` run does).
        self.task.set_fewshot_seed(seed=FEWSHOT_SEED)
        with _quiet():
            results = evaluate(
                lm=self.lm, task_dict={"tasks": {name: self.task}, "groups": {}},
                samples={name: _Indices(documents)}, bootstrap_iters=0,
                log_samples=log_samples or self.per_row, apply_chat_template=self.spec.chat_template,
                fewshot_as_multiturn=self.spec.lm_eval.fewshot_as_multiturn,  # type: ignore[union-attr]
            )
        value = results["results"][name].get(self.key)
        if value is None:
            raise FitnessError(f"task {self.spec.name!r}: lm-eval returned no {self.key!r}")
        logged = list(results.get("samples", {}).get(name, []))
        values = self._rows(logged, split, documents) if self.per_row else None
        if values is not None and rows is not None:  # document order -> the order asked for
            by_document = dict(zip(documents, values, strict=True))
            values = [by_document[self.split[split][r]] for r in rows]
        return LmEvalResult(float(value), logged if log_samples else [], values)

    def _rows(self, logged: Sequence[Mapping[str, Any]], split: str, documents: Sequence[int]) -> list[float]:
        """The metric's value of every document (its filter's logged samples, in document order):
        the very values lm-eval's ``mean`` summed, each logged sample holding them by metric name."""
        metric, filter_key = self.key.split(",", 1)
        mine = [sample for sample in logged if sample.get("filter") == filter_key]
        if [sample.get("doc_id") for sample in mine] != list(documents):
            raise FitnessError(f"task {self.spec.name!r}: lm-eval logged other documents than the {split} split's "
                               f"{len(documents)} for {self.key!r}")
        try:
            return [float(sample[metric]) for sample in mine]
        except (KeyError, TypeError, ValueError) as exc:
            raise FitnessError(f"task {self.spec.name!r}: lm-eval logged no number for {self.key!r} "
                               f"per document ({type(exc).__name__}: {exc})") from None


def load_lm_eval_tasks(specs: Sequence[TaskSpec], model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                       *, batch_size: int) -> dict[str, LmEvalTask]:
    """The worker's lm-eval tasks, sharing one ``HFLM`` over ``model``."""
    if not specs:
        return {}
    lm = wrap_model(model, tokenizer, batch_size=batch_size)
    return {spec.name: LmEvalTask(spec, lm) for spec in specs}
