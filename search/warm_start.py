"""Warm starts: the search begins from recipes already known.

Two ``[study]`` keys (read by ``search.config``):

* ``enqueue = ["recipe.yaml", ...]``: mergekit YAML files (a merge the team ships, a
  recipe ``search export`` wrote), read with ``merges.mergekit_yaml.recipe_from_mergekit``
  and encoded into the genome (``genome.space.encode``, snapped to the genes' grid) as the
  first search trials, positions 0, 1, ... in file order. A recipe the genome cannot
  express is refused, naming ``study.enqueue[i]`` and ``encode``'s reason.
* ``warm_start = "path/or/storage-url"``: an earlier study on the same base and sources,
  opened read-only. Its best recipes are enqueued after the files: its chosen trial, then
  (other samplers than CMA-ES) its other finalists, or its best feasible trials, ``top_k``
  of them, when it was never finalized; re-scored here, since this study may score
  otherwise (a task added, a gate tightened). CMA-ES also starts its distribution from the
  earlier study's finished search trials (Optuna's ``CmaEsSampler(source_trials=...)``,
  which needs the same genome; an infeasible trial counts with its penalised value, as
  CMA-ES saw it there).

What both resolve to, :class:`WarmStart`, is fixed when the study is created and stored on
it (study user attr ``warm_start_plan``): a resumed study places the same recipes at the
same positions and starts CMA-ES from the same trials, even if the earlier study has grown
since, and never enqueues them twice (the driver places each position once; a warm trial
a stopped driver lost is re-run like any other). Each warm trial carries the user attr
``warm_start`` (``enqueue:recipe.yaml`` or ``warm_start:<study>#<trial>``); status and the
report compare the best of them with the chosen trial (:func:`warm_start_line`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from genome.errors import GenomeError
from genome.space import decode, encode
from merges.errors import MergeError
from merges.layout import Layout
from merges.recipe import ROLES, Recipe
from search import ranking
from search.config import StudyConfig
from search.errors import SearchError, StudyConfigError

if TYPE_CHECKING:  # optuna is imported where used: status reads warm_start_line without it
    import optuna
    from optuna.distributions import BaseDistribution
    from optuna.trial import FrozenTrial

WARM_ATTR = "warm_start"
"""Trial user attr of a warm trial: where its recipe came from."""
PLAN_ATTR = "warm_start_plan"
"""Study user attr: the :class:`WarmStart` the study was created with (JSON)."""
MIN_CMA_SOURCE_TRIALS = 10
"""CMA-ES's warm start keeps the best 10% of the source trials (cmaes.get_warm_start_mgd): at least one."""

Params = dict[str, float | int | str]


@dataclass(frozen=True)
class WarmTrial:
    origin: str  # the trial's WARM_ATTR
    params: Params


@dataclass(frozen=True)
class SourceTrial:
    """An earlier study's finished search trial, as CMA-ES saw it there."""

    number: int
    params: dict[str, float]
    value: float  # the objective, penalised when infeasible (search.samplers.sampler_values)


@dataclass(frozen=True)
class WarmStart:
    trials: tuple[WarmTrial, ...] = ()  # enqueued at positions 0, 1, ...
    source_trials: tuple[SourceTrial, ...] = ()  # CMA-ES's warm start
    notes: tuple[str, ...] = ()  # what the user should know (snapping); not stored

    def to_json(self) -> dict[str, object]:
        return {
            "trials": [{"origin": t.origin, "params": dict(t.params)} for t in self.trials],
            "source_trials": [dataclasses.asdict(t) for t in self.source_trials],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> WarmStart:
        trials = tuple(WarmTrial(str(t["origin"]), dict(t["params"])) for t in data.get("trials", []))  # type: ignore[union-attr,index]
        sources = tuple(
            SourceTrial(int(t["number"]), dict(t["params"]), float(t["value"]))  # type: ignore[index]
            for t in data.get("source_trials", [])  # type: ignore[union-attr]
        )
        return cls(trials, sources)

    def frozen_source_trials(self, space: Mapping[str, BaseDistribution]) -> list[FrozenTrial]:
        """The source trials as Optuna trials over ``space`` (what ``source_trials`` takes)."""
        import optuna

        return [
            optuna.trial.create_trial(
                params={k: t.params[k] for k in space}, distributions=dict(space), value=t.value,
            )
            for t in self.source_trials
        ]


# -- resolving ------------------------------------------------------------------------


def plan_warm_start(config: StudyConfig, *, space: Mapping[str, BaseDistribution], n_layers: int,
                    layout: Layout | None = None) -> WarmStart:
    """Read the enqueued recipes and the earlier study; errors name ``study.enqueue[i]`` /
    ``study.warm_start``."""
    trials: list[WarmTrial] = []
    notes: list[str] = []
    for index, path in enumerate(config.enqueue):
        key = f"study.enqueue[{index}]"
        recipe = _read_recipe(config, path, key, layout)
        params, note = _encode(config, recipe, f"{config.path}: {key} ({path.name})", n_layers)
        trials.append(WarmTrial(f"enqueue:{path.name}", params))
        if note:
            notes.append(f"{config.path}: {key} ({path.name}): {note}")
    sources: tuple[SourceTrial, ...] = ()
    if config.warm_start is not None:
        earlier = open_earlier_study(config)
        _check_same_models(config, earlier)
        best = _best_recipes(config, earlier)
        if config.sampler == "cmaes":
            sources = _cma_source_trials(config, earlier, space)
            best = best[:1]  # the source trials say where to search; re-score the earlier choice too
        for number, recipe in best:
            where = f"{config.path}: study.warm_start: trial {number} of study {earlier.study_name!r}"
            params, note = _encode(config, recipe, where, n_layers)
            if params not in [t.params for t in trials]:
                trials.append(WarmTrial(f"warm_start:{earlier.study_name}#{number}", params))
            if note:
                notes.append(f"{where}: {note}")
    return WarmStart(tuple(trials), sources, tuple(notes))


def warm_start_for(config: StudyConfig, *, space: Mapping[str, BaseDistribution], n_layers: int,
                   layout: Layout) -> WarmStart:
    """The driver's warm start: the one stored on the study, else planned now (and shown)."""
    if not config.enqueue and config.warm_start is None:
        return WarmStart()
    from search.storage import NoStudyYetError, load_existing_study

    try:
        stored = load_existing_study(config.name, config.storage).user_attrs.get(PLAN_ATTR)
    except NoStudyYetError:
        stored = None
    if isinstance(stored, Mapping):
        return WarmStart.from_json(stored)
    warm = plan_warm_start(config, space=space, n_layers=n_layers, layout=layout)
    for note in warm.notes:
        print(f"warning: {note}", file=sys.stderr)
    return warm


def store_warm_start(study: optuna.Study, warm: WarmStart) -> None:
    """Fix the warm start on the study when it has none yet (its first run)."""
    if (warm.trials or warm.source_trials) and PLAN_ATTR not in study.user_attrs:
        study.set_user_attr(PLAN_ATTR, warm.to_json())


def enqueue_position(study: optuna.Study, position: int, user_attrs: Mapping[str, object]) -> None:
    """Enqueue the search trial at ``position``: a warm trial's genes there, else none (sampled)."""
    plan = study.user_attrs.get(PLAN_ATTR)
    trials = plan.get("trials", []) if isinstance(plan, Mapping) else []
    if position < len(trials):
        study.enqueue_trial(dict(trials[position]["params"]),
                            user_attrs={**user_attrs, WARM_ATTR: trials[position]["origin"]})
    else:
        study.enqueue_trial({}, user_attrs=dict(user_attrs))


def open_earlier_study(config: StudyConfig) -> optuna.Study:
    """``study.warm_start``'s study, read-only: the only one in its storage, or the one named like this."""
    import optuna

    from search.storage import load_existing_study, resolve_storage

    url = config.warm_start
    assert url is not None
    try:
        names = optuna.get_all_study_names(resolve_storage(url, create=False))
    except SearchError as exc:
        raise StudyConfigError(f"{config.path}: study.warm_start: {exc}") from None
    if len(names) == 1:
        name = names[0]
    elif config.name in names:
        name = config.name
    else:
        raise StudyConfigError(
            f"{config.path}: study.warm_start: {url} holds "
            + (f"studies {', '.join(map(repr, names))} and none is named {config.name!r}" if names else "no study")
        )
    return load_existing_study(name, url)


def warm_start_definition(config: StudyConfig) -> dict[str, object]:
    """What the warm start adds to the study's definition (``search.definition``): each
    enqueued file's SHA-256 in order, the earlier study's name and stored definition."""
    out: dict[str, object] = {}
    if config.enqueue:
        out["enqueue"] = [hashlib.sha256(p.read_bytes()).hexdigest() for p in config.enqueue]
    if config.warm_start is not None:
        earlier = open_earlier_study(config)
        stored = json.dumps(earlier.user_attrs.get("definition"), sort_keys=True)
        out["warm_start"] = {"study": earlier.study_name,
                             "definition_sha256": hashlib.sha256(stored.encode()).hexdigest()}
    return out


# -- recipes ------------------------------------------------------------------------------


def _read_recipe(config: StudyConfig, path: Path, key: str, layout: Layout | None) -> Recipe:
    from merges.mergekit_yaml import recipe_from_mergekit
    from merges.preflight import refuse_group_bases

    try:
        # Relative model paths: against the YAML's folder, where `search export` writes them from
        # and where its header says to run mergekit-yaml (mergekit itself resolves against the cwd).
        recipe = recipe_from_mergekit(path, base_dir=path.parent, layout=layout,
                                      allow_pickle=config.models.allow_pickle)
        refuse_group_bases(recipe)
    except MergeError as exc:
        raise StudyConfigError(f"{config.path}: {key}: {exc}") from None
    return _on_study_models(config, recipe, f"{config.path}: {key} ({path.name})", by_path=True)


def _on_study_models(config: StudyConfig, recipe: Recipe, where: str, *, by_path: bool,
                     labels: Mapping[str, str] | None = None) -> Recipe:
    """``recipe`` over the study's base and source paths, its sources in the study's order.

    ``by_path``: the recipe names the checkpoints by path (a YAML; compared resolved);
    else ``labels`` maps its paths to source labels (an earlier study's ``sources``).
    """
    models = config.models
    study_paths = {label: str(path) for label, path in models.sources.items()}
    if by_path:
        resolved = {str(Path(p).resolve()): label for label, p in study_paths.items()}
        label_of = {p: resolved.get(str(Path(p).resolve())) for p in recipe.sources}
        if recipe.base is not None and Path(recipe.base).resolve() != Path(models.base).resolve():
            raise StudyConfigError(f"{where}: base_model {recipe.base} is not the study's base ({models.base})")
    else:
        label_of = {p: (labels or {}).get(p) for p in recipe.sources}
    unknown = [p for p, label in label_of.items() if label is None]
    if unknown:
        raise StudyConfigError(
            f"{where}: model {unknown[0]} is none of the study's sources "
            f"({', '.join(f'{k}={v}' for k, v in study_paths.items())})"
        )
    order = [list(label_of.values()).index(label) if label in label_of.values() else None for label in study_paths]
    if None in order or len(recipe.sources) != len(study_paths):
        missing = [label for label, i in zip(study_paths, order, strict=True) if i is None]
        raise StudyConfigError(
            f"{where}: the recipe merges {len(recipe.sources)} source(s); the genome needs every source"
            + (f" (missing: {', '.join(missing)})" if missing else "")
        )
    tensor_params = {
        name: tuple(tuple(tuple(cell[i] for i in order) for cell in row) for row in table)  # type: ignore[index]
        for name, table in recipe.tensor_params.items()
    }
    return dataclasses.replace(
        recipe, base=str(models.base), sources=tuple(study_paths.values()), tensor_params=tensor_params,
    )


def _encode(config: StudyConfig, recipe: Recipe, where: str, n_layers: int) -> tuple[Params, str]:
    """The genes of ``recipe`` (snapped to the grid) and a note when snapping changed it."""
    try:
        params = encode(config.genome, recipe, sources=config.models.sources, n_layers=n_layers, snap=True)
    except GenomeError as exc:
        raise StudyConfigError(f"{where}: the genome cannot express this recipe: {exc}") from None
    decoded = decode(config.genome, params, base=recipe.base or "", sources=config.models.sources,
                     n_layers=n_layers, seed=recipe.seed, dtype=recipe.dtype)
    change = _largest_change(recipe, decoded)
    if change is None:
        return params, ""
    size, name, where_in = change
    return params, (
        f"snapped to the genes' grid (genome steps); the search evaluates a recipe that differs by up to "
        f"{size:.3g} ({name} of {where_in})"
    )


def _largest_change(given: Recipe, decoded: Recipe) -> tuple[float, str, str] | None:
    """The largest difference between two recipes' numeric parameters, over the cells that
    reach tensors (embeddings: group 0; each layer's group; head: the last group)."""
    best: tuple[float, str, str] | None = None
    cells = [("embeddings", 0, 0, "embed")]
    cells += [(f"layer {layer}", given.group_of_layer(layer), decoded.group_of_layer(layer), role)
              for layer in range(given.n_layers) for role in ("attention", "mlp", "norm")]
    cells.append(("head", len(given.groups) - 1, len(decoded.groups) - 1, "head"))
    for tables_a, tables_b in ((given.tensor_params, decoded.tensor_params),
                               (given.global_params, decoded.global_params)):
        for name in tables_a.keys() & tables_b.keys():
            for where, group_a, group_b, role in cells:
                a = tables_a[name][group_a][ROLES.index(role)]
                b = tables_b[name][group_b][ROLES.index(role)]
                pairs = zip(a, b, strict=True) if isinstance(a, tuple) else [(a, b)]
                for x, y in pairs:  # type: ignore[misc]
                    if isinstance(x, bool) or isinstance(y, bool):
                        continue
                    diff = abs(float(x) - float(y))
                    if diff > 1e-12 and (best is None or diff > best[0]):
                        best = (diff, name, where)
    return best


# -- the earlier study -------------------------------------------------------------------


def _check_same_models(config: StudyConfig, earlier: optuna.Study) -> None:
    """The earlier study must have merged the same base and sources (by fingerprint)."""
    from search.definition import checkpoint_fingerprint, describe_changes, genome_definition

    stored = earlier.user_attrs.get("definition")
    if not isinstance(stored, Mapping) or "models" not in stored:
        raise StudyConfigError(
            f"{config.path}: study.warm_start: study {earlier.study_name!r} in {config.warm_start} stores no "
            "definition (it predates them); it cannot be checked to use the same models"
        )
    models = config.models
    current = {
        "base": checkpoint_fingerprint(Path(models.base)),
        "sources": {label: checkpoint_fingerprint(Path(p)) for label, p in models.sources.items()},
    }
    theirs = {"base": stored["models"].get("base"), "sources": stored["models"].get("sources")}  # type: ignore[union-attr]
    changes = describe_changes({"models": theirs}, {"models": _jsonable(current)})
    if changes:
        raise StudyConfigError(
            f"{config.path}: study.warm_start: study {earlier.study_name!r} in {config.warm_start} merged other "
            "models: " + "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4 else "")
        )
    if config.sampler == "cmaes":
        changes = describe_changes({"genome": stored.get("genome")}, {"genome": genome_definition(config)})
        if changes:
            raise StudyConfigError(
                f"{config.path}: study.warm_start: CMA-ES starts from source trials of the same genome; "
                f"study {earlier.study_name!r} searched another: " + "; ".join(changes[:4])
            )


def _jsonable(value: object) -> object:
    """As the stored definition reads back from JSON (tuples are lists, paths strings)."""
    return json.loads(json.dumps(value, default=str))


def _cma_source_trials(config: StudyConfig, earlier: optuna.Study,
                       space: Mapping[str, BaseDistribution]) -> tuple[SourceTrial, ...]:
    from search.samplers import penalty_scale, sampler_values

    directions = [d.name.lower() for d in earlier.directions]
    if len(directions) != 1:
        raise StudyConfigError(
            f"{config.path}: study.warm_start: study {earlier.study_name!r} has {len(directions)} objectives; "
            "CMA-ES starts from a single-objective study"
        )
    scale = penalty_scale(earlier)
    found = [t for t in ranking.search_trials(earlier.get_trials(deepcopy=False)) if set(space) <= set(t.params)]
    if len(found) < MIN_CMA_SOURCE_TRIALS:
        raise StudyConfigError(
            f"{config.path}: study.warm_start: CMA-ES's warm start needs at least {MIN_CMA_SOURCE_TRIALS} finished "
            f"search trials (it keeps the best 10%); study {earlier.study_name!r} has {len(found)}"
        )
    return tuple(
        SourceTrial(t.number, {k: float(t.params[k]) for k in space}, sampler_values(t, directions, scale)[0])
        for t in found
    )


def _best_recipes(config: StudyConfig, earlier: optuna.Study) -> list[tuple[int, Recipe]]:
    """The earlier study's chosen trial, then its other finalists (or best feasible trials),
    over this study's checkpoint paths."""
    from search.annotate import chosen_trial
    from search.storage import heldout_record

    trials = earlier.get_trials(deepcopy=False)
    directions = [d.name.lower() for d in earlier.directions]
    ranked = ranking.top_feasible(ranking.search_trials(trials), directions, max(len(trials), 1))
    attrs = earlier.user_attrs
    finalists = [t for t in ranked if heldout_record(attrs, t.number) is not None] or ranked[: config.top_k]
    chosen = chosen_trial(earlier)
    picked = ([chosen] if chosen is not None else []) + [t for t in finalists if chosen is None or t.number != chosen.number]
    if not picked:
        raise StudyConfigError(
            f"{config.path}: study.warm_start: study {earlier.study_name!r} in {config.warm_start} has no "
            "feasible search trial to start from"
        )
    labels = {str(path): str(label) for label, path in dict(attrs.get("sources", {})).items()}
    out = []
    for trial in picked:
        where = f"{config.path}: study.warm_start: trial {trial.number} of study {earlier.study_name!r}"
        recipe = Recipe.from_dict(trial.user_attrs["recipe"])
        out.append((trial.number, _on_study_models(config, recipe, where, by_path=False, labels=labels)))
    return out


# -- what status and the report show -----------------------------------------------------


def best_warm_trial(trials: Sequence[FrozenTrial], directions: Sequence[str]) -> tuple[FrozenTrial, int] | None:
    """The best scored warm trial (feasible first) and how many warm trials were scored."""
    warm = [t for t in ranking.search_trials(trials) if WARM_ATTR in t.user_attrs]
    return (ranking.ranked(warm, directions)[0], len(warm)) if warm else None


def warm_start_line(trials: Sequence[FrozenTrial], chosen: FrozenTrial | None, directions: Sequence[str]) -> str | None:
    """How far the search got beyond its warm trials: the best of them against the chosen trial."""
    found = best_warm_trial(trials, directions)
    if found is None:
        return None
    best, count = found
    line = (f"warm start: best of {count} warm trial(s) is trial {best.number} "
            f"({best.user_attrs[WARM_ATTR]}), search objective {ranking.score(best, directions):.4f}")
    if chosen is None:
        return line
    if chosen.number == best.number:
        return line + "; the chosen trial is that warm trial (the search found nothing better)"
    gain = ranking.score(chosen, directions) - ranking.score(best, directions)
    return line + f"; chosen trial {chosen.number}: {ranking.score(chosen, directions):.4f} ({gain:+.4f})"
