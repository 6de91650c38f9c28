"""Per-slice base models (``Recipe.group_bases``) where they cannot merge: a study, one engine,
a slice base of another architecture. tests/test_mergekit_golden.py holds them to mergekit 0.1.5."""

from __future__ import annotations

from pathlib import Path

import pytest

from merges.checkpoint import open_checkpoint
from merges.engine import MergeEngine
from merges.errors import RecipeError
from merges.recipe import ROLES, Recipe
from search.cli import main as search_main
from search.commands.validate import check_study
from search.config import load_study
from search.errors import StudyConfigError
from tests.checkpoints import TinyFamily
from tests.studies import write_study


def _two_bases_yaml(base: Path, slice_base: Path, sources: tuple[Path, ...]) -> str:
    """ties: layers [0, 2) against ``base``, [2, 4) against ``slice_base`` (the slice's base_model)."""
    models = (*sources, base, *([] if slice_base in sources else [slice_base]))

    def slice_(lo: int, hi: int, against: Path) -> str:
        return "".join(f"      - model: {m}\n        layer_range: [{lo}, {hi}]\n"
                       + ("" if m == against else "        parameters: {weight: 0.5, density: 0.6}\n")
                       for m in models)
    return (f"merge_method: ties\nbase_model: {base}\ndtype: float32\nslices:\n"
            f"  - sources:\n{slice_(0, 2, base)}"
            f"  - base_model: {slice_base}\n    sources:\n{slice_(2, 4, slice_base)}")


def test_a_study_refuses_an_enqueued_recipe_with_per_slice_bases(tmp_path: Path, llama_family: TinyFamily) -> None:
    s0, s1, s2 = llama_family.sources
    (tmp_path / "bases.yaml").write_text(_two_bases_yaml(llama_family.base, s2, (s0, s1, s2)))
    path = write_study(tmp_path, llama_family, trials=2, method="ties")
    path.write_text(path.read_text().replace("[study]\n", '[study]\nenqueue = ["bases.yaml"]\n', 1))
    with pytest.raises(StudyConfigError, match=(
        r"study\.enqueue\[0\]: its slices merge against per-slice base models \[.*source2'\] besides "
        r".*base; a study merges every layer against its one base")):
        check_study(load_study(path))


def test_an_engine_refuses_a_recipe_with_per_group_bases(llama_family: TinyFamily) -> None:
    """One engine merges against one base: `search merge` runs one per base (Recipe.against)."""
    base, s0, s1 = str(llama_family.base), str(llama_family.sources[0]), str(llama_family.sources[1])
    engine = MergeEngine(open_checkpoint(base), [open_checkpoint(s0), open_checkpoint(s1)], device="cpu")
    weights = tuple((0.5, 0.5) for _ in ROLES)
    recipe = Recipe("task_arithmetic", base, (s0, s1), ((0, 2), (2, 4)),
                    tensor_params={"weight": (weights, weights)}, group_bases=(base, s1))
    with pytest.raises(RecipeError, match="against 2 bases; an engine merges against one"):
        engine.materialize(recipe)
    assert len(engine.materialize(recipe.against(base))) == len(engine.layout.tensors)


def test_a_slice_base_of_another_architecture_is_named_before_merging(
    tmp_path: Path, llama_family: TinyFamily, gpt2_family: TinyFamily, capsys: pytest.CaptureFixture[str],
) -> None:
    s0, s1, _ = llama_family.sources
    config = tmp_path / "bases.yaml"
    config.write_text(_two_bases_yaml(llama_family.base, gpt2_family.base, (s0, s1)))
    capsys.readouterr()
    assert search_main(["merge", str(config), str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error
    assert str(gpt2_family.base) in error
    assert not (tmp_path / "out").exists()
