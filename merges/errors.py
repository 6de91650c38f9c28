"""Errors of the merge layer. Each message names the file, tensor or field at fault."""


class MergeError(Exception):
    """Base class for every error raised by ``merges``."""


class CheckpointError(MergeError):
    """A checkpoint folder is missing, unreadable, or not allowed (pickle without opt-in)."""


class PreflightError(MergeError):
    """Sources are incompatible with the base (architecture, tensors, shapes, vocabulary)."""


class RecipeError(MergeError):
    """A recipe is malformed or names an unknown method or parameter."""


class UnsupportedConfigError(MergeError):
    """A mergekit config that the engine cannot reproduce exactly."""


class NonFiniteMergeError(MergeError):
    """A merged tensor holds NaN or inf."""
