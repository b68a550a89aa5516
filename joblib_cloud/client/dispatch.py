"""The queue and the hosts' in-flight tables: which host takes the next batch.

Hosts pull work from one shared queue when they have a free slot, so a fast host takes
more and a lost host's batches go back to the front of the queue.  Which host takes the
next batch costs the same however many hosts there are: the hosts with an idle worker,
and those below their capacity, are kept in insertion-ordered sets updated on each
change, never found by a scan (``bench/scale.py`` measures the client's CPU per task
against the number of hosts).  Only this class changes the in-flight tables; a host's
session asks for work and frees slots through ``scheduling.Scheduler``.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import Future
from typing import Any

from ..errors import AbortedError, ClusterLostError
from ..wire.protocol import AbortMeta, Kind
from .batch import Batch, resolve
from .session import HostSession

log = logging.getLogger("joblib_cloud")

#: Hosts a submitting thread asks whether it may send a batch itself, before handing it
#: to a sender thread: a bound, so a submit costs the same however many hosts there are.
DIRECT_TRIES = 4


class Dispatch:
    """The queue of batches waiting for a free slot, and what runs where."""

    def __init__(self) -> None:
        #: Guards the queue, the in-flight tables and every host's writer.  Each host's
        #: sender waits on its own condition of this lock, so a result or a new batch
        #: wakes one thread, not all of them (bench/tiny_tasks.py, batch_size=1).
        self.lock = threading.RLock()
        self.pending: collections.deque[Batch] = collections.deque()
        #: Each alive host's batches in flight (batch id -> batch).
        self._running: dict[HostSession, dict[int, Batch]] = {}
        #: Alive hosts with an idle worker, and those below their capacity (ordered sets).
        self._idle: dict[HostSession, None] = {}
        self._room: dict[HostSession, None] = {}
        #: Hosts still connecting: they take work once they join.
        self.joining = 0
        #: When work last went out or came back.
        self.last_work = time.monotonic()
        #: Hosts lost with nothing running there, not said yet: a connection that ends as
        #: the program does (a tunnel or a proxy closing first) is no news.
        self.lost_idle: list[str] = []

    def _lost_error(self) -> ClusterLostError:
        raise NotImplementedError

    def _report_lost_idle(self) -> None:
        """Hosts lost while nothing ran there, said once work comes that they won't take."""
        with self.lock:
            lost, self.lost_idle[:] = list(self.lost_idle), []
            left = len(self._running)
        if lost:
            log.warning("lost while idle: host(s) %s; %d host(s) remain", ", ".join(lost),
                        left)

    def wake_all(self) -> None:
        """Every host's sender looks at the queue again (with ``lock`` held)."""
        for host in self._running:
            host.wake()

    def _update(self, host: HostSession) -> None:
        """With ``lock`` held: ``host``'s place in the idle and room sets."""
        running = self._running.get(host)
        if running is None:
            return
        n = len(running)
        for members, free in ((self._idle, n < host.workers), (self._room, n < host.capacity)):
            if free:
                members.setdefault(host)
            else:
                members.pop(host, None)

    def _forget(self, host: HostSession) -> dict[int, Batch]:
        """With ``lock`` held: ``host`` takes no more work; what was running there."""
        self._idle.pop(host, None)
        self._room.pop(host, None)
        return self._running.pop(host, {})

    def _takers(self) -> Iterator[HostSession]:
        """The hosts that may take the next batch (with ``lock`` held), in order: those
        with an idle worker; only when there is none and no host is still joining, those
        below their capacity.

        Without that order one host could queue 2x its workers while another sits idle,
        which leaves a few long tasks running one after another.
        """
        if self._idle or self.joining:  # hosts on their way take what waits here, not
            return iter(self._idle)     # behind a busy host's running batches
        return iter(self._room)

    def _may_take(self, host: HostSession) -> bool:
        return host in self._idle or (not self._idle and not self.joining
                                      and host in self._room)

    def wake_one(self, exclude: HostSession | None = None) -> None:
        """The sender of a host that may take the next queued batch (with ``lock`` held)."""
        for host in self._takers():
            if host is not exclude:
                host.wake()
                return

    # -- the scheduler, as a host's session sees it (``scheduling.Scheduler``) ---------
    def next_batch(self, host: HostSession) -> Batch | None:
        if not self.pending or not self._may_take(host):
            return None
        job = self.pending.popleft()
        self._running[host][job.id] = job
        self._update(host)
        if self.pending:
            self.wake_one(exclude=host)
        return job

    def more_for(self, host: HostSession) -> bool:
        return bool(self.pending) and self._may_take(host)

    def running(self, host: HostSession, batch_id: int) -> Batch | None:
        with self.lock:
            return self._running.get(host, {}).get(batch_id)

    def running_on(self, host: HostSession) -> Mapping[int, Batch]:
        return self._running.get(host, {})

    def finished(self, host: HostSession, batch_id: int) -> Batch | None:
        self.last_work = time.monotonic()
        with self.lock:
            running = self._running.get(host)
            job = running.pop(batch_id, None) if running is not None else None
            if job is not None:
                self._update(host)
                if self.pending:  # the freed slot is this host's to fill
                    host.wake()
        return job

    def refs_running_on(self, host: HostSession) -> set[str]:
        with self.lock:
            return set().union(*(j.refs for j in self._running.get(host, {}).values()))

    @property
    def alive_hosts(self) -> list[HostSession]:
        """The hosts taking work (a lost host leaves at once)."""
        return list(self._running)

    # -- work ----------------------------------------------------------------------
    def submit(self, job: Batch) -> Future[Any]:
        self.last_work = time.monotonic()
        if self.lost_idle:
            self._report_lost_idle()
        with self.lock:
            if not self._running and not self.joining:
                resolve(job, exc=self._lost_error())
                return job.future
            # This thread sends the oldest waiting batch itself if a host can take it at
            # once: queued batches keep their order, and a queue that filled up for a
            # moment does not leave every later batch to the sender threads' wake-ups.
            self.pending.append(job)
            first = self.pending[0]
            direct = next((h for h in itertools.islice(self._takers(), DIRECT_TRIES)
                           if h.claim(first)), None)
            if direct is None:
                self.wake_one()
                return job.future
            self.pending.popleft()
            self._running[direct][first.id] = first
            self._update(direct)
            if self.pending:
                self.wake_one(exclude=direct)
        direct.send_now(first)
        return job.future

    def abort(self, owner: object) -> None:
        """Cancel ``owner``'s batches: queued ones at once, running ones on their hosts."""
        with self.lock:
            dropped = [j for j in self.pending if j.owner is owner]
            self.pending = collections.deque(j for j in self.pending if j.owner is not owner)
            for host, running in self._running.items():
                mine = [j for j in running.values() if j.owner is owner]
                for job in mine:
                    job.aborted = True
                if mine:
                    abort: AbortMeta = {"ids": [j.id for j in mine]}
                    host.post(Kind.ABORT, abort)
                dropped.extend(mine)
            self.wake_all()
        for job in dropped:
            resolve(job, exc=AbortedError(f"{job.label} was cancelled"))

    def live_refs(self) -> set[str]:
        with self.lock:
            jobs = list(self.pending) + [j for t in self._running.values() for j in t.values()]
        return set().union(*(j.refs for j in jobs))

