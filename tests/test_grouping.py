"""``merges.grouping.consecutive_groups``: the lean engine's chunks and checkpoint shards."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from merges.grouping import consecutive_groups


@given(st.lists(st.integers(0, 50)), st.integers(1, 60))
def test_groups_keep_order_and_stay_within_the_limit(sizes: list[int], limit: int) -> None:
    items = list(enumerate(sizes))
    groups = list(consecutive_groups(items, lambda item: item[1], limit))
    assert [item for group in groups for item in group] == items  # every item once, in order
    for i, group in enumerate(groups):
        assert group  # never empty
        total = sum(size for _, size in group)
        assert total <= limit or len(group) == 1  # only a single oversized item goes over
        if i + 1 < len(groups):  # a group closes only when the next item would not fit
            assert total + groups[i + 1][0][1] > limit
