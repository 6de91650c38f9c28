"""benchmarks/search_quality.py --screen-rules: which trial each finalize rule picks, on constructed rows."""

from __future__ import annotations

import numpy as np

from benchmarks.search_quality import SignedObjective, screen_choice
from search import confidence


def _rows(rng: np.random.Generator, p: float, n: int = 200) -> list[float]:
    return (rng.random(n) < p).astype(float).tolist()


def test_each_rule_picks_by_its_own_rows() -> None:
    rng = np.random.default_rng(0)
    rule = confidence.ObjectiveRule("min", ("a", "b"), {"a": True, "b": True}, None, {})
    objective = SignedObjective(rule)
    # 0: best on search; 1: best on held-out by a little (within noise); 2: best on both together;
    # 3: best on test only
    chances = [(0.95, 0.70, 0.7), (0.70, 0.85, 0.7), (0.90, 0.84, 0.7), (0.60, 0.60, 0.95)]
    trials = [{"number": i, "search": {t: _rows(rng, s) for t in "ab"}, "heldout": {t: _rows(rng, h) for t in "ab"},
               "test": {t: _rows(rng, x) for t in "ab"}} for i, (s, h, x) in enumerate(chances)]
    screened = {"n_search": 4, "trials": trials}
    assert objective.of({"a": [1.0, 0.0], "b": [0.0, 0.0]}) == 0.0  # min over tasks of the means
    assert screen_choice(screened, "heldout", 4, objective)["number"] == 1
    assert screen_choice(screened, "pooled", 4, objective)["number"] == 2
    assert screen_choice(screened, "oracle", 4, objective)["number"] == 3
    assert screen_choice(screened, "oracle", 2, objective)["number"] in (0, 1)  # only the best k count
    # the shipped rule: trial 1 is better on held-out by more than noise than trial 0 (the best on search)
    assert screen_choice(screened, "current", 2, objective)["number"] == 1
    tied = {"n_search": 2, "trials": [trials[0], {**trials[0], "number": 9}]}
    assert screen_choice(tied, "current", 2, objective)["number"] == 0  # a tie keeps the best on search
