"""Errors of the fitness layer. Each message names the file, row or field at fault."""


class FitnessError(Exception):
    """A task slice, metric, scorer, objective or gate is unusable."""
