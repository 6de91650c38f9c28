"""Errors of the genome layer."""


class GenomeError(Exception):
    """A genome spec or a parameter set that does not decode to a recipe."""
