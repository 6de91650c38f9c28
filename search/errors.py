"""Errors of the search layer."""


class SearchError(Exception):
    """An error the user can fix (bad study file, missing study, no feasible trial...)."""


class StudyConfigError(SearchError):
    """study.toml is malformed; the message names the file and the TOML key path."""
