"""``limit``'s seeded, stratified row subsets (fitness/subset.py) and their use in load_task."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import PreTrainedTokenizerFast

from fitness.slices import load_task
from fitness.spec import TaskSpec
from fitness.subset import stable_seed, stratum_quotas, subset_indices
from tests.checkpoints import tiny_tokenizer


def test_same_seed_same_rows_different_seed_different_rows() -> None:
    rows = subset_indices(200, 20, seed=3, key="shipping/search")
    assert rows == subset_indices(200, 20, seed=3, key="shipping/search")
    assert len(rows) == 20 and rows == sorted(rows) and len(set(rows)) == 20
    assert rows != subset_indices(200, 20, seed=4, key="shipping/search")
    assert rows != subset_indices(200, 20, seed=3, key="refunds/search")
    assert rows != list(range(20))  # not the first rows


def test_seed_is_the_same_in_every_process() -> None:
    # a fixed value: a salted hash() or a changed derivation would move every study's rows
    assert stable_seed(0, "toy/search") == 15369467687953655549


@given(n=st.integers(1, 60), extra=st.integers(0, 10), seed=st.integers(0, 2**32))
def test_limit_at_least_the_rows_keeps_all_rows_in_file_order(n: int, extra: int, seed: int) -> None:
    assert subset_indices(n, n + extra, seed=seed, key="k") == list(range(n))
    assert subset_indices(n, n + extra, seed=seed, key="k", labels=[i % 3 for i in range(n)]) == list(range(n))


@settings(max_examples=200)
@given(labels=st.lists(st.integers(0, 4), min_size=2, max_size=80), data=st.data())
def test_stratified_subset_keeps_label_proportions(labels: list[int], data: st.DataObject) -> None:
    limit = data.draw(st.integers(1, len(labels)))
    seed = data.draw(st.integers(0, 2**32))
    kept = subset_indices(len(labels), limit, seed=seed, key="mc/search", labels=labels)
    assert len(kept) == limit and kept == sorted(kept) and len(set(kept)) == limit
    have, whole = Counter(labels[i] for i in kept), Counter(labels)
    for label, count in whole.items():
        share = count * limit / len(labels)  # each label within one row of its share
        assert share - 1 < have[label] < share + 1, (label, have[label], share)


@given(counts=st.lists(st.integers(0, 50), min_size=1, max_size=8), data=st.data())
def test_quotas_add_up_and_never_exceed_a_stratum(counts: list[int], data: st.DataObject) -> None:
    total = data.draw(st.integers(0, sum(counts)))
    quotas = stratum_quotas(counts, total)
    assert sum(quotas) == total
    assert all(0 <= q <= c for q, c in zip(quotas, counts, strict=True))


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="limit must be >= 1"):
        subset_indices(5, 0, seed=0, key="k")
    with pytest.raises(ValueError, match="3 labels for 5 rows"):
        subset_indices(5, 2, seed=0, key="k", labels=[0, 1, 0])


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


def test_load_task_limit_is_stratified_by_the_right_option(tmp_path: Path,
                                                           tokenizer: PreTrainedTokenizerFast) -> None:
    def write(path: Path, n: int, offset: int) -> Path:
        # the right option is 0 on the first 3/4 of the file: a first-N cut would keep only 0s
        rows = [{"prompt": f"w{(offset + i) // 10} w{(offset + i) % 10} =", "options": ["w20", "w21"],
                 "gold": int(i >= 3 * n // 4)} for i in range(n)]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return path

    spec = TaskSpec("mc", write(tmp_path / "s.jsonl", 40, 0), write(tmp_path / "h.jsonl", 40, 40), metric="choice",
                    choices_field="options", label_field="gold", limit=8)
    first = load_task(spec, tokenizer)
    for encoded in (first.search, first.heldout):
        assert Counter(encoded.labels.tolist()) == {0: 6, 1: 2}
        rows = [e.row for e in encoded.examples]
        assert rows == sorted(rows) and rows != list(range(1, 9))
    again = load_task(spec, tokenizer)  # a resumed study reads the same rows
    assert [e.row for e in again.search.examples] == [e.row for e in first.search.examples]
    assert [e.row for e in first.search.examples] != [e.row for e in first.heldout.examples]
