"""Errors of the demo family."""


class DemoFamilyError(Exception):
    """A demo-family folder, manifest, task or split that cannot be used; the message says which."""
