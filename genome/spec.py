"""What a study searches: the genome spec and the merge methods it can describe.

A ``GenomeSpec`` says which genes exist (per layer group, per tensor role, per source)
and their bounds; ``genome.space`` turns it into Optuna distributions and decodes
parameter sets into ``Recipe``s. Every check here raises ``GenomeError`` naming the
``genome.*`` field at fault, so ``search.config`` can prefix the study file's name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal

from genome.errors import GenomeError
from merges.methods.registry import METHODS, REQUIRED, MethodSpec, Param


@dataclass(frozen=True)
class MethodGenes:
    """What the genome may vary or fix for one merge method (derived from the method catalogue)."""

    source_params: tuple[str, ...]  # per-source tensor parameters (Recipe.tensor_params)
    global_params: Mapping[str, type]  # shared parameters (Recipe.global_params) -> bool / float
    sparsifying: bool = False  # has a ``density``
    needs_weight: bool = False  # mergekit has no default weight
    needs_t: bool = False
    min_sources: int = 1
    max_sources: int | None = None
    searchable: tuple[str, ...] = ()  # parameters a gene may vary (the catalogue's search ranges)
    limits: Mapping[str, tuple[float | None, float | None]] = field(default_factory=dict)


def _genes(spec: MethodSpec) -> MethodGenes:
    if spec.uses_layer_slices:  # a frankenmerge picks layers; it has no numeric parameters
        return MethodGenes((), {})
    source = tuple(p.name for p in spec.params if p.per_source)
    shared = {p.name: (bool if p.kind is bool else float) for p in spec.params if not p.per_source}
    return MethodGenes(
        source, shared, sparsifying=any(p.name == "density" and p.search for p in spec.params),
        needs_weight=spec.tensor_params.get("weight", 0.0) is REQUIRED,
        needs_t=spec.global_params.get("t", 0.0) is REQUIRED,
        min_sources=spec.min_sources, max_sources=spec.max_sources,
        searchable=tuple(p.name for p in spec.params if p.search is not None),
        limits={p.name: p.limits for p in spec.params if p.limits != (None, None)},
    )


METHOD_GENES: Mapping[str, MethodGenes] = {name: _genes(spec) for name, spec in METHODS.items()}

SPARSIFYING: tuple[str, ...] = tuple(name for name, genes in METHOD_GENES.items() if genes.sparsifying)

NAMED_BOUNDS = ("weight", "density", "lambda", "t")  # GenomeSpec fields; other genes: ``params``
OTHER_GENES: tuple[str, ...] = tuple(sorted(
    {name for genes in METHOD_GENES.values() for name in genes.searchable} - set(NAMED_BOUNDS)
))
"""Searchable parameters beyond weight / density / lambda / t (sce's select_topk, ramplus_tl's r...)."""

FRANKEN_PICKS: tuple[str, ...] = ("same_index", "any_index")
"""``same_index``: output layer i is layer i of a chosen checkpoint; ``any_index``: any layer."""

BASE_CHOICE = "base"
"""The frankenmerge choice that takes a layer from the base checkpoint."""


def known_methods() -> tuple[str, ...]:
    """Methods the genome can describe and the merge engine can run.

    Every method of the catalogue (``merges.methods.registry.METHODS``, torch-free).
    """
    return tuple(METHOD_GENES)


@dataclass(frozen=True)
class Bounds:
    """A gene's range; with ``step`` the gene lives on the grid ``low + k * step``."""

    low: float
    high: float
    step: float | None = None

    def check(self, where: str, *, low: float | None = None, high: float | None = None) -> None:
        """Raise ``GenomeError`` naming ``where`` unless the bounds are usable (and within low/high)."""
        for key, value in (("min", self.low), ("max", self.high)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise GenomeError(f"{where}.{key}: expected a finite number, got {value!r}")
            if low is not None and value < low:
                raise GenomeError(f"{where}.{key}: must be >= {low:g}, got {value:g}")
            if high is not None and value > high:
                raise GenomeError(f"{where}.{key}: must be <= {high:g}, got {value:g}")
        if self.low > self.high:
            raise GenomeError(f"{where}: min must be <= max, got min {self.low:g} > max {self.high:g}")
        if self.step is None:
            return
        step = self.step
        if isinstance(step, bool) or not isinstance(step, int | float) or not math.isfinite(step) or step <= 0:
            raise GenomeError(f"{where}.step: expected a finite number > 0, got {step!r}")
        # Decimal arithmetic, as Optuna's FloatDistribution checks it (it would move max silently).
        if (Decimal(str(self.high)) - Decimal(str(self.low))) % Decimal(str(step)) != 0:
            raise GenomeError(
                f"{where}.step: max - min ({self.high - self.low:g}) must be a whole number of steps "
                f"of {step:g}"
            )

    def snap(self, value: float) -> float:
        """The nearest grid value, clipped to the bounds.

        The step count is Optuna's (``round((v - low) / step)``); the value is computed in
        decimal so that grid values are the short decimals a user wrote (0.35, not
        0.35000000000000003). Optuna accepts both as the same grid point.
        """
        if self.step is not None:
            k = round((value - self.low) / self.step)
            value = float(Decimal(str(self.low)) + k * Decimal(str(self.step)))
        return float(min(max(value, self.low), self.high))

    def contains(self, value: float) -> bool:
        """Inside the bounds up to float rounding, and on the grid when there is one."""
        tol = 1e-9 * max(1.0, abs(self.low), abs(self.high))
        if not math.isfinite(value) or value < self.low - tol or value > self.high + tol:
            return False
        return abs(self.snap(value) - value) <= tol

    def describe(self) -> str:
        grid = f" step {self.step:g}" if self.step is not None else ""
        return f"[{self.low:g}, {self.high:g}]{grid}"


@dataclass(frozen=True)
class FrankenSpec:
    """A passthrough study: each output layer takes one layer of a chosen checkpoint.

    ``layers``: number of output layers (None: as many as the base). ``pick``:
    ``same_index`` (output layer i is layer i of the chosen checkpoint) or ``any_index``
    (an extra integer gene picks the layer, within ``layer_range``, half-open).
    ``include_base``: the base is one of the choices (as ``"base"``).
    Consecutive picks of consecutive layers of one checkpoint form one layer slice.
    """

    layers: int | None = None
    pick: str = "same_index"
    include_base: bool = False
    layer_range: tuple[int, int] | None = None

    def check(self) -> None:
        where = "genome.frankenmerge"
        if self.layers is not None and (
            isinstance(self.layers, bool) or not isinstance(self.layers, int) or self.layers < 1
        ):
            raise GenomeError(f"{where}.layers: expected an integer >= 1, got {self.layers!r}")
        if self.pick not in FRANKEN_PICKS:
            raise GenomeError(f"{where}.pick: expected one of {', '.join(FRANKEN_PICKS)}, got {self.pick!r}")
        if self.layer_range is not None:
            if self.pick != "any_index":
                raise GenomeError(f"{where}.layer_range: only used with pick = \"any_index\"")
            start, end = self.layer_range
            if not 0 <= start < end:
                raise GenomeError(f"{where}.layer_range: need 0 <= start < end, got [{start}, {end})")

    def output_layers(self, n_layers: int) -> int:
        return n_layers if self.layers is None else self.layers

    def index_range(self, n_layers: int) -> tuple[int, int]:
        """Half-open range of source layer indices an ``any_index`` gene may pick."""
        start, end = self.layer_range if self.layer_range is not None else (0, n_layers)
        if end > n_layers:
            raise GenomeError(
                f"genome.frankenmerge.layer_range: end {end} is past the checkpoints' {n_layers} layers"
            )
        return start, end


@dataclass(frozen=True)
class GenomeSpec:
    """Which genes a study searches, and their bounds.

    ``layer_granularity`` layers share one group of genes (0: one group for all layers).
    ``per_role``: separate genes for attention / mlp / norm tensors (the ``norm`` gene
    also covers embeddings and head unless ``embed_head``). ``embed_head``: separate
    genes for the embeddings and for the head (final norm, lm_head). ``weight`` bounds
    apply only to methods with weights; ``fixed`` sets parameters that are not searched.
    """

    method: str
    layer_granularity: int = 1
    per_role: bool = False
    embed_head: bool = False
    weight: Bounds | None = Bounds(0.0, 1.0)
    density: Bounds | None = None
    lambda_: Bounds | None = None
    t: Bounds | None = None
    fixed: Mapping[str, float | bool] = field(default_factory=dict)
    frankenmerge: FrankenSpec | None = None
    params: Mapping[str, Bounds] = field(default_factory=dict)  # other searched parameters

    def __post_init__(self) -> None:
        known = known_methods()
        if self.method not in known:
            raise GenomeError(f"genome.method: unknown method {self.method!r} (known: {', '.join(known)})")
        genes = METHOD_GENES[self.method]
        if self.weight == Bounds(0.0, 1.0) and "weight" not in genes.source_params:
            # The default weight bounds only apply to methods that have weights.
            object.__setattr__(self, "weight", None)
        object.__setattr__(self, "fixed", dict(self.fixed))
        object.__setattr__(self, "params", dict(self.params))
        self._check_structure()
        self._check_params(genes)
        self._check_fixed(genes)

    @property
    def genes(self) -> MethodGenes:
        return METHOD_GENES[self.method]

    def bounds(self) -> dict[str, Bounds]:
        """The searched parameters (Recipe names: ``weight``, ``density``, ``lambda``, ``t``, then
        ``params``' in catalogue order)."""
        named = {"weight": self.weight, "density": self.density, "lambda": self.lambda_, "t": self.t}
        found = {name: b for name, b in named.items() if b is not None}
        for name in self.params:
            if name in NAMED_BOUNDS:
                raise GenomeError(f"genome.{name}: give it as its own field, not in params")
        order = METHODS[self.method].params
        found.update(sorted(self.params.items(), key=lambda item: _position(order, item[0])))
        return found

    def _check_structure(self) -> None:
        g = self.layer_granularity
        if isinstance(g, bool) or not isinstance(g, int) or g < 0:
            raise GenomeError(f"genome.layer_granularity: expected an integer >= 0, got {g!r}")
        for name in ("per_role", "embed_head"):
            if not isinstance(getattr(self, name), bool):
                raise GenomeError(f"genome.{name}: expected true or false, got {getattr(self, name)!r}")
        if self.method == "passthrough":
            if self.frankenmerge is None:
                raise GenomeError(
                    "genome.frankenmerge: method 'passthrough' needs a frankenmerge table "
                    "(e.g. frankenmerge = { layers = 6, pick = \"same_index\" })"
                )
            for name in ("per_role", "embed_head"):
                if getattr(self, name):
                    raise GenomeError(f"genome.{name}: method 'passthrough' has no per-tensor genes")
            if g != 1:
                raise GenomeError("genome.layer_granularity: method 'passthrough' picks one source per layer")
            self.frankenmerge.check()
        elif self.frankenmerge is not None:
            raise GenomeError(
                f"genome.frankenmerge: only for method 'passthrough', not {self.method!r}"
            )

    def _check_params(self, genes: MethodGenes) -> None:
        for name, bounds in self.bounds().items():
            if name not in genes.searchable:
                raise GenomeError(f"genome.{name}: method {self.method!r} has no {name} ({_has(name)})")
            low, high = genes.limits.get(name, (None, None))
            bounds.check(f"genome.{name}", low=low, high=high)
        if genes.needs_weight and self.weight is None and "weight" not in self.fixed:
            raise GenomeError(
                f"genome.weight: method {self.method!r} needs per-source weights: give bounds or genome.fixed.weight"
            )
        if genes.needs_t and self.t is None and "t" not in self.fixed:
            raise GenomeError(f"genome.t: method {self.method!r} needs t: give bounds or genome.fixed.t")

    def _check_fixed(self, genes: MethodGenes) -> None:
        allowed: dict[str, type] = {name: float for name in genes.source_params}
        allowed.update(genes.global_params)
        searched = self.bounds()
        for name, value in self.fixed.items():
            where = f"genome.fixed.{name}"
            if name not in allowed:
                choices = ", ".join(allowed) or "none"
                raise GenomeError(f"{where}: method {self.method!r} has no parameter {name!r} (it has: {choices})")
            if name in searched:
                raise GenomeError(f"{where}: {name} is searched (genome.{name}); fix it or search it, not both")
            if allowed[name] is bool:
                if not isinstance(value, bool):
                    raise GenomeError(f"{where}: expected true or false, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise GenomeError(f"{where}: expected a finite number, got {value!r}")
            elif name in genes.limits:
                low, high = genes.limits[name]
                if (low is not None and value < low) or (high is not None and value > high):
                    span = (f"within [{low:g}, {high:g}]" if low is not None and high is not None
                            else f">= {low:g}" if low is not None else f"<= {high:g}")
                    raise GenomeError(f"{where}: must be {span}, got {value:g}")


def _position(params: tuple[Param, ...], name: str) -> int:
    return next((i for i, p in enumerate(params) if p.name == name), len(params))


def _has(name: str) -> str:
    if name == "density":
        return "sparsifying methods: " + ", ".join(SPARSIFYING)
    users = [m for m, g in METHOD_GENES.items() if name in g.searchable]
    return f"methods with {name}: " + ", ".join(users)
