"""Consecutive groups under a size limit: lean engine chunks and checkpoint shards."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

Item = TypeVar("Item")


def consecutive_groups(items: Iterable[Item], size: Callable[[Item], int], limit: int) -> Iterator[list[Item]]:
    """Items in order, grouped while a group's total ``size`` stays within ``limit``.

    An item bigger than ``limit`` forms a group by itself; no group is empty.
    """
    group: list[Item] = []
    total = 0
    for item in items:
        item_size = size(item)
        if group and total + item_size > limit:
            yield group
            group, total = [], 0
        group.append(item)
        total += item_size
    if group:
        yield group
