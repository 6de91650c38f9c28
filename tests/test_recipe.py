import pytest

from merges.errors import RecipeError
from merges.recipe import ROLES, Recipe


def test_uniform_round_trips_through_dict() -> None:
    recipe = Recipe.uniform(
        "ties", "base", ["a", "b"], 4, tensor_params={"weight": [0.3, 0.7], "density": [0.5, 0.5]},
        global_params={"lambda": 1.2, "normalize": True}, seed=7,
    )
    again = Recipe.from_dict(recipe.to_dict())
    assert again == recipe
    assert again.tensor_values("weight", 0, "mlp") == (0.3, 0.7)
    assert again.global_value("normalize", 0, "head") is True
    assert recipe.group_of_layer(3) == 0


def test_groups_must_cover_layers_contiguously() -> None:
    with pytest.raises(RecipeError, match="contiguous"):
        Recipe("linear", None, ("a",), ((0, 2), (3, 4)))


def test_tables_must_match_sources() -> None:
    bad = {"weight": (((1.0,),) * len(ROLES),)}
    with pytest.raises(RecipeError, match="one value per source"):
        Recipe("linear", None, ("a", "b"), ((0, 4),), tensor_params=bad)
