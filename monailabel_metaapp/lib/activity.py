"""Who gets the CPU: work an annotator waits for first, background learning only in quiet moments.

Requests an annotator waits for (inference, a label save, quick adaptation, Next Sample) run inside
`GATE.busy()`. Background learners run in short steps (well under a second each) and call
`GATE.wait_turn(level)` before every step, so a request pre-empts them within one step. Levels order
the learners: structure refinement (`REFINE`) yields to foreground work, site adaptation of the
encoder (`SITE`) yields to both. One gate per process: every service of the app shares the cores.

A step already running when a request arrives would still share the cores with it for up to a
second, so background threads also run at the lowest CPU priority (`lower_thread_priority`): the
kernel then gives the request the cores at once, and the step finishes in the gaps. An
administrator can pause every background learner (`pause`), e.g. for a busy clinic.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

FOREGROUND, REFINE, SITE = 0, 1, 2
GRACE_SECONDS = 0.3  # quiet time after the last foreground request before background work resumes
BACKGROUND_NICE = 19  # the lowest CPU priority: a nice-0 request gets about 98% of a contended core

logger = logging.getLogger(__name__)


def lower_thread_priority(nice: int = BACKGROUND_NICE) -> bool:
    """Give the calling thread, and the compute threads it starts from now on (torch's OpenMP team
    inherits it), CPU priority `nice`. Linux sets niceness per thread; elsewhere the call would lower
    the whole server, so it does nothing there and the gate alone orders the work.

    Args:
        nice: the niceness, 0 (normal) to 19 (lowest).

    Returns:
        Whether the priority was lowered.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except OSError as e:  # e.g. a sandbox that forbids it: the gate still orders the work
        logger.warning("could not lower the priority of %s: %s", threading.current_thread().name, e)
        return False
    return True


class ActivityGate:
    """Counts running work per priority level and lets lower levels wait for higher ones to be quiet.

    Args:
        grace: seconds a level must stay quiet before lower levels go on (a client often sends
            requests back to back: a save, then an inference).
    """

    def __init__(self, grace: float = GRACE_SECONDS):
        self.grace = grace
        self._active: dict[int, int] = {}
        self._last: dict[int, float] = {}
        self._cv = threading.Condition()
        self._paused = False
        self.ticks = 0  # grows with every request finished and every background step begun

    @contextmanager
    def busy(self, level: int = FOREGROUND) -> Iterator[None]:
        """Mark work of `level` as running for the duration of the block."""
        with self._cv:
            self._active[level] = self._active.get(level, 0) + 1
        try:
            yield
        finally:
            with self._cv:
                self._active[level] -= 1
                self._last[level] = time.monotonic()
                self.ticks += 1
                self._cv.notify_all()

    def pause(self) -> None:
        """Hold every background level (> FOREGROUND) at its next `wait_turn` until `resume`."""
        with self._cv:
            self._paused = True

    def resume(self) -> None:
        with self._cv:
            self._paused = False
            self._cv.notify_all()

    @property
    def paused(self) -> bool:
        return self._paused

    def running(self, level: int) -> int:
        """How many pieces of work of `level` are running now."""
        with self._cv:
            return self._active.get(level, 0)

    def _blocking(self, level: int) -> float:
        """Seconds to wait before work of `level` may run (0: its turn now)."""
        if self._paused and level > FOREGROUND:
            return self.grace
        now = time.monotonic()
        wait = 0.0
        for lv in range(level):
            if self._active.get(lv, 0):
                return self.grace
            wait = max(wait, self._last.get(lv, -1e9) + self.grace - now)
        return wait

    def wait_turn(self, level: int, stop: threading.Event | None = None, timeout: float | None = None) -> bool:
        """Block until no work of a higher priority than `level` has run for `grace` seconds.
        Returns False when `stop` was set or `timeout` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while True:
                if stop is not None and stop.is_set():
                    return False
                wait = self._blocking(level)
                if wait <= 0:
                    self.ticks += 1
                    return True
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    wait = min(wait, left)
                self._cv.wait(min(wait, 0.1))

    def quiet(self, level: int) -> bool:
        """True when work of `level` could run now."""
        with self._cv:
            return self._blocking(level) <= 0


GATE = ActivityGate()
