"""Cutting work into batches: grouped by a key (e.g. source and destination storage), then cut
at a file count and a byte size, so each batch is one task and one rclone process."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable
from typing import Protocol, TypeVar


class Sized(Protocol):
    """A thing to move or read: its size in bytes."""

    @property
    def size(self) -> int: ...


T = TypeVar("T", bound=Sized)
K = TypeVar("K", bound=Hashable)


def cut(
    things: Iterable[T], *, key: Callable[[T], K], max_files: int, max_bytes: int
) -> list[tuple[K, tuple[T, ...]]]:
    """(key, batch) pairs: things grouped by key in first-seen order, each group cut so a batch
    holds at most max_files things and max_bytes bytes of their `size` (a single larger thing
    is its own batch)."""
    groups: dict[K, list[T]] = defaultdict(list)
    for t in things:
        groups[key(t)].append(t)
    batches: list[tuple[K, tuple[T, ...]]] = []
    for k, group in groups.items():
        current: list[T] = []
        total = 0
        for t in group:
            n = t.size
            if current and (len(current) >= max_files or total + n > max_bytes):
                batches.append((k, tuple(current)))
                current, total = [], 0
            current.append(t)
            total += n
        if current:
            batches.append((k, tuple(current)))
    return batches
