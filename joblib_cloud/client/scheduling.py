"""The scheduler as one host's session sees it: a small interface, so that ``session.py``
never reaches into the cluster's queue or tables (``cluster.Cluster`` implements it).

Every method that names a host takes the session itself (``Host``: ``session.py``'s
``HostSession``, which this module need not import).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ..config import CloudConfig
    from ..wire.serialization import ObjectStore
    from .batch import Batch
    from .staging import Staging


Host = TypeVar("Host", contravariant=True)


class Scheduler(Protocol[Host]):
    #: Guards the queue, the in-flight tables and every host's writer (``Outbound``).
    lock: threading.RLock
    config: CloudConfig
    store: ObjectStore
    staging: Staging | None

    def next_batch(self, host: Host) -> Batch | None:
        """With ``lock`` held: a queued batch this host may take now (it is in the host's
        in-flight table from here on), or None."""

    def more_for(self, host: Host) -> bool:
        """With ``lock`` held: whether this host should look at the queue again."""

    def running(self, host: Host, batch_id: int) -> Batch | None:
        """The batch ``batch_id`` in flight on ``host``, if it still is."""

    def running_on(self, host: Host) -> Mapping[int, Batch]:
        """The batches in flight on ``host`` (to read, never to change)."""

    def finished(self, host: Host, batch_id: int) -> Batch | None:
        """A slot freed: the batch leaves the host's in-flight table (None: it had left,
        e.g. the host was declared lost, or it was aborted)."""

    def result_came(self, host: Host, job: Batch) -> None:
        """A batch's result arrived (progress, the cluster's idle clock)."""

    def host_lost(self, host: Host, reason: str) -> None:
        """The host is gone: its batches go back to the queue."""

    def host_installing(self, host: Host, detail: str) -> None:
        """What the host's boot still installs changed (shown beside its state)."""

    def host_stopped_idle(self, host: Host, seconds: float) -> None:
        """The agent exits after ``idle_timeout`` without work."""

    def hosts_without(self, digest: str) -> int:
        """Hosts here or coming that do not hold this cached object (staging's choice)."""

    def refs_running_on(self, host: Host) -> set[str]:
        """Cached objects the batches in flight on ``host`` need (not to be evicted)."""
