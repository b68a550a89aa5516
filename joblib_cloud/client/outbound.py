"""What goes out to one host's agent, and who may write it.

This is the narrow door that the parts sending on a host's stream get (uploads,
package installs, the scheduler's control frames): they never see the session that reads
the host's answers, nor the scheduler's tables.  A stream has one writer at a time, so
frames never interleave: the host's sender thread, or a thread that submits a small batch
and sends it itself (``Cluster.submit``).  The right to write is taken and given back with
the scheduler's lock held.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..wire.protocol import Kind, encode
from .streams import AgentStream

if TYPE_CHECKING:
    from .batch import Batch


class Outbound:
    """One host's outgoing frames: control frames waiting for its sender thread, batches
    to send again, and the stream itself for whoever holds the writer."""

    def __init__(self, name: str, stream: AgentStream, lock: threading.RLock,
                 ping_every: float) -> None:
        self.name = name
        self.stream = stream
        #: The scheduler's lock: the writer, the outbox and ``wake`` are guarded by it.
        self.lock = lock
        #: This host's sender thread waits on it: a result or new work wakes one thread.
        self.wake = threading.Condition(lock)
        self.outbox: collections.deque[tuple[Kind, Mapping[str, Any]]] = collections.deque()
        #: In-flight batches to send again (after an install their module was missing).
        self.resends: collections.deque[Batch] = collections.deque()
        self.held = False
        self.ping_every = ping_every
        self.last_send = time.monotonic()
        self.alive = False
        self.lost_reason = ""

    # -- the writer ------------------------------------------------------------------
    def take(self) -> None:
        """With ``lock`` held."""
        assert not self.held, "two writers on one stream"
        self.held = True

    def give_back(self) -> None:
        """With ``lock`` held."""
        self.held = False

    def send(self, kind: Kind, meta: Mapping[str, Any] | None = None,
             data: bytes | memoryview = b"") -> None:
        """Write one frame: only the writer's holder calls this."""
        for part in encode(kind, meta, data):
            if len(part):
                self.stream.sendall(part)
        self.last_send = time.monotonic()

    # -- for the sender thread ---------------------------------------------------------
    def post(self, kind: Kind, meta: Mapping[str, Any]) -> None:
        """A control frame (INSTALL, ABORT, BYE) for this host's sender thread to send."""
        with self.lock:
            self.outbox.append((kind, meta))
            self.wake.notify()

    def resend(self, job: Batch) -> None:
        """``job``, still in this host's in-flight table, goes to the host again."""
        with self.lock:
            self.resends.append(job)
            self.wake.notify()

    def drained(self) -> bool:
        return not self.outbox
