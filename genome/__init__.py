"""The search space: genes as Optuna distributions, ``decode(params) -> Recipe`` and back."""
