"""Task slices, scorers, objective aggregation and release gates."""
