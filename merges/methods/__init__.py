"""Merge methods as pure tensor functions with mergekit 0.1.5 semantics, and their registry."""

from merges.methods.linear import linear
from merges.methods.model_stock import model_stock
from merges.methods.passthrough import passthrough
from merges.methods.registry import METHODS, MethodSpec, validate_recipe
from merges.methods.slerp import slerp
from merges.methods.task_arithmetic import FAMILY, combine, merge_task_vectors

__all__ = ["FAMILY", "METHODS", "MethodSpec", "combine", "linear", "merge_task_vectors",
           "model_stock", "passthrough", "slerp", "validate_recipe"]
