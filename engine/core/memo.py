"""Bounded memos: plain dicts that start over when full and never hold what cannot be a
key. The planner's memos (decisions, CEL results, renders, audiences, shared schedules)
all keep their entries this way."""

from __future__ import annotations

from typing import Any, TypeVar

V = TypeVar("V")


def recall(memo: dict[Any, V], key: object) -> V | None:
    """The value kept under `key`; None when there is none or `key` cannot be one."""
    try:
        return memo.get(key)
    except TypeError:  # an unhashable value in the key
        return None


def keep(memo: dict[Any, V], key: object, value: V, *, limit: int) -> V:
    """Keep `value` under `key` (the memo emptied first when it holds `limit` entries;
    nothing kept when `key` cannot be a key); returns `value`."""
    try:
        hash(key)
    except TypeError:
        return value
    if len(memo) >= limit:
        memo.clear()
    memo[key] = value
    return value
