"""Checkpoint IO, preflight, tensor-level merge methods, the in-memory engine, mergekit YAML."""
