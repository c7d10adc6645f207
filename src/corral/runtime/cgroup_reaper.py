"""Removing finished commands' cgroups off the event loop, in batches.

Every command gets cgroups of its own (a cgroup2 one to kill its tree, a v1 memory one for its
peak where the host has one); once it has ended they serve the sandbox's next command where they
can (command_cgroups.py), and are removed where they cannot. An rmdir of a cgroup waits in
the kernel (~0.5 ms for a v1 memory cgroup that was charged pages), too long for the event loop,
and a thread hop per command cost more than the removal itself at hundreds of execs a second.
So finished commands queue here, and one thread removes whatever has gathered every
`interval`: one wake-up per batch, not per command. A cgroup still populated (a zombie not yet
reaped, processes left in the background) is tried again every `retry_after` until it is empty
or its sandbox's own removal has taken it.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

# A removal: True once done (or nothing is left to remove), False while the cgroup is busy.
Removal = Callable[[], bool]


class CgroupReaper:
    def __init__(self, *, interval: float = 0.02, retry_after: float = 1.0) -> None:
        self.interval = interval
        self.retry_after = retry_after
        self._queue: collections.deque[Removal] = collections.deque()
        self._busy: list[Removal] = []  # thread-owned: tried again after retry_after
        self._wake = threading.Event()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # starting the thread

    def add(self, removal: Removal) -> None:
        """Queue a removal (from any thread). Never blocks on the removal itself."""
        self._queue.append(removal)
        if self._thread is None:
            self._start()
        if not self._wake.is_set():  # one wake per batch: later adds ride along
            self._wake.set()

    def pending(self) -> int:
        return len(self._queue) + len(self._busy)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread after one last pass; what is still busy then is left to the
        sandboxes' own removal (their trees are removed whole)."""
        self._closing = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._run_batch()

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="cgroup-reaper", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while not self._closing:
            self._wake.wait(self.retry_after if self._busy else None)
            if self._closing:
                return
            time.sleep(self.interval)  # let a batch gather
            self._wake.clear()
            self._run_batch()

    def _run_batch(self) -> None:
        again = []
        for removal in self._busy:
            if not self._try(removal):
                again.append(removal)
        while self._queue:
            removal = self._queue.popleft()
            if not self._try(removal):
                again.append(removal)
        self._busy = again

    @staticmethod
    def _try(removal: Removal) -> bool:
        try:
            return removal()
        except Exception:  # one bad removal must not stop the others
            log.exception("removing a command's cgroups failed")
            return True
