"""study.toml -> ``StudyConfig``: every key checked before anything heavy starts.

Each error names the file, the TOML key path and what was expected, e.g.
``study.toml: genome.density.max: must be <= 1, got 1.5``. Unknown keys are errors with
a did-you-mean. Relative paths are relative to the study file's folder. The keys and
their defaults are documented in README.md ("The study file").
"""

from __future__ import annotations

import difflib
import math
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fitness.errors import FitnessError
from fitness.extract import GenerateSpec
from fitness.fidelity import FidelityConfig, FidelitySettingError
from fitness.gates import GateSpec
from fitness.objective import MODES as OBJECTIVES
from fitness.spec import BUILTIN_METRICS, TaskSpec, is_user_metric
from genome.errors import GenomeError
from genome.space import check_sources, is_numeric
from genome.spec import (
    FRANKEN_PICKS,
    METHOD_GENES,
    OTHER_GENES,
    Bounds,
    FrankenSpec,
    GenomeSpec,
    known_methods,
)
from merges.lora import LORA_SEPARATOR
from merges.tokenizer_union import BASE, UNION, TokenizerPolicy
from search.errors import StudyConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

BACKENDS: tuple[str, ...] = ("ray", "inline")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
# The sampler names a study file may ask for (search.samplers builds them; kept here so that
# reading a config, as `search status` does, needs neither Optuna nor numpy).
SAMPLERS: tuple[str, ...] = ("cmaes", "tpe", "gp", "nsga2", "random")
MULTI_OBJECTIVE_SAMPLERS: tuple[str, ...] = ("nsga2", "tpe", "gp", "random")
STORAGE_SCHEMES: tuple[str, ...] = ("sqlite:///", "postgresql://", "postgresql+", "mysql://", "mysql+", "journal:")
_LABEL = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
RESERVED_LABELS: tuple[str, ...] = ("base", "best")

STUDY_KEYS = (
    "name", "seed", "output", "storage", "trials", "sampler", "population", "objective", "top_k", "enqueue",
    "warm_start", "fidelity",
)
FIDELITY_KEYS = ("first_stage", "growth", "confidence", "rule", "promote")
MODELS_KEYS = ("base", "sources", "demo_family", "allow_pickle", "trust_remote_code", "dtype", "tokenizer")
GENOME_KEYS = (
    "method", "layer_granularity", "per_role", "embed_head", "weight", "density", "lambda", "t", "fixed",
    "frankenmerge", *OTHER_GENES,
)
FRANKEN_KEYS = ("layers", "pick", "include_base", "layer_range")
TASK_KEYS = (
    "name", "search", "heldout", "heldout_fraction", "split_seed", "prompt_field", "answer_field",
    "choices_field", "label_field", "metric", "weight", "limit", "chat_template", "answer_separator",
    "add_bos", "gates", "generate", "test",
)
GENERATE_KEYS = (  # [tasks.generate]: fitness.extract.GenerateSpec
    "max_new_tokens", "stop", "extract", "extract_match", "extract_gold", "normalize", "compare", "tolerance",
    "fewshot", "fewshot_file", "fewshot_seed", "fewshot_separator",
)
# A task scored by lm-eval (fitness.lm_eval_task) has these keys instead of the data ones.
LM_EVAL_TASK_KEYS = (
    "name", "lm_eval", "lm_eval_include", "lm_eval_metric", "lm_eval_num_fewshot",
    "lm_eval_fewshot_as_multiturn", "heldout_fraction", "split_seed", "weight", "limit", "chat_template", "gates",
)
EXECUTION_KEYS = (
    "backend", "address", "workers", "device", "cpus_per_worker", "gpus_per_worker", "batch_size",
    "max_worker_restarts", "memory_gb",
)


@dataclass(frozen=True)
class ModelsConfig:
    base: Path
    sources: dict[str, Path]  # label -> checkpoint folder (a LoRA source: Path("MODEL+ADAPTER")), in file order
    demo_family: bool = False  # base is the shipped demo family's: verify its checksums
    allow_pickle: bool = False
    trust_remote_code: bool = False
    dtype: str = "float32"
    tokenizer: str | None = None  # "union" | "base" | a source label: sources' vocabularies may differ

    def tokenizer_policy(self) -> TokenizerPolicy | None:
        """The output vocabulary (``merges.tokenizer_union``), a source label turned into its path."""
        if self.tokenizer is None:
            return None
        source = self.tokenizer if self.tokenizer in (UNION, BASE) else str(self.sources[self.tokenizer])
        return TokenizerPolicy(source)


@dataclass(frozen=True)
class ExecutionConfig:
    backend: str = "ray"  # "ray" | "inline"
    address: str | None = None  # Ray cluster address (else $RAY_ADDRESS, else a local runtime)
    workers: int = 1
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0  # 1 per worker when device resolves to cuda
    batch_size: int = 64
    max_worker_restarts: int = 3
    memory_gb: float | None = None  # the memory budget one worker's engine plan must fit (search.memory)


@dataclass(frozen=True)
class StudyConfig:
    path: Path  # the study.toml
    name: str
    seed: int
    output: Path  # --out overrides
    storage: str  # URL; default f"sqlite:///{output}/study.db"; "journal:PATH" for a journal file
    trials: int  # search budget (baselines not counted); --trials overrides
    sampler: str  # cmaes | tpe | gp | nsga2 | random (resolved from "auto")
    population: int | None  # CMA-ES popsize / NSGA-II population_size (None: Optuna's default)
    objective: str  # mean | min | per_task
    top_k: int  # finalists re-scored on held-out
    models: ModelsConfig
    genome: GenomeSpec
    tasks: tuple[TaskSpec, ...]
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    enqueue: tuple[Path, ...] = ()  # mergekit YAMLs evaluated first (search.warm_start)
    warm_start: str | None = None  # storage URL of an earlier study to start from (search.warm_start)
    fidelity: FidelityConfig | None = None  # study.fidelity: score trials in stages (None: every row)


def auto_sampler(genome: GenomeSpec, objective: str) -> tuple[str, str]:
    """The sampler ``sampler = "auto"`` picks for this genome and objective, and why (the one
    place that says so: ``search validate`` prints the reason)."""
    if objective == "per_task":
        return "nsga2", ("objective per_task is one objective per task; NSGA-II keeps their Pareto front "
                         "(CMA-ES and GP here are single-objective)")
    if not is_numeric(genome):
        return "tpe", ("categorical genes (frankenmerge layer picks), which CMA-ES would sample at random; "
                       "TPE models them")
    return "cmaes", ("numeric genes, one objective: CMA-ES adapts one search distribution over all of them; "
                     "measured on the demo, it beat random search at 48 trials in 12 of 15 seeds and gained "
                     "+.028 from 48 to 96 trials (README, search quality)")


def load_study(path: str | Path, *, out: str | Path | None = None, trials: int | None = None,
               seed: int | None = None, sampler: str | None = None) -> StudyConfig:
    """Read and validate a study file; ``out`` / ``trials`` / ``seed`` / ``sampler`` override the
    file (``--out``, ``--trials``, ``--seed``, ``--sampler``).

    An overriding sampler that uses no population (tpe, gp, random) ignores
    ``study.population``, so one file serves every sampler.
    """
    file = Path(path)
    name = str(path)
    if not file.is_file():
        raise StudyConfigError(f"{name}: study file not found" + (" (it is a folder)" if file.is_dir() else ""))
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise StudyConfigError(f"{name}: TOML syntax error: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise StudyConfigError(f"{name}: cannot read the study file: {exc}") from None
    return _Parser(name, file.resolve().parent).study(
        data, file.resolve(), out=out, trials=trials, seed=seed, sampler=sampler
    )


# -- reading tables -------------------------------------------------------------------

_MISSING = object()


class _Table:
    """One TOML table with its key path and typed getters."""

    def __init__(self, file: str, where: str, data: Mapping[str, object]) -> None:
        self.file = file
        self.where = where
        self.data = data

    def key(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def error(self, key: str, message: str) -> StudyConfigError:
        return StudyConfigError(f"{self.file}: {self.key(key)}: {message}")

    def has(self, key: str) -> bool:
        return key in self.data

    def get(self, key: str, default: object, check: Callable[[object], bool], expected: str) -> object:
        if key not in self.data:
            if default is _MISSING:
                raise self.error(key, f"required ({expected}) but missing")
            return default
        value = self.data[key]
        if not check(value):
            raise self.error(key, f"expected {expected}, got {_show(value)}")
        return value

    def get_str(self, key: str, default: object = _MISSING) -> str:
        return self.get(key, default, lambda v: isinstance(v, str), "a string")  # type: ignore[return-value]

    def get_bool(self, key: str, default: object = _MISSING) -> bool:
        return self.get(key, default, lambda v: isinstance(v, bool), "true or false")  # type: ignore[return-value]

    def get_int(self, key: str, default: object = _MISSING, *, minimum: int | None = None) -> int:
        value = self.get(key, default, _is_int, "an integer")
        if minimum is not None and value is not None and value < minimum:  # type: ignore[operator]
            raise self.error(key, f"must be >= {minimum}, got {value}")
        return value  # type: ignore[return-value]

    def get_float(self, key: str, default: object = _MISSING) -> float:
        value = self.get(key, default, _is_number, "a finite number")
        return value if value is None else float(value)  # type: ignore[arg-type]

    def get_table(self, key: str, default: object = _MISSING) -> _Table:
        value = self.get(key, default, lambda v: isinstance(v, dict), "a table")
        return _Table(self.file, self.key(key), value)  # type: ignore[arg-type]

    def get_choice(self, key: str, choices: tuple[str, ...], default: object = _MISSING) -> str:
        value = self.get_str(key, default)
        if value not in choices:
            raise self.error(key, f"expected one of {', '.join(choices)}, got {value!r}{_did_you_mean(value, choices)}")
        return value

    def expect(self, allowed: tuple[str, ...]) -> None:
        """Refuse unknown keys first, so a typo is reported as a typo, not as what it left unset."""
        for key in self.data:
            if key not in allowed:
                raise self.error(key, f"unknown key{_did_you_mean(key, allowed)} (known: {', '.join(allowed)})")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _show(value: object) -> str:
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", dict: "a table", list: "an array"}
    kind = next((name for t, name in kinds.items() if type(value) is t), type(value).__name__)
    return f"{kind} ({value!r})" if not isinstance(value, dict | list) else kind


def _did_you_mean(word: str, choices: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# -- the study ------------------------------------------------------------------------


class _Parser:
    def __init__(self, file: str, folder: Path) -> None:
        self.file = file
        self.folder = folder

    def path(self, value: str) -> Path:
        return (self.folder / Path(value).expanduser()).resolve()

    def lora_source(self, model: str, adapter: str) -> Path:
        """A base checkpoint with a PEFT LoRA adapter, as ``merges.checkpoint.open_checkpoint`` reads it."""
        return Path(f"{self.path(model)}{LORA_SEPARATOR}{self.path(adapter)}")

    def study(
        self, data: Mapping[str, object], path: Path, *, out: str | Path | None, trials: int | None,
        seed: int | None = None, sampler: str | None = None,
    ) -> StudyConfig:
        root = _Table(self.file, "", data)
        root.expect(("study", "models", "genome", "tasks", "execution"))
        study = root.get_table("study", {})
        study.expect(STUDY_KEYS)
        models = self.models(root.get_table("models"))
        genome = self.genome(root.get_table("genome"), models)
        tasks = self.tasks(root, models)
        execution = self.execution(root.get_table("execution", {}))

        name = study.get_str("name", path.stem if path.stem != "study" else path.parent.name)
        if not name.strip():
            raise study.error("name", "must not be empty")
        file_seed = study.get_int("seed", 0, minimum=0)
        if seed is not None and (not _is_int(seed) or seed < 0):
            raise StudyConfigError(f"--seed: expected an integer >= 0, got {seed!r}")
        seed = file_seed if seed is None else seed
        output = self.path(study.get_str("output", f"runs/{name}"))
        if output.exists() and not output.is_dir():
            raise study.error("output", f"{output} exists and is not a folder")
        if out is not None:
            output = Path(out).expanduser().resolve()
            if output.exists() and not output.is_dir():
                raise StudyConfigError(f"--out: {output} exists and is not a folder")
        storage = self.storage(study, output)
        budget = study.get_int("trials", 100, minimum=0)
        if trials is not None:
            if not _is_int(trials) or trials < 0:
                raise StudyConfigError(f"--trials: expected an integer >= 0, got {trials!r}")
            budget = trials
        objective = study.get_choice("objective", OBJECTIVES, "mean")
        if budget and not genome.bounds() and genome.frankenmerge is None:
            raise StudyConfigError(
                f"{self.file}: genome: nothing to search: method {genome.method!r} with no weight, density, "
                "lambda or t bounds has no genes (give bounds, or set study.trials = 0 to score the "
                "baselines only)"
            )
        chosen = sampler
        sampler = self.sampler(study, genome, objective, override=chosen)
        population = study.get_int("population", 0, minimum=0)
        if chosen is not None and sampler not in ("cmaes", "nsga2"):
            population = 0  # --sampler: the file's population is for the samplers that use one
        if population == 1:
            raise study.error("population", "must be 0 (Optuna's default) or >= 2, got 1")
        if population and sampler not in ("cmaes", "nsga2"):
            raise study.error("population", f"only cmaes and nsga2 use a population, the sampler is {sampler!r}")
        top_k = study.get_int("top_k", 5, minimum=1)
        enqueue = self.enqueue(study)
        warm_start = self.warm_start(study, storage)
        fidelity = self.fidelity(study, tasks)
        from fitness.objective import objective_directions
        from fitness.spec import higher_is_better

        for index, task in enumerate(tasks):  # a user scorer that fails to import names its task
            try:
                higher_is_better(task.metric)
            except FitnessError as exc:
                raise StudyConfigError(f"{self.file}: tasks[{index}].metric: {exc}") from None
        try:
            objective_directions(tasks, objective)
        except FitnessError as exc:
            reason = str(exc).removeprefix("objective: ")
            raise StudyConfigError(f"{self.file}: study.objective: {reason}") from None
        return StudyConfig(
            path=path, name=name, seed=seed, output=output, storage=storage, trials=budget,
            sampler=sampler, population=population or None, objective=objective, top_k=top_k,
            models=models, genome=genome, tasks=tasks, execution=execution, enqueue=enqueue,
            warm_start=warm_start, fidelity=fidelity,
        )

    def fidelity(self, study: _Table, tasks: tuple[TaskSpec, ...]) -> FidelityConfig | None:
        """``study.fidelity = { first_stage = N, growth, confidence, rule, promote }``: the types read here;
        defaults, limits and their messages are ``fitness.fidelity.FidelityConfig``'s, named by TOML key."""
        if not study.has("fidelity"):
            return None
        table = study.get_table("fidelity")
        table.expect(FIDELITY_KEYS)
        settings: dict[str, object] = {
            "first_stage": table.get_int("first_stage"), "growth": table.get_float("growth", None),
            "confidence": table.get_float("confidence", None), "rule": table.get_str("rule", None),
            "promote": table.get_float("promote", None),
        }
        given = {key: value for key, value in settings.items() if value is not None}  # unset: the default
        try:
            config = FidelityConfig(**given)  # type: ignore[arg-type]
        except FidelitySettingError as exc:
            raise table.error(exc.key, exc.problem) from None
        for index, task in enumerate(tasks):
            # a stage's estimate is the mean of the rows scored: a task whose score is not that mean
            # (corpus perplexity) cannot be staged; an lm-eval task's aggregation is known only once
            # lm-eval loads it: `validate` / `start` refuse one that is not a mean (check_lm_eval_task)
            if task.metric == "perplexity":
                raise table.error("first_stage", f"tasks[{index}] ({task.name!r}) uses metric perplexity, whose "
                                  "score is not the mean of its rows; use loglik or remove study.fidelity")
        return config

    def storage(self, study: _Table, output: Path) -> str:
        url = study.get_str("storage", "")
        if not url:
            return f"sqlite:///{output / 'study.db'}"
        return self.storage_url(study, "storage", url)

    def storage_url(self, study: _Table, key: str, url: str) -> str:
        """A storage URL with relative file paths resolved (``key`` names it in errors)."""
        if not url.startswith(STORAGE_SCHEMES):
            raise study.error(
                key,
                f"unknown storage URL {url!r} (expected sqlite:///PATH, postgresql://..., mysql://..., "
                "or journal:PATH)",
            )
        # Relative file paths are relative to the study file, like every other path.
        if url.startswith("sqlite:///"):
            rest = url[len("sqlite:///"):]
            if not rest or rest == ":memory:":
                raise study.error(key, "an SQLite storage needs a file path (sqlite:///PATH)")
            return f"sqlite:///{self.path(rest)}"
        if url.startswith("journal:"):
            rest = url[len("journal:"):]
            if not rest:
                raise study.error(key, "a journal storage needs a file path (journal:PATH)")
            return f"journal:{self.path(rest)}"
        return url

    def enqueue(self, study: _Table) -> tuple[Path, ...]:
        """Known recipes (mergekit YAML files) the search evaluates first."""
        raw = study.get(
            "enqueue", [], lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
            "an array of mergekit YAML file paths",
        )
        paths: list[Path] = []
        for index, value in enumerate(raw):  # type: ignore[arg-type]
            key = f"enqueue[{index}]"
            path = self.path(value)
            if not path.is_file():
                raise study.error(key, f"recipe file {path} " + ("is a folder" if path.is_dir() else "does not exist"))
            if path in paths:
                raise study.error(key, f"{path} is listed twice (also enqueue[{paths.index(path)}])")
            paths.append(path)
        return tuple(paths)

    def warm_start(self, study: _Table, own_storage: str) -> str | None:
        """The earlier study's storage URL: a storage URL, or its output folder or study.db (a path)."""
        value = study.get_str("warm_start", "")
        if not value:
            return None
        if value.startswith(STORAGE_SCHEMES):
            url = self.storage_url(study, "warm_start", value)
        else:
            path = self.path(value)
            if path.is_dir():
                path = path / "study.db"
            if not path.is_file():
                raise study.error(
                    "warm_start",
                    f"no earlier study at {path} (expected a study's output folder, its study.db, or a "
                    "storage URL such as sqlite:///PATH or journal:PATH)",
                )
            url = f"sqlite:///{path}"
        if url == own_storage:
            raise study.error("warm_start", f"is this study's own storage ({url}); name an earlier study's")
        return url

    def sampler(self, study: _Table, genome: GenomeSpec, objective: str, *, override: str | None = None) -> str:
        sampler = study.get_choice("sampler", ("auto", *SAMPLERS), "auto")
        if override is not None:
            if override not in ("auto", *SAMPLERS):
                raise StudyConfigError(
                    f"--sampler: expected one of {', '.join(('auto', *SAMPLERS))}, got {override!r}"
                )
            sampler = override

        def error(key: str, message: str) -> StudyConfigError:
            # A sampler the command line chose is wrong there, not in the file.
            return study.error(key, message) if override is None else StudyConfigError(
                f"--sampler {override}: {message}"
            )

        numeric = is_numeric(genome)
        if sampler == "auto":
            return auto_sampler(genome, objective)[0]
        if sampler == "cmaes" and not numeric:
            raise error(
                "sampler",
                f"cmaes cannot search the categorical genes of method {genome.method!r} (Optuna's "
                "CmaEsSampler samples them at random); use tpe, gp, nsga2 or random, or one CMA-ES "
                "study per method",
            )
        if objective == "per_task" and sampler not in MULTI_OBJECTIVE_SAMPLERS:
            raise error(
                "sampler",
                f"{sampler} is single-objective; objective 'per_task' needs one of "
                f"{', '.join(MULTI_OBJECTIVE_SAMPLERS)}",
            )
        return sampler

    def models(self, table: _Table) -> ModelsConfig:
        table.expect(MODELS_KEYS)
        base = self.path(table.get_str("base"))
        sources_table = table.get_table("sources")
        source_keys = ("model", "lora")
        sources: dict[str, Path] = {}
        for label in sources_table.data:
            if not _LABEL.match(label) or label in RESERVED_LABELS:
                raise sources_table.error(
                    label,
                    "a source label must start with a letter or _ and hold only letters, digits, _ and -"
                    + (f", and {label!r} is reserved" if label in RESERVED_LABELS else ""),
                )
            if isinstance(sources_table.data[label], dict):  # {model = ..., lora = ...}: a LoRA source
                source = sources_table.get_table(label)
                source.expect(source_keys)
                sources[label] = self.lora_source(source.get_str("model"), source.get_str("lora"))
            elif LORA_SEPARATOR in sources_table.get_str(label) and not self.path(sources_table.get_str(label)).is_dir():
                model, _, adapter = sources_table.get_str(label).partition(LORA_SEPARATOR)  # mergekit's model+lora
                if not model or not adapter or LORA_SEPARATOR in adapter:
                    raise sources_table.error(label, "expected MODEL+ADAPTER (one '+'), or {model = ..., lora = ...}")
                sources[label] = self.lora_source(model, adapter)
            else:
                sources[label] = self.path(sources_table.get_str(label))
        if not sources:
            raise table.error("sources", "expected at least one source checkpoint")
        config = ModelsConfig(
            base=base,
            sources=sources,
            demo_family=table.get_bool("demo_family", False),
            allow_pickle=table.get_bool("allow_pickle", False),
            trust_remote_code=table.get_bool("trust_remote_code", False),
            dtype=table.get_choice("dtype", DTYPES, "float32"),
            tokenizer=table.get_str("tokenizer", None),
        )
        if config.tokenizer is not None and config.tokenizer not in (UNION, BASE, *sources):
            raise table.error("tokenizer", f"expected 'union', 'base' or a source label ({', '.join(sources)}), "
                                           f"got {config.tokenizer!r}")
        for label, folder in sources.items():
            if folder == base:
                raise sources_table.error(label, f"is the base checkpoint itself ({folder})")
        if config.demo_family:  # the shipped family, every file verified; nothing is built
            from studies.demo_family import DemoFamilyError, verify_study_base

            try:
                verify_study_base(base)
            except DemoFamilyError as exc:
                raise table.error("base", str(exc)) from None
        return config

    def genome(self, table: _Table, models: ModelsConfig) -> GenomeSpec:
        table.expect(GENOME_KEYS)
        method = table.get_choice("method", known_methods())
        genes = METHOD_GENES[method]
        granularity = table.get_int("layer_granularity", 1, minimum=0)
        per_role = table.get_bool("per_role", False)
        embed_head = table.get_bool("embed_head", False)
        fixed_table = table.get_table("fixed", {})
        fixed: dict[str, float | bool] = {}
        for key, value in fixed_table.data.items():
            if not (isinstance(value, bool) or _is_number(value)):
                raise fixed_table.error(key, f"expected a number or true/false, got {_show(value)}")
            fixed[key] = value  # type: ignore[assignment]
        bounds: dict[str, Bounds | None] = {}
        for key in ("weight", "density", "lambda", "t", *OTHER_GENES):
            bounds[key] = None
            if not table.has(key):
                continue
            if key not in genes.source_params and key not in genes.global_params:
                raise table.error(key, f"method {method!r} has no {key}")
            value = table.data[key]
            if not _is_number(value):
                bounds[key] = self.bounds(table, key)
                continue
            # A plain number fixes the parameter instead of searching it.
            if key in fixed:
                raise table.error(key, f"set both here and in genome.fixed.{key}")
            if key in ("density", "t") and not 0.0 <= value <= 1.0:  # type: ignore[operator]
                raise table.error(key, f"must be within [0, 1], got {value:g}")
            fixed[key] = float(value)  # type: ignore[arg-type]
        if not table.has("weight") and "weight" not in fixed and "weight" in genes.source_params:
            bounds["weight"] = Bounds(0.0, 1.0)
        franken = self.frankenmerge(table.get_table("frankenmerge")) if table.has("frankenmerge") else None
        try:
            spec = GenomeSpec(
                method=method, layer_granularity=granularity, per_role=per_role, embed_head=embed_head,
                weight=bounds["weight"], density=bounds["density"], lambda_=bounds["lambda"], t=bounds["t"],
                fixed=fixed, frankenmerge=franken,
                params={key: b for key in OTHER_GENES if (b := bounds[key]) is not None},
            )
            check_sources(spec, list(models.sources))
        except GenomeError as exc:
            raise StudyConfigError(f"{self.file}: {exc}") from None
        return spec

    def bounds(self, genome: _Table, key: str) -> Bounds:
        table = genome.get_table(key)
        table.expect(("min", "max", "step"))
        low = table.get_float("min")
        high = table.get_float("max")
        step = table.get_float("step", None)
        limits = {"density": (0.0, 1.0), "t": (0.0, 1.0)}.get(key)
        if limits is not None:
            for bound, value in (("min", low), ("max", high)):
                if value < limits[0]:
                    raise table.error(bound, f"must be >= {limits[0]:g}, got {value:g}")
                if value > limits[1]:
                    raise table.error(bound, f"must be <= {limits[1]:g}, got {value:g}")
        if low > high:
            raise table.error("min", f"must be <= max ({high:g}), got {low:g}")
        if step is not None and step <= 0:
            raise table.error("step", f"must be > 0, got {step:g}")
        bounds = Bounds(low, high, step)
        try:
            bounds.check(f"genome.{key}")
        except GenomeError as exc:
            raise StudyConfigError(f"{self.file}: {exc}") from None
        return bounds

    def frankenmerge(self, table: _Table) -> FrankenSpec:
        table.expect(FRANKEN_KEYS)
        layers = table.get_int("layers", None, minimum=1)
        pick = table.get_choice("pick", FRANKEN_PICKS, "same_index")
        include_base = table.get_bool("include_base", False)
        layer_range: tuple[int, int] | None = None
        if table.has("layer_range"):
            value = table.get(
                "layer_range", None,
                lambda v: isinstance(v, list) and len(v) == 2 and all(_is_int(x) for x in v),
                "[start, end] (two integers, end excluded)",
            )
            start, end = value  # type: ignore[misc]
            if not 0 <= start < end:
                raise table.error("layer_range", f"need 0 <= start < end, got [{start}, {end}]")
            layer_range = (start, end)
        return FrankenSpec(layers=layers, pick=pick, include_base=include_base, layer_range=layer_range)

    def tasks(self, root: _Table, models: ModelsConfig) -> tuple[TaskSpec, ...]:
        raw = root.get(
            "tasks", _MISSING,
            lambda v: isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v),
            "one or more [[tasks]] tables",
        )
        tasks: list[TaskSpec] = []
        seen: dict[str, int] = {}
        for index, data in enumerate(raw):  # type: ignore[arg-type]
            table = _Table(self.file, f"tasks[{index}]", data)
            task = self.task(table, models)
            if task.name in seen:
                raise table.error("name", f"duplicate task name {task.name!r} (also tasks[{seen[task.name]}])")
            seen[task.name] = index
            tasks.append(task)
        with_test = [t.name for t in tasks if t.test is not None]
        if with_test:  # the objective's test score needs every task's (search/test_split.py)
            for index, task in enumerate(tasks):
                if task.test is None:
                    kind = "an lm-eval task has no test split; " if task.lm_eval is not None else ""
                    raise StudyConfigError(
                        f"{self.file}: tasks[{index}].test: missing: task {with_test[0]!r} names a test file, so "
                        f"every task needs one ({kind}the objective's test score needs every task's)")
        return tuple(tasks)

    def task(self, table: _Table, models: ModelsConfig) -> TaskSpec:
        if table.has("lm_eval"):
            return self.lm_eval_task(table, models)
        table.expect(TASK_KEYS)
        name = table.get_str("name")
        if not _LABEL.match(name):
            raise table.error("name", f"a task name holds only letters, digits, _ and -, got {name!r}")
        search = self.path(table.get_str("search"))
        heldout = table.get_str("heldout", None)
        test = table.get_str("test", None)
        fraction = table.get_float("heldout_fraction", 0.5)
        if not 0.0 < fraction < 1.0:
            raise table.error("heldout_fraction", f"must be between 0 and 1 (exclusive), got {fraction:g}")
        metric = table.get_str("metric", "generate" if table.has("generate") else "exact_match")
        if metric not in BUILTIN_METRICS and not is_user_metric(metric):
            raise table.error(
                "metric",
                f"unknown metric {metric!r}{_did_you_mean(metric, BUILTIN_METRICS)} (expected one of "
                f"{', '.join(BUILTIN_METRICS)} or module:function)",
            )
        weight = table.get_float("weight", 1.0)
        if weight <= 0:
            raise table.error("weight", f"must be > 0, got {weight:g}")
        fields = {
            key: table.get_str(key, default)
            for key, default in (
                ("prompt_field", "prompt"), ("answer_field", "answer"), ("choices_field", None),
                ("label_field", None), ("answer_separator", None),
            )
        }
        add_bos = table.get_bool("add_bos", None)
        gates = self.gates(table, name, models) if table.has("gates") else ()
        kwargs = dict(
            name=name, search=search, heldout=None if heldout is None else self.path(heldout),
            heldout_fraction=fraction, split_seed=table.get_int("split_seed", 0), metric=metric, weight=weight,
            limit=table.get_int("limit", None, minimum=1), chat_template=table.get_bool("chat_template", False),
            gates=gates, add_bos=add_bos, **fields,
            generate=self.generate(table.get_table("generate")) if table.has("generate") else None,
            test=None if test is None else self.path(test),
        )
        try:
            return TaskSpec(**kwargs)  # type: ignore[arg-type]
        except FitnessError as exc:
            raise StudyConfigError(f"{self.file}: {table.where}: {exc}") from None

    def generate(self, table: _Table) -> GenerateSpec:
        from fitness.extract import COMPARISONS, MATCHES, NORMALIZERS, compile_pattern

        table.expect(GENERATE_KEYS)
        stop = table.get("stop", [], lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
                         "an array of strings")
        for index, text in enumerate(stop):  # type: ignore[arg-type]
            if not text:
                raise table.error(f"stop[{index}]", "is an empty string (a stop string must have text)")
        normalize = table.get("normalize", ["whitespace"], lambda v: isinstance(v, list), "an array of strings")
        for index, name in enumerate(normalize):  # type: ignore[arg-type]
            if name not in NORMALIZERS:
                raise table.error(f"normalize[{index}]", f"expected one of {', '.join(NORMALIZERS)}, got {name!r}")
        extract = table.get_str("extract", None)
        if extract is not None:
            try:
                compile_pattern(extract)
            except FitnessError as exc:
                raise table.error("extract", str(exc).removeprefix("generate.extract: ")) from None
        fewshot_file = table.get_str("fewshot_file", None)
        try:
            return GenerateSpec(
                max_new_tokens=table.get_int("max_new_tokens", 64, minimum=1), stop=tuple(stop),  # type: ignore[arg-type]
                extract=extract, extract_match=table.get_choice("extract_match", MATCHES, "first"),
                extract_gold=table.get_bool("extract_gold", False), normalize=tuple(normalize),  # type: ignore[arg-type]
                compare=table.get_choice("compare", COMPARISONS, "exact"),
                tolerance=table.get_float("tolerance", 1e-6),
                fewshot=table.get_int("fewshot", 0, minimum=0),
                fewshot_file=None if fewshot_file is None else self.path(fewshot_file),
                fewshot_seed=table.get_int("fewshot_seed", 0, minimum=0),
                fewshot_separator=table.get_str("fewshot_separator", "\n\n"),
            )
        except FitnessError as exc:
            raise StudyConfigError(f"{self.file}: {table.where}: {str(exc).removeprefix('generate.')}") from None

    def lm_eval_task(self, table: _Table, models: ModelsConfig) -> TaskSpec:
        from fitness.lm_eval_task import (
            INSTALL_COMMAND,
            LmEvalSpec,
            default_metric,
            lm_eval_installed,
            metric_name,
        )

        data_keys = [k for k in TASK_KEYS if k not in LM_EVAL_TASK_KEYS and table.has(k)]
        if data_keys:
            raise table.error(data_keys[0], "is not used by an lm-eval task (its documents come from lm_eval)")
        table.expect(LM_EVAL_TASK_KEYS)
        name = table.get_str("name")
        if not _LABEL.match(name):
            raise table.error("name", f"a task name holds only letters, digits, _ and -, got {name!r}")
        task = table.get_str("lm_eval")
        include = table.get_str("lm_eval_include", None)
        include_dir = None if include is None else self.path(include)
        if include_dir is not None and not include_dir.is_dir():
            raise table.error("lm_eval_include", f"{include_dir} is not a folder of lm-eval task YAMLs")
        metric = table.get_str("lm_eval_metric", None)
        if metric is None:
            metric = default_metric(task, include_dir)
            if metric is None:
                reason = "" if lm_eval_installed() else f"; lm-eval is not installed ({INSTALL_COMMAND})"
                raise table.error(
                    "lm_eval_metric",
                    f"cannot read the first metric of lm-eval task {task!r} from its YAML{reason}; set lm_eval_metric",
                )
        weight = table.get_float("weight", 1.0)
        if weight <= 0:
            raise table.error("weight", f"must be > 0, got {weight:g}")
        fraction = table.get_float("heldout_fraction", 0.5)
        if not 0.0 < fraction < 1.0:
            raise table.error("heldout_fraction", f"must be between 0 and 1 (exclusive), got {fraction:g}")
        try:
            spec = LmEvalSpec(
                task=task, metric=metric, include=include_dir,
                num_fewshot=table.get_int("lm_eval_num_fewshot", None, minimum=0),
                fewshot_as_multiturn=table.get_bool("lm_eval_fewshot_as_multiturn", False),
            )
            return TaskSpec(
                name=name, search=include_dir or self.folder, heldout=None, heldout_fraction=fraction,
                split_seed=table.get_int("split_seed", 0), metric=metric_name(spec), weight=weight,
                limit=table.get_int("limit", None, minimum=1), chat_template=table.get_bool("chat_template", False),
                gates=self.gates(table, name, models) if table.has("gates") else (), lm_eval=spec,
            )
        except FitnessError as exc:
            raise StudyConfigError(f"{self.file}: {table.where}: {exc}") from None

    def gates(self, task: _Table, name: str, models: ModelsConfig) -> tuple[GateSpec, ...]:
        table = task.get_table("gates")
        table.expect(("min", "max_regression", "against"))
        low = table.get_float("min", None)
        regression = table.get_float("max_regression", None)
        against = table.get_str("against", "best")
        if low is None and regression is None:
            raise task.error("gates", "set min, max_regression, or both")
        if regression is not None and regression < 0:
            raise table.error("max_regression", f"must be >= 0, got {regression:g}")
        if against != "best" and against not in models.sources:
            raise table.error(
                "against",
                f"unknown source {against!r}{_did_you_mean(against, list(models.sources))} "
                f"(expected 'best' or a source: {', '.join(models.sources)})",
            )
        try:
            return (GateSpec(task=name, min=low, max_regression=regression, against=against),)
        except FitnessError as exc:
            raise StudyConfigError(f"{self.file}: {table.where}: {exc}") from None

    def execution(self, table: _Table) -> ExecutionConfig:
        table.expect(EXECUTION_KEYS)
        address = table.get_str("address", "")
        config = ExecutionConfig(
            backend=table.get_choice("backend", BACKENDS, "ray"),
            address=address or None,
            workers=table.get_int("workers", 1, minimum=1),
            device=table.get_choice("device", DEVICES, "auto"),
            cpus_per_worker=table.get_float("cpus_per_worker", 1.0),
            gpus_per_worker=table.get_float("gpus_per_worker", 0.0),
            batch_size=table.get_int("batch_size", 64, minimum=1),
            max_worker_restarts=table.get_int("max_worker_restarts", 3, minimum=0),
            memory_gb=table.get_float("memory_gb", None),
        )
        if config.memory_gb is not None and config.memory_gb <= 0:
            raise table.error("memory_gb", f"must be > 0, got {config.memory_gb:g}")
        if config.cpus_per_worker <= 0:
            raise table.error("cpus_per_worker", f"must be > 0, got {config.cpus_per_worker:g}")
        if config.gpus_per_worker < 0:
            raise table.error("gpus_per_worker", f"must be >= 0, got {config.gpus_per_worker:g}")
        if config.backend == "inline" and config.address:
            raise table.error("address", "is for backend 'ray'; backend 'inline' runs in this process")
        return config

