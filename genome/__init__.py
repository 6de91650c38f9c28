"""The search space: genes as Optuna distributions, ``decode(params) -> Recipe`` and back."""

from genome.errors import GenomeError
from genome.space import (
    check_sources,
    decode,
    encode,
    gene_names,
    gene_space,
    is_numeric,
    layer_groups,
)
from genome.spec import Bounds, FrankenSpec, GenomeSpec, known_methods

__all__ = [
    "Bounds",
    "check_sources",
    "FrankenSpec",
    "GenomeError",
    "GenomeSpec",
    "decode",
    "encode",
    "gene_names",
    "gene_space",
    "is_numeric",
    "known_methods",
    "layer_groups",
]
