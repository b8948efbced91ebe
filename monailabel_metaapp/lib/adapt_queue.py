"""Background adaptation with coalescing: a burst of saves for one structure becomes one
adaptation; a save that lands while its structure is adapting queues exactly one more run, so no
save is lost and the request path never waits."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)


class AdaptQueue:
    def __init__(self, work: Callable[[str], None], on_state: Callable[[str, str, str | None], None]):
        self._work, self._on_state = work, on_state
        self._pending: list[str] = []
        self._running: str | None = None
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="metaapp-adapt", daemon=True)
        self._thread.start()

    def submit(self, names: list[str]) -> list[str]:
        with self._cv:
            for n in names:
                if n not in self._pending:
                    self._pending.append(n)
                    self._on_state(n, "queued", None)
            self._cv.notify()
        return names

    def idle(self) -> bool:
        with self._cv:
            return not self._pending and self._running is None

    def wait_idle(self, timeout: float) -> bool:
        """Block until nothing is queued or running (tests and benchmarks)."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._pending and self._running is None, timeout)

    def _loop(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: bool(self._pending))
                name = self._running = self._pending.pop(0)
            try:
                self._on_state(name, "adapting", None)
                self._work(name)
            except Exception as e:  # a failed adaptation must not kill the worker
                logger.exception("adaptation of %s failed", name)
                with self._cv:  # a save meanwhile queued another run: that is what clients should see
                    again = name in self._pending
                self._on_state(name, "queued" if again else "failed", None if again else str(e))
            finally:
                with self._cv:
                    self._running = None
                    self._cv.notify_all()
