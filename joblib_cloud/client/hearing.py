"""Silence that counts: how long a host said nothing while this process could hear it.

A clock ticked every ``period`` that finds itself late by more than a period learns that
this process did not run meanwhile (CPU pressure, a long GC pause).  What hosts sent then
still waits in sockets, so silence counts only from that moment on.  The cluster's monitor
(hosts at work) and each agent's start (before its first frame) judge silence this way.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .streams import AgentStream


class Hearing:
    """Since when this process could hear (see the module)."""

    def __init__(self, period: float) -> None:
        self.period = period
        self.since = self._last = time.monotonic()

    def tick(self) -> float:
        """Called about every ``period``: the time now."""
        now = time.monotonic()
        if now - self._last > 2 * self.period:
            self.since = now
        self._last = now
        return now

    def silence(self, last_heard: float, now: float) -> float:
        return now - max(last_heard, self.since)


#: The agent's start may be silent four times as long as a working host, and never less
#: than ``START_SILENCE_MIN``: it imports joblib (and numpy with it) and starts its worker
#: processes, on a machine that may be busy.
START_SILENCE_HEARTBEATS = 4
START_SILENCE_MIN = 20.0
#: With ``image=`` the agent's start includes ``docker run`` pulling the image, which says
#: a line per layer, and nothing while one large layer downloads.
IMAGE_START_SILENCE = 900.0


def start_silence_limit(heartbeat_timeout: float, image: str | None) -> float:
    limit = max(START_SILENCE_HEARTBEATS * heartbeat_timeout, START_SILENCE_MIN)
    return max(limit, IMAGE_START_SILENCE) if image else limit


class StartWatch:
    """Kills an agent if, while it starts, the host says nothing (on stdout or stderr) for
    ``limit`` seconds: the stream's reads and writes then fail, so a start that hangs ends
    in an error instead of waiting for ever, and leaves no process behind.  ``silent`` is
    then how long it was."""

    def __init__(self, stream: AgentStream, last_heard: Callable[[], float], limit: float) -> None:
        self.stream, self.last_heard, self.limit = stream, last_heard, limit
        self.silent = 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True,
                                        name=f"joblib-cloud-start-{stream.name}")
        self._thread.start()

    def stop(self) -> None:
        """Stop watching; a kill under way ends first (the connection it uses is closed
        once the start has failed)."""
        self._done.set()
        self._thread.join()

    def _watch(self) -> None:
        hearing = Hearing(min(1.0, self.limit / 4))
        while not self._done.wait(hearing.period):
            silent = hearing.silence(self.last_heard(), hearing.tick())
            if silent > self.limit and not self.stream.has_unread():
                self.silent = silent
                self.stream.kill()
                return
