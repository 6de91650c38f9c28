"""Warm starts: ``study.enqueue`` (known mergekit recipes first) and ``study.warm_start``
(an earlier study's trials), on real tiny studies run in-process."""

from __future__ import annotations

import re
from pathlib import Path

import optuna
import pytest
from optuna.trial import FrozenTrial

from genome.errors import GenomeError
from genome.space import decode, encode
from genome.spec import Bounds, GenomeSpec
from search import ranking, storage
from search.cli import main as cli
from search.commands.status import render_status
from search.commands.validate import check_study
from search.config import load_study
from search.driver import run_study
from search.errors import StudyConfigError
from search.samplers import POSITION
from search.warm_start import PLAN_ATTR, WARM_ATTR
from tests.checkpoints import TinyFamily
from tests.studies import stored_study, write_study


def with_study_keys(path: Path, lines: str) -> Path:
    """The study file with ``lines`` added to its ``[study]`` table."""
    path.write_text(path.read_text().replace("[study]\n", f"[study]\n{lines}\n", 1))
    return path


def search_by_position(path: Path) -> list[FrozenTrial]:
    trials = [t for t in stored_study(path).get_trials() if ranking.kind(t) == ranking.KIND_SEARCH]
    return sorted(trials, key=lambda t: (t.user_attrs[POSITION], t.number))


def earlier_study(folder: Path, family: TinyFamily, **kwargs: object) -> tuple[Path, optuna.Study]:
    """A finished study (baselines, search, finalize) in ``folder``."""
    folder.mkdir()
    path = write_study(folder, family, **kwargs)  # type: ignore[arg-type]
    config = load_study(path)
    run_study(config, quiet=True)
    return path, storage.load_existing_study(config.name, config.storage)


def chosen(study: optuna.Study) -> FrozenTrial:
    final = study.user_attrs["final_trial"]
    return next(t for t in study.get_trials() if t.number == final)


# -- config -----------------------------------------------------------------------------


@pytest.mark.parametrize(("lines", "message"), [
    ('enqueue = "a.yaml"', r"study\.toml: study\.enqueue: expected an array of mergekit YAML file paths"),
    ('enqueue = ["missing.yaml"]', r"study\.toml: study\.enqueue\[0\]: recipe file .*missing\.yaml does not exist"),
    ('warm_start = "nowhere"', r"study\.toml: study\.warm_start: no earlier study at .*nowhere \(expected"),
    ('warm_start = "sqlite:///out/study.db"', r"study\.toml: study\.warm_start: is this study's own storage"),
    ('warm_start = "sqlite:///"', r"study\.toml: study\.warm_start: an SQLite storage needs a file path"),
    ("warm_start = 3", r"study\.toml: study\.warm_start: expected a string, got an integer"),
])
def test_config_errors_name_the_key(tmp_path: Path, llama_family: TinyFamily, lines: str, message: str) -> None:
    path = with_study_keys(write_study(tmp_path, llama_family, trials=2), lines)
    (tmp_path / "out").mkdir()
    with pytest.raises(StudyConfigError, match=message):
        load_study(path)


def test_enqueue_lists_each_file_once(tmp_path: Path, llama_family: TinyFamily) -> None:
    (tmp_path / "a.yaml").write_text("merge_method: linear\n")
    path = with_study_keys(write_study(tmp_path, llama_family, trials=2), 'enqueue = ["a.yaml", "./a.yaml"]')
    with pytest.raises(StudyConfigError, match=r"study\.enqueue\[1\]: .*a\.yaml is listed twice \(also enqueue\[0\]\)"):
        load_study(path)


# -- encode snaps to the grid ------------------------------------------------------------


def test_encode_snaps_off_grid_values_only_when_asked() -> None:
    spec = GenomeSpec(method="linear", layer_granularity=0, weight=Bounds(0.0, 1.0, 0.1))
    sources = {"a": "/a", "b": "/b"}
    recipe = decode(spec, {"g0.weight.a": 0.3, "g0.weight.b": 0.6}, base="/base", sources=sources,
                    n_layers=2, seed=0)
    table = recipe.tensor_params["weight"]
    off = type(recipe)(**{**recipe.__dict__, "tensor_params": {
        "weight": tuple(tuple((0.32, v[1]) for v in row) for row in table)}})
    with pytest.raises(GenomeError, match="is not in genome.weight"):
        encode(spec, off, sources=sources)
    assert encode(spec, off, sources=sources, snap=True) == {"g0.weight.a": 0.3, "g0.weight.b": 0.6}
    far = type(recipe)(**{**recipe.__dict__, "tensor_params": {
        "weight": tuple(tuple((1.2, v[1]) for v in row) for row in table)}})
    with pytest.raises(GenomeError, match="is not in genome.weight"):
        encode(spec, far, sources=sources, snap=True)  # outside the bounds: no snapping


# -- enqueue -----------------------------------------------------------------------------


def test_an_exported_recipe_is_enqueued_with_its_exact_genes_and_evaluated_first(
    tmp_path: Path, llama_family: TinyFamily
) -> None:
    cold_path, cold = earlier_study(tmp_path / "cold", llama_family, trials=3)
    best = chosen(cold)
    exported = tmp_path / "shipped.yaml"
    assert cli(["export", str(cold_path), "-o", str(exported)]) == 0

    (tmp_path / "warm").mkdir()
    path = with_study_keys(write_study(tmp_path / "warm", llama_family, trials=2), f'enqueue = ["{exported}"]')
    config = load_study(path)
    validation = check_study(config)
    assert [t.origin for t in validation.warm.trials] == ["enqueue:shipped.yaml"]
    assert validation.warm.notes == ()  # no gridded genes: nothing snapped
    run_study(config, quiet=True)

    first, second = search_by_position(path)
    assert first.user_attrs[WARM_ATTR] == "enqueue:shipped.yaml"
    assert first.params == best.params  # exactly the exported trial's genes
    assert first.user_attrs["scores_search"] == best.user_attrs["scores_search"]
    assert first.number < second.number and WARM_ATTR not in second.user_attrs
    study = storage.load_existing_study(config.name, config.storage)
    assert "warm start: best of 1 warm trial(s) is trial" in render_status(study)


def test_resume_does_not_enqueue_warm_trials_again(tmp_path: Path, llama_family: TinyFamily) -> None:
    cold_path, _ = earlier_study(tmp_path / "cold", llama_family, trials=2)
    exported = tmp_path / "shipped.yaml"
    assert cli(["export", str(cold_path), "-o", str(exported)]) == 0
    (tmp_path / "warm").mkdir()
    path = with_study_keys(write_study(tmp_path / "warm", llama_family, trials=1), f'enqueue = ["{exported}"]')
    run_study(load_study(path), quiet=True)
    run_study(load_study(path, trials=3), quiet=True)  # the same study, extended

    trials = search_by_position(path)
    assert [t.user_attrs[POSITION] for t in trials] == [0, 1, 2]
    assert [WARM_ATTR in t.user_attrs for t in trials] == [True, False, False]


def test_a_recipe_the_genome_cannot_express_is_refused_at_validate(
    tmp_path: Path, llama_family: TinyFamily
) -> None:
    models = "\n".join(
        f"  - model: {source}\n    parameters: {{weight: {0.9 if i == 0 else 0.1}}}"
        for i, source in enumerate(llama_family.sources)
    )
    recipe = tmp_path / "hand.yaml"
    recipe.write_text(f"merge_method: linear\ndtype: float32\nmodels:\n{models}\n")
    path = with_study_keys(
        write_study(tmp_path, llama_family, trials=2, genome_extra="weight = { min = 0.0, max = 0.5 }"),
        'enqueue = ["hand.yaml"]',
    )
    with pytest.raises(StudyConfigError, match=(
        r"study\.toml: study\.enqueue\[0\] \(hand\.yaml\): the genome cannot express this recipe: "
        r"recipe: weight 0\.9 for gene g0\.weight\.s0 is not in genome\.weight \[0, 0\.5\]"
    )):
        check_study(load_study(path))


def test_an_off_grid_recipe_is_snapped_with_a_warning(tmp_path: Path, llama_family: TinyFamily) -> None:
    models = "\n".join(  # in reverse order: matched to the study's sources by path
        f"  - model: {source}\n    parameters: {{weight: {0.33 if i == 0 else 0.5}}}"
        for i, source in reversed(list(enumerate(llama_family.sources)))
    )
    recipe = tmp_path / "hand.yaml"
    recipe.write_text(f"merge_method: linear\ndtype: float32\nmodels:\n{models}\n")
    path = with_study_keys(
        write_study(tmp_path, llama_family, trials=2, genome_extra="weight = { min = 0.0, max = 1.0, step = 0.1 }"),
        'enqueue = ["hand.yaml"]',
    )
    warm = check_study(load_study(path)).warm
    params = warm.trials[0].params
    assert params["g0.weight.s0"] == params["g1.weight.s0"] == 0.3
    assert all(v == 0.5 for k, v in params.items() if not k.endswith(".s0"))
    assert len(warm.notes) == 1 and re.search(r"study\.enqueue\[0\] \(hand\.yaml\): snapped to the genes' grid.*"
                                              r"differs by up to 0\.03 \(weight of", warm.notes[0])


# -- warm_start --------------------------------------------------------------------------


def test_warm_start_enqueues_the_earlier_studys_best_for_tpe(tmp_path: Path, llama_family: TinyFamily) -> None:
    _, cold = earlier_study(tmp_path / "cold", llama_family, trials=3)
    (tmp_path / "warm").mkdir()
    path = with_study_keys(write_study(tmp_path / "warm", llama_family, trials=3, sampler="tpe"),
                           f'warm_start = "{tmp_path / "cold" / "out"}"')
    run_study(load_study(path), quiet=True)

    trials = search_by_position(path)
    best = chosen(cold)
    assert trials[0].user_attrs[WARM_ATTR] == f"warm_start:tiny#{best.number}"
    assert trials[0].params == best.params
    # then the earlier study's other finalists (top_k = 2), then TPE's own draws
    assert WARM_ATTR in trials[1].user_attrs and WARM_ATTR not in trials[2].user_attrs


def test_cmaes_warm_start_starts_from_the_earlier_trials_deterministically(
    tmp_path: Path, llama_family: TinyFamily
) -> None:
    _, cold = earlier_study(tmp_path / "cold", llama_family, trials=10, sampler="cmaes", population=5)
    earlier = [t.number for t in ranking.search_trials(cold.get_trials())]
    best = chosen(cold)
    runs = []
    for name in ("warm", "again"):
        (tmp_path / name).mkdir()
        path = with_study_keys(write_study(tmp_path / name, llama_family, trials=3, sampler="cmaes", population=5),
                               f'warm_start = "{tmp_path / "cold" / "out" / "study.db"}"')
        run_study(load_study(path), quiet=True)
        config = load_study(path)
        plan = storage.load_existing_study(config.name, config.storage).user_attrs[PLAN_ATTR]
        assert [t["number"] for t in plan["source_trials"]] == earlier
        trials = search_by_position(path)
        # the earlier choice is re-scored first; the rest is CMA-ES's, from the source trials
        assert trials[0].user_attrs[WARM_ATTR] == f"warm_start:tiny#{best.number}"
        assert trials[0].params == best.params
        assert not any(WARM_ATTR in t.user_attrs for t in trials[1:])
        runs.append([t.params for t in trials])
    assert runs[0] == runs[1]  # same seed, same source trials: the same draws
    # the cold study drew its first generation from the same seed without them
    cold_first = [t.params for t in sorted(ranking.search_trials(cold.get_trials()),
                                           key=lambda t: t.user_attrs[POSITION])[:3]]
    assert runs[0][1:] != cold_first[1:]


def test_cmaes_warm_start_needs_ten_earlier_trials(tmp_path: Path, llama_family: TinyFamily) -> None:
    earlier_study(tmp_path / "cold", llama_family, trials=2)
    (tmp_path / "warm").mkdir()
    path = with_study_keys(write_study(tmp_path / "warm", llama_family, trials=2, sampler="cmaes"),
                           f'warm_start = "{tmp_path / "cold" / "out"}"')
    with pytest.raises(StudyConfigError, match=r"study\.warm_start: CMA-ES's warm start needs at least 10 "
                                               r"finished search trials .* has 2"):
        check_study(load_study(path))


def test_warm_start_from_a_study_on_other_models_names_the_difference(
    tmp_path: Path, llama_family: TinyFamily
) -> None:
    _, cold = earlier_study(tmp_path / "cold", llama_family, trials=0)
    definition = cold.user_attrs["definition"]
    definition["models"]["sources"]["s1"]["config_sha256"] = "0" * 64  # another fine-tune under label s1
    other = f"sqlite:///{tmp_path / 'other.db'}"
    optuna.create_study(study_name="tiny", storage=other).set_user_attr("definition", definition)
    (tmp_path / "warm").mkdir()
    path = with_study_keys(write_study(tmp_path / "warm", llama_family, trials=2),
                           f'warm_start = "{other}"')
    with pytest.raises(StudyConfigError, match=r"study\.warm_start: study 'tiny' in .*other\.db merged other "
                                               r"models: models\.sources\.s1\.config_sha256: \"0000"):
        check_study(load_study(path))


def test_a_warm_trial_a_killed_driver_lost_is_rerun_once_with_its_mark(
    tmp_path: Path, llama_family: TinyFamily
) -> None:
    from tests.test_resume import cli as start_cli

    models = "\n".join(
        f"  - model: {source}\n    parameters: {{weight: {0.7 if i == 0 else 0.2}}}"
        for i, source in enumerate(llama_family.sources)
    )
    (tmp_path / "known.yaml").write_text(f"merge_method: linear\ndtype: float32\nmodels:\n{models}\n")
    path = with_study_keys(
        write_study(tmp_path, llama_family, trials=2, metric="tests.test_resume:killing_scorer"),
        'enqueue = ["known.yaml"]',
    )
    # 4 baselines x 2 tasks = 8 scorer calls; call 9 is the warm trial's first task.
    proc = start_cli("start", str(path), "--quiet",
                     env={"KILL_COUNTER_FILE": str(tmp_path / "calls"), "KILL_AT_CALL": "9"})
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == -9, err
    run_study(load_study(path), quiet=True)

    trials = search_by_position(path)
    lost = [t for t in trials if t.user_attrs.get("failure") == ranking.DRIVER_STOPPED]
    done = [t for t in trials if t.state.name == "COMPLETE"]
    assert [t.user_attrs[POSITION] for t in lost] == [0] and lost[0].user_attrs[WARM_ATTR] == "enqueue:known.yaml"
    assert [t.user_attrs[POSITION] for t in done] == [0, 1]
    assert done[0].user_attrs[WARM_ATTR] == "enqueue:known.yaml" and done[0].params == lost[0].params
    assert WARM_ATTR not in done[1].user_attrs
