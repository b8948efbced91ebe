"""The server's memory: where it goes, and giving freed memory back to the system.

PyTorch on the CPU allocates through glibc's malloc, which keeps freed memory in its heaps (one per
thread that allocated) instead of returning it. After an adaptation or a burst of inferences a
server's resident size stays near its peak although the memory is free. `Trimmer` hands free heap
pages back (`malloc_trim`) every few seconds after work has run; `report` says where memory goes
for `/info/` (`metaapp.memory`).
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Callable

import psutil

logger = logging.getLogger(__name__)


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


LIBC = _libc()


def trim() -> bool:
    """Return free heap memory to the system; False where glibc is absent or nothing was returned."""
    return bool(LIBC is not None and LIBC.malloc_trim(0))


def resident_mb() -> float:
    """This process's resident set size, MiB."""
    return psutil.Process().memory_info().rss / 2**20


class Trimmer:
    """Trims the heap every `every` seconds after work has run.

    Args:
        activity: a counter that grows with work done (`ActivityGate.ticks`).
        every: seconds between checks.
        grown_mb: growth of the resident size since the last trim that calls for one without activity.
    """

    def __init__(self, activity: Callable[[], int], every: float = 5.0, grown_mb: float = 64.0):
        self.activity, self.every, self.grown_mb = activity, every, grown_mb
        self._after = 0.0
        self.trims = 0
        self.freed_mb = 0.0
        self._seen = -1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="metaapp-trim", daemon=True)

    def start(self) -> Trimmer:
        if LIBC is not None:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def step(self) -> float:
        """One trim if work ran since the last, or the resident size grew by `grown_mb` (work outside
        the gate, such as a scoring pass); returns the MiB handed back."""
        now, before = self.activity(), resident_mb()
        if now == self._seen and before < self._after + self.grown_mb:
            return 0.0
        self._seen = now
        trim()
        self._after = resident_mb()
        freed = max(0.0, before - self._after)
        self.trims += 1
        self.freed_mb += freed
        return freed

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.step()
            except Exception:  # never take the server down over a trim
                logger.exception("heap trim failed")

    def status(self) -> dict:
        return {"trims": self.trims, "freed_mb": round(self.freed_mb, 1), "available": LIBC is not None}


def report(parts: dict[str, dict], trimmer: Trimmer | None = None) -> dict:
    """`/info/`'s `metaapp.memory`: the resident size and what the app's caches hold.

    Args:
        parts: cache name -> its `stats()` (bytes, items, bound).
        trimmer: the heap trimmer, if one runs.
    """
    out = {"resident_mb": round(resident_mb(), 1), "caches": parts, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if trimmer is not None:
        out["heap_trim"] = trimmer.status()
    return out
