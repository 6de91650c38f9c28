"""The Recipe: the one description of a merge that every module speaks.

The genome decodes to it, the engine merges it, the mergekit exporter writes it and
the report draws it. It holds numbers only (no tensors), is immutable, and turns into
a plain dict (for Optuna user attributes and Ray messages) and back without loss.

Values are tables so that any parameter may differ per layer group and per tensor
role, which is what a search varies:

* ``tensor_params[name][group][role][source]`` for per-source parameters
  (``weight``, ``density``, ``gamma``, ``epsilon``, ...),
* ``global_params[name][group][role]`` for shared ones (``lambda``, ``t``,
  ``normalize``, ...).

Tensors outside the transformer layers use the first group's ``embed`` row (token
and position embeddings) and the last group's ``head`` row (final norm, lm_head);
this is exactly how mergekit resolves them in a ``slices:`` config.

``group_bases`` carries mergekit's per-slice ``base_model``: when set, each layer group's
tensors merge against that group's base (the embeddings against the first group's, the
final norm and head against the last group's, as for the values above) and ``base`` is only
the model whose config and tokenizer the output takes (mergekit's top-level ``base_model``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from merges.errors import RecipeError

ROLES: tuple[str, ...] = ("embed", "attention", "mlp", "norm", "head")
"""Tensor roles. ``norm`` is a norm inside a layer; the final norm belongs to ``head``."""

Scalar = float | bool
GlobalTable = tuple[tuple[Scalar, ...], ...]  # [group][role]
SourceTable = tuple[tuple[tuple[float, ...], ...], ...]  # [group][role][source]


@dataclass(frozen=True)
class LayerSlice:
    """Layers ``[start, end)`` of ``model`` (a checkpoint path), stacked by passthrough."""

    model: str
    start: int
    end: int
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise RecipeError(f"layer slice of {self.model}: need 0 <= start < end, got [{self.start}, {self.end})")


@dataclass(frozen=True)
class Recipe:
    """A complete, deterministic merge description.

    ``groups`` are half-open layer ranges in order, covering every layer of the base
    exactly once (for ``passthrough`` they are the output layers of ``layer_slices``).
    ``seed`` seeds the per-tensor generators of random sparsification (DARE, DELLA).
    """

    method: str
    base: str | None
    sources: tuple[str, ...]
    groups: tuple[tuple[int, int], ...]
    tensor_params: Mapping[str, SourceTable] = field(default_factory=dict)
    global_params: Mapping[str, GlobalTable] = field(default_factory=dict)
    layer_slices: tuple[LayerSlice, ...] = ()
    dtype: str = "float32"
    out_dtype: str | None = None
    seed: int = 0
    group_bases: tuple[str, ...] = ()  # one base per group; empty: every group merges against base

    def __post_init__(self) -> None:
        if not self.groups:
            raise RecipeError("recipe has no layer groups")
        if self.group_bases:
            if len(self.group_bases) != len(self.groups):
                raise RecipeError(f"group_bases: need one base per layer group ({len(self.groups)}), "
                                  f"got {len(self.group_bases)}")
            if self.base is None or all(b == self.base for b in self.group_bases):
                # one form per merge: recipes compare equal exactly when they merge alike
                raise RecipeError("group_bases: set only with a base and when some group's base differs "
                                  f"from it (base {self.base!r}, group bases {list(self.group_bases)})")
        expected = 0
        for start, end in self.groups:
            if start != expected or end <= start:
                raise RecipeError(f"layer groups must be contiguous half-open ranges from 0, got {list(self.groups)}")
            expected = end
        n_groups, n_roles, n_sources = len(self.groups), len(ROLES), len(self.sources)
        for name, table in self.tensor_params.items():
            if len(table) != n_groups or any(len(row) != n_roles for row in table):
                raise RecipeError(f"tensor parameter {name!r}: table must be [{n_groups} groups][{n_roles} roles]")
            if any(len(cell) != n_sources for row in table for cell in row):
                raise RecipeError(f"tensor parameter {name!r}: need one value per source ({n_sources})")
        for name, table in self.global_params.items():
            if len(table) != n_groups or any(len(row) != n_roles for row in table):
                raise RecipeError(f"global parameter {name!r}: table must be [{n_groups} groups][{n_roles} roles]")

    # -- construction -------------------------------------------------------------

    @classmethod
    def uniform(
        cls,
        method: str,
        base: str | None,
        sources: Sequence[str],
        n_layers: int,
        tensor_params: Mapping[str, Sequence[float]] | None = None,
        global_params: Mapping[str, Scalar] | None = None,
        **kwargs: Any,
    ) -> Recipe:
        """One layer group, the same values for every role: the plain mergekit ``models:`` form.

        ``tensor_params`` maps a parameter to one value per source.
        """
        roles = len(ROLES)
        tp = {
            k: ((tuple(tuple(float(x) for x in v) for _ in range(roles))),)
            for k, v in (tensor_params or {}).items()
        }
        gp = {k: ((tuple(v for _ in range(roles))),) for k, v in (global_params or {}).items()}
        return cls(method, base, tuple(sources), ((0, n_layers),), tp, gp, **kwargs)

    # -- lookup -------------------------------------------------------------------

    @property
    def n_layers(self) -> int:
        return self.groups[-1][1]

    def group_of_layer(self, layer: int) -> int:
        for index, (start, end) in enumerate(self.groups):
            if start <= layer < end:
                return index
        raise RecipeError(f"layer {layer} is outside the recipe's groups {list(self.groups)}")

    def base_of_group(self, group: int) -> str | None:
        """The model the tensors of layer group ``group`` merge against."""
        return self.group_bases[group] if self.group_bases else self.base

    def against(self, base: str) -> Recipe:
        """This recipe with every group merging against ``base``: what one engine over that base
        merges (of a recipe with ``group_bases``, the tensors of the groups whose base it is)."""
        return dataclasses.replace(self, base=base, group_bases=())

    def group_of_tensor(self, layer: int | None, role: str) -> int:
        """The layer group whose values (and base) a tensor takes: its layer's; outside the
        layers the first group's, the head's (final norm, lm_head) the last group's."""
        if layer is not None:
            return self.group_of_layer(layer)
        return len(self.groups) - 1 if role == "head" else 0

    def tensor_values(self, name: str, group: int, role: str) -> tuple[float, ...]:
        """One value per source of a per-source parameter."""
        return self.tensor_params[name][group][ROLES.index(role)]

    def global_value(self, name: str, group: int, role: str) -> Scalar:
        return self.global_params[name][group][ROLES.index(role)]

    # -- plain data ---------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; ``Recipe.from_dict`` inverts it exactly."""
        return {
            "method": self.method,
            "base": self.base,
            "sources": list(self.sources),
            "groups": [list(g) for g in self.groups],
            "tensor_params": {k: [[list(c) for c in row] for row in t] for k, t in self.tensor_params.items()},
            "global_params": {k: [list(row) for row in t] for k, t in self.global_params.items()},
            "layer_slices": [
                {"model": s.model, "start": s.start, "end": s.end, "scale": s.scale} for s in self.layer_slices
            ],
            "dtype": self.dtype,
            "out_dtype": self.out_dtype,
            "seed": self.seed,
            **({"group_bases": list(self.group_bases)} if self.group_bases else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        try:
            return cls(
                method=str(data["method"]),
                base=data["base"],
                sources=tuple(data["sources"]),
                groups=tuple((int(a), int(b)) for a, b in data["groups"]),
                tensor_params={
                    k: tuple(tuple(tuple(float(x) for x in c) for c in row) for row in t)
                    for k, t in data.get("tensor_params", {}).items()
                },
                global_params={
                    k: tuple(tuple(_scalar(x) for x in row) for row in t)
                    for k, t in data.get("global_params", {}).items()
                },
                layer_slices=tuple(LayerSlice(**s) for s in data.get("layer_slices", ())),
                dtype=data.get("dtype", "float32"),
                out_dtype=data.get("out_dtype"),
                seed=int(data.get("seed", 0)),
                group_bases=tuple(str(b) for b in data.get("group_bases", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RecipeError(f"malformed recipe dict: {exc!r}") from exc


def _scalar(x: Any) -> Scalar:
    return x if isinstance(x, bool) else float(x)
