"""One thread-safe least-recently-used cache, bounded in bytes and/or in items.

Used for whatever is costly to recompute and keyed by what it depends on (a file's path and
modification time, ...): a study's slices and embeddings, a region's views."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


def tensor_bytes(*tensors) -> int:
    """Bytes held by some tensors (a size function for an LRU of tensors).

    Args:
        tensors: torch tensors.
    """
    return sum(t.numel() * t.element_size() for t in tensors)


class LRU(Generic[V]):
    """Keeps the most recently used items; the oldest go first once a bound is passed.

    Args:
        max_items: at most this many items (None: no bound on the count).
        max_bytes: at most this many bytes, as `size` counts them (None: no bound on the size). The
            newest item is always kept, even alone over the bound.
        size: bytes of one item (needed with `max_bytes`).
    """

    def __init__(
        self, max_items: int | None = None, max_bytes: int | None = None, size: Callable[[V], int] | None = None
    ):
        if max_bytes is not None and size is None:
            raise ValueError("an LRU bounded in bytes needs a size function")
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._size = size
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable, make: Callable[[], V]) -> V:
        """The item of `key`, made with `make()` (outside the lock) and kept when absent.

        Args:
            key: what the item depends on.
            make: computes the item; two threads missing the same key at once both compute it.
        """
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key][0]
        item = make()
        self.put(key, item)
        return item

    def put(self, key: Hashable, item: V) -> None:
        """Keep `item` under `key` as the most recent, then drop the oldest past the bounds.

        Args:
            key: what the item depends on.
            item: the value to keep.
        """
        nbytes = self._size(item) if self._size is not None else 0
        with self._lock:
            if key in self._items:
                self._bytes -= self._items.pop(key)[1]
            self._items[key] = (item, nbytes)
            self._bytes += nbytes
            while len(self._items) > 1 and self._over():
                self._bytes -= self._items.popitem(last=False)[1][1]

    def _over(self) -> bool:
        return (self.max_items is not None and len(self._items) > self.max_items) or (
            self.max_bytes is not None and self._bytes > self.max_bytes
        )

    def drop(self, which: Callable[[Hashable], bool]) -> int:
        """Drop the items whose key `which` accepts; returns how many.

        Args:
            which: key -> whether to drop its item.
        """
        with self._lock:
            keys = [k for k in self._items if which(k)]
            for k in keys:
                self._bytes -= self._items.pop(k)[1]
            return len(keys)

    def peek(self, key: Hashable) -> V | None:
        """The item of `key` (None when absent), without making it the most recent.

        Args:
            key: what the item depends on.
        """
        with self._lock:
            item = self._items.get(key)
            return None if item is None else item[0]

    def clear(self) -> None:
        """Drop every item (e.g. after the model that made them changed)."""
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def stats(self) -> dict:
        """Items held and their size (MiB, as `size` counts them), with the bounds."""
        with self._lock:
            out: dict = {"items": len(self._items), "max_items": self.max_items}
            if self._size is not None:
                out |= {"mb": round(self._bytes / 2**20, 1), "max_mb": round((self.max_bytes or 0) / 2**20) or None}
            return out

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items
