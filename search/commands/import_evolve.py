"""``search import-evolve EVOLVE.yml -o study.toml``: a mergekit-evolve config as a study file.

The format is mergekit 0.1.5's ``mergekit/evo/config.py`` (``EvolMergeConfiguration``:
``genome``, ``tasks``, ``limit``, ``num_fewshot``, ``shuffle``, ``random_init``,
``apply_chat_template``, ``fewshot_as_multiturn``) and ``mergekit/evo/genome.py``
(``ModelGenomeDefinition``: ``models``, ``merge_method``, ``base_model``,
``tokenizer_source``, ``layer_granularity``, ``normalize``, ``allow_negative_weights``,
``filters``, ``smooth``). mergekit is not imported: the YAML is read as data.

How each key maps (README, "Coming from mergekit-evolve"):
- genome models / base_model -> ``[models]`` (paths relative to the YAML's folder, written
  relative to the study file; the base is ``base_model``, else the first model); a
  task-vector method drops ``base_model`` from the sources (its task vector is zero);
- merge_method -> ``genome.method``; mergekit-evolve's genotype values are |x| (x itself
  with allow_negative_weights), densities clamped to [0, 1] -> ``weight`` bounds [0, 1]
  ([-1, 1]), ``density`` [0, 1]; slerp of two models -> ``t`` [0, 1];
- layer_granularity -> ``layer_granularity`` (0: one group, as in mergekit-evolve);
- normalize -> ``fixed.normalize`` (mergekit-evolve's default: true for linear, ties,
  dare_ties; the study's method default otherwise);
- filters ["self_attn", "mlp"] -> ``per_role`` (attention, mlp and a catch-all gene);
- tasks -> one ``[[tasks]]`` each with ``lm_eval``, ``lm_eval_metric`` (default
  ``acc,none``), ``weight``; ``--task-search-path`` -> ``lm_eval_include``;
- limit -> ``limit`` (documents per split), num_fewshot -> ``lm_eval_num_fewshot``,
  apply_chat_template -> ``chat_template``, fewshot_as_multiturn ->
  ``lm_eval_fewshot_as_multiturn``; the objective is the weighted mean (mergekit-evolve
  maximises the weighted sum: the same order), the sampler CMA-ES.
What has no exact equivalent is listed in the study file's header and printed, with the
reason; nothing is dropped silently. Tasks named like public benchmarks are warned about.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fitness.lm_eval_task import benchmark_warning
from merges.output import write_file
from search.commands import SUMMARIES
from search.errors import SearchError

SIGNATURE = "# mergesearch import-evolve"
METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "slerp")  # mergekit 0.1.5 METHOD_PARAM_MAPS
TASK_VECTOR_METHODS = ("task_arithmetic", "ties", "dare_ties")
NORMALIZED_BY_DEFAULT = ("ties", "dare_ties", "linear")
TOP_KEYS = ("genome", "tasks", "limit", "num_fewshot", "shuffle", "random_init", "apply_chat_template",
            "fewshot_as_multiturn")
GENOME_KEYS = ("models", "merge_method", "base_model", "tokenizer_source", "layer_granularity", "normalize",
               "allow_negative_weights", "filters", "smooth")
ROLE_FILTERS = {"self_attn": "attention", "attn": "attention", "attention": "attention", "mlp": "mlp"}
DEFAULT_TRIALS = 100


class ImportEvolveError(SearchError):
    """The mergekit-evolve config cannot be read; names the YAML key."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "import-evolve",
        help=SUMMARIES["import-evolve"],
        description=(
            "Convert a mergekit-evolve config (mergekit 0.1.5: genome, tasks, limit, num_fewshot, "
            "shuffle, apply_chat_template, fewshot_as_multiturn) into a study file. What the study "
            "cannot express exactly is listed with the reason in the file's header and on stderr. "
            "Tasks named like public benchmarks get a loud warning. Never replaces a file it did "
            "not write."
        ),
    )
    parser.add_argument("evolve", type=Path, help="the mergekit-evolve config (YAML)")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="FILE", help="the study file to write")
    parser.add_argument("--task-search-path", type=Path, default=None, metavar="DIR",
                        help="mergekit-evolve's --task-search-path: a folder of lm-eval task YAMLs "
                             "(becomes lm_eval_include of every task)")
    parser.add_argument("--trials", type=int, default=DEFAULT_TRIALS, metavar="N",
                        help=f"study.trials (mergekit-evolve's --max-fevals; default {DEFAULT_TRIALS})")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.trials < 0:
        raise ImportEvolveError(f"--trials: expected an integer >= 0, got {args.trials}")
    conversion = convert_file(args.evolve, args.output, task_search_path=args.task_search_path, trials=args.trials)
    write_file(args.output, conversion.text, signature=SIGNATURE)
    for warning in conversion.warnings:
        print(f"WARNING: {warning}", file=sys.stderr)
    for item in conversion.not_expressed:
        print(f"not expressed: {item}", file=sys.stderr)
    print(f"wrote {args.output} ({len(conversion.not_expressed)} thing(s) not expressed exactly, listed above "
          f"and in its header); check it with: search validate {args.output}")
    return 0


@dataclass
class Conversion:
    text: str  # the study file
    not_expressed: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def convert_file(evolve: Path, output: Path, *, task_search_path: Path | None = None,
                 trials: int = DEFAULT_TRIALS) -> Conversion:
    import yaml

    try:
        data = yaml.safe_load(evolve.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ImportEvolveError(f"{evolve}: cannot read the mergekit-evolve config: {exc}") from None
    except yaml.YAMLError as exc:
        raise ImportEvolveError(f"{evolve}: YAML syntax error: {exc}") from None
    if not isinstance(data, dict):
        raise ImportEvolveError(f"{evolve}: expected a mapping with genome and tasks, got {type(data).__name__}")
    return _Converter(evolve, output, task_search_path, trials).convert(data)


def _toml(value: object) -> str:
    """A TOML literal for a str / bool / int / float (JSON's string escapes are TOML's)."""
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return json.dumps(value)
    raise TypeError(value)


def _relative(path: Path, folder: Path) -> str:
    """``path`` relative to the study file's folder when they share more than the root, else absolute."""
    import os

    common = Path(os.path.commonpath([path, folder]))
    return os.path.relpath(path, folder) if common != Path(common.anchor) else str(path)


def _label(text: str, taken: set[str]) -> str:
    label = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_-") or "model"
    if not re.match(r"[A-Za-z_]", label):
        label = f"m_{label}"
    if label in ("base", "best"):
        label = f"{label}_model"
    unique, n = label, 2
    while unique in taken:
        unique, n = f"{label}_{n}", n + 1
    taken.add(unique)
    return unique


class _Converter:
    def __init__(self, evolve: Path, output: Path, task_search_path: Path | None, trials: int) -> None:
        self.evolve = evolve
        self.yaml_dir = evolve.resolve().parent
        self.study_dir = Path(output).expanduser().resolve().parent
        self.task_search_path = task_search_path
        self.trials = trials
        self.not_expressed: list[str] = []
        self.warnings: list[str] = []

    def error(self, key: str, message: str) -> ImportEvolveError:
        return ImportEvolveError(f"{self.evolve}: {key}: {message}")

    def skip(self, key: str, reason: str) -> None:
        self.not_expressed.append(f"{key}: {reason}")

    def path(self, ref: object, key: str) -> str:
        """A model reference as a path relative to the study file (as given when not a local folder)."""
        if isinstance(ref, dict):
            model = ref.get("model")
            if ref.get("lora"):
                self.skip(key, f"LoRA {ref['lora']!r} applied to a model: studies merge full checkpoints "
                               "(merge the adapter first, then point at that folder)")
            path = model.get("path") if isinstance(model, dict) else model
        else:
            path = ref
        if not isinstance(path, str) or not path:
            raise self.error(key, f"expected a model path or id, got {ref!r}")
        if "+" in path and not Path(path).exists():
            path, _, lora = path.partition("+")
            self.skip(key, f"LoRA {lora!r} applied to a model: studies merge full checkpoints "
                           "(merge the adapter first, then point at that folder)")
        local = (self.yaml_dir / path).resolve()
        if local.is_dir():
            return _relative(local, self.study_dir)
        self.skip(key, f"{path!r} is not a local folder (relative to {self.yaml_dir}); written as given: "
                       "studies read local checkpoints, download it and fix the path")
        return path

    def convert(self, data: Mapping[str, object]) -> Conversion:
        for key in data:
            if key not in TOP_KEYS:
                self.skip(str(key), "not a mergekit-evolve 0.1.5 config key; ignored")
        genome = data.get("genome")
        if not isinstance(genome, dict):
            raise self.error("genome", "expected a mapping (models, merge_method, ...)")
        models_lines, genome_lines = self.genome(genome)
        tasks_lines = self.tasks(data)
        header = [
            SIGNATURE + f" from {self.evolve.name}: mergekit-evolve's config as a study file.",
            "# Check it with `search validate`; start it with `search start`.",
        ]
        if self.not_expressed:
            header.append("# Not expressed exactly (the reason after each):")
            header += [f"#   - {item}" for item in self.not_expressed]
        if self.warnings:
            header += [f"# WARNING: {w}" for w in self.warnings]
        name = _label(self.evolve.stem, set())
        study = [
            "[study]", f"name = {_toml(name)}", f"output = {_toml('runs/' + name)}",
            f"trials = {self.trials}              # mergekit-evolve's --max-fevals",
            'sampler = "cmaes"           # mergekit-evolve runs CMA-ES too',
            'objective = "mean"          # the weighted mean: mergekit-evolve maximises the weighted sum',
        ]
        execution = ["[execution]", 'backend = "inline"          # "ray" with workers = N runs trials in parallel']
        text = "\n".join(header + [""] + study + [""] + models_lines + [""] + genome_lines + [""] + tasks_lines
                         + [""] + execution) + "\n"
        return Conversion(text, self.not_expressed, self.warnings)

    def genome(self, genome: Mapping[str, object]) -> tuple[list[str], list[str]]:
        for key in genome:
            if key not in GENOME_KEYS:
                self.skip(f"genome.{key}", "not a mergekit-evolve 0.1.5 genome key; ignored")
        method = genome.get("merge_method")
        if method not in METHODS:
            raise self.error("genome.merge_method", f"expected one of {', '.join(METHODS)} (mergekit-evolve's), got {method!r}")
        models = genome.get("models")
        if not isinstance(models, list) or not models:
            raise self.error("genome.models", "expected a list of models")
        paths = [self.path(ref, f"genome.models[{i}]") for i, ref in enumerate(models)]
        base_ref = genome.get("base_model")
        if base_ref is None and method in TASK_VECTOR_METHODS:
            raise self.error("genome.base_model", f"merge_method {method} needs a base_model")
        base = self.path(base_ref, "genome.base_model") if base_ref is not None else paths[0]
        sources = list(paths)
        if method in TASK_VECTOR_METHODS and base in sources:
            sources.remove(base)
            self.skip("genome.models", f"the base_model {base!r} is also listed: its task vector is zero, so it "
                                       "is not a source here (mergekit-evolve still gives it a weight, which only "
                                       "enters the normalisation)")
        if method == "linear" and base_ref is not None and base not in sources:
            self.skip("genome.base_model", "linear takes no base in mergekit; the study's base only supplies the "
                                           "layout and tokenizer, it gets no weight")
        if method == "slerp":
            if base_ref is not None and base not in paths:
                self.skip("genome.base_model", "slerp interpolates between two of genome.models; a separate "
                                               "base_model only supplies the layout here")
                sources = list(paths)
            if len(paths) > 2:
                self.skip("genome.models", f"slerp over {len(paths)} models: mergekit-evolve picks the two "
                                           "highest-weighted per layer group; the study interpolates the first "
                                           "two only (the others are left out)")
            base, sources = paths[0], [p for p in paths[1:2]]
            if len(paths) < 2:
                raise self.error("genome.models", "slerp needs two models")
        if not sources:
            raise self.error("genome.models", "no source model left besides the base")
        taken: set[str] = set()
        models_lines = ["[models]", f"base = {_toml(base)}", 'dtype = "float32"           # mergekit-evolve '
                        'merges in bfloat16; set "bfloat16" to match it', "", "[models.sources]"]
        models_lines += [f"{_label(Path(p).name, taken)} = {_toml(p)}" for p in sources]

        tokenizer = genome.get("tokenizer_source")
        if tokenizer not in (None, "base"):
            self.skip("genome.tokenizer_source", f"{tokenizer!r}: studies keep the base's tokenizer and refuse "
                                                 "sources whose vocabularies differ")
        granularity = genome.get("layer_granularity", 0)
        if not isinstance(granularity, int) or isinstance(granularity, bool) or granularity < 0:
            raise self.error("genome.layer_granularity", f"expected an integer >= 0, got {granularity!r}")
        lines = ["[genome]", f"method = {_toml(method)}",
                 f"layer_granularity = {granularity}" + ("      # 0: one group for all layers" if granularity == 0 else "")]
        filters = genome.get("filters") or []
        if not isinstance(filters, list) or not all(isinstance(f, str) for f in filters):
            raise self.error("genome.filters", f"expected a list of tensor-name filters, got {filters!r}")
        if filters:
            roles = [ROLE_FILTERS.get(f) for f in filters]
            if method == "slerp":
                self.skip("genome.filters", "mergekit-evolve does not filter slerp either")
            elif sorted(r for r in roles if r) == ["attention", "mlp"] and len(filters) == 2:
                lines.append("per_role = true             # genome.filters [self_attn, mlp]: attention, mlp, the rest")
            else:
                lines.append("per_role = true")
                self.skip("genome.filters", f"{filters}: the study's per-role genes are attention, mlp and one for "
                                            "the rest; other filters have no gene of their own")
        if genome.get("smooth"):
            self.skip("genome.smooth", "parameters interpolated across layers: the study searches one value per "
                                       "layer group (use a smaller layer_granularity instead)")
        negative = bool(genome.get("allow_negative_weights", False))
        if method == "slerp":
            lines.append("t = { min = 0.0, max = 1.0 }  # per group, between the base and the source")
            self.skip("genome.merge_method", "slerp's t is searched directly in [0, 1] instead of mergekit-evolve's "
                                             "softmax of two model weights (the same interpolations)")
        else:
            low = -1.0 if negative else 0.0
            lines.append(f"weight = {{ min = {low}, max = 1.0 }}" + ("   # allow_negative_weights" if negative else ""))
            if negative:
                self.skip("genome.allow_negative_weights", "mergekit-evolve's weights are unbounded; the study "
                                                           "searches [-1, 1]")
            if method in ("ties", "dare_ties"):
                lines.append("density = { min = 0.0, max = 1.0 }")
        normalize = genome.get("normalize")
        if normalize is None and method in NORMALIZED_BY_DEFAULT:
            normalize = True
        if normalize is not None and method != "slerp":
            if not isinstance(normalize, bool):
                raise self.error("genome.normalize", f"expected true or false, got {normalize!r}")
            lines.append(f"fixed = {{ normalize = {_toml(normalize)} }}")
        return models_lines, lines

    def tasks(self, data: Mapping[str, object]) -> list[str]:
        tasks = data.get("tasks")
        if not isinstance(tasks, list) or not tasks:
            raise self.error("tasks", "expected a list of lm-eval tasks")
        limit = data.get("limit")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise self.error("limit", f"expected an integer >= 1, got {limit!r}")
        fewshot = data.get("num_fewshot")
        if fewshot is not None and (not isinstance(fewshot, int) or isinstance(fewshot, bool) or fewshot < 0):
            raise self.error("num_fewshot", f"expected an integer >= 0, got {fewshot!r}")
        chat = data.get("apply_chat_template", True)
        multiturn = data.get("fewshot_as_multiturn", True)
        for key, value in (("apply_chat_template", chat), ("fewshot_as_multiturn", multiturn),
                           ("shuffle", data.get("shuffle", False)), ("random_init", data.get("random_init", False))):
            if not isinstance(value, bool):
                raise self.error(key, f"expected true or false, got {value!r}")
        if limit is not None and not data.get("shuffle", False):
            self.skip("shuffle", f"false with limit {limit}: mergekit-evolve scores the first {limit} documents; "
                                 "the study scores a seeded random subset of its search split (split_seed)")
        if data.get("random_init"):
            self.skip("random_init", "CMA-ES's starting point is Optuna's (the bounds' centre), not random")
        include = None
        if self.task_search_path is not None:
            include = _relative(self.task_search_path.expanduser().resolve(), self.study_dir)
        lines: list[str] = []
        taken: set[str] = set()
        for index, raw in enumerate(tasks):
            key = f"tasks[{index}]"
            entry = {"name": raw} if isinstance(raw, str) else raw
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise self.error(key, f"expected a task name or {{name, weight, metric}}, got {raw!r}")
            for extra in entry:
                if extra not in ("name", "weight", "metric"):
                    self.skip(f"{key}.{extra}", "not a mergekit-evolve task key; ignored")
            name = entry["name"]
            weight = entry.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, int | float):
                raise self.error(f"{key}.weight", f"expected a number, got {weight!r}")
            if weight <= 0:
                self.skip(f"{key}.weight", f"{weight:g}: study weights are > 0; the task is left out (a zero or "
                                           "negative weight in mergekit-evolve's sum ignores or penalises it)")
                continue
            metric = entry.get("metric", "acc,none")
            if not isinstance(metric, str):
                raise self.error(f"{key}.metric", f"expected 'metric,filter', got {metric!r}")
            warning = benchmark_warning(name)
            if warning:
                self.warnings.append(warning)
            lines += ["[[tasks]]", f"name = {_toml(_label(name, taken))}", f"lm_eval = {_toml(name)}"]
            if include is not None:
                lines.append(f"lm_eval_include = {_toml(include)}")
            lines += [f"lm_eval_metric = {_toml(metric)}", f"weight = {_toml(float(weight))}"]
            if limit is not None:
                lines.append(f"limit = {limit}                  # documents per split (search / held-out)")
            if fewshot is not None:
                lines.append(f"lm_eval_num_fewshot = {fewshot}")
            lines.append(f"chat_template = {_toml(chat)}")
            if chat:
                lines.append(f"lm_eval_fewshot_as_multiturn = {_toml(multiturn)}")
            lines.append("")
        if not lines:
            raise self.error("tasks", "no task with a positive weight")
        return lines[:-1]
