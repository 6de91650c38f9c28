"""Merge methods as pure tensor functions with mergekit 0.1.5 semantics, and their registry.

Import the modules themselves (``merges.methods.linear``, ``.registry``...): this package
imports nothing, so the torch-free registry loads without the tensor code.
"""
