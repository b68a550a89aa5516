"""A handle on N connected hosts: schedules batches on them and survives losing some.

Threads per host: a *sender* (uploads, control frames, pings, and batches that cannot go
out at once; one writer at a time keeps frames in order) and a *reader* (results, output,
heartbeats): over SSH that is paramiko's own transport thread, which hands us each
packet's data (``paramiko_fast.DeliveringPipe``); over a pipe, a thread of ours.  One
*monitor* per cluster declares a host lost after ``heartbeat_timeout`` of silence.  Hosts
pull work from one shared queue when they have a free slot, so a fast host takes more and
a lost host's batches simply go back to the front of the queue.

Invariant: every submitted batch's future ends in a result or an exception.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING

from ..config import CloudConfig
from ..errors import (
    AbortedError,
    ClusterLostError,
    HostLostError,
)
from ..wire.protocol import (
    AbortMeta,
    Kind,
)
from ..wire.serialization import ObjectStore
from .batch import Batch, resolve
from .session import HostSession

if TYPE_CHECKING:
    pass


log = logging.getLogger("joblib_cloud")

#: A batch whose host was lost is re-run at most this many times.
MAX_TRIES = 3


class Cluster:
    """Connected hosts plus the queue of batches waiting for a free slot."""

    def __init__(self, config: CloudConfig) -> None:
        self.config = config
        #: Guards the queue and every host's in-flight table.  Each host's sender waits on
        #: its own condition of this lock, so a result or a new batch wakes one thread,
        #: not all of them (bench/tiny_tasks.py, batch_size=1).
        self.lock = threading.RLock()
        self.pending: collections.deque[Batch] = collections.deque()
        self.hosts: list[HostSession] = []
        self.store = ObjectStore(config.cache_threshold)
        self.closed = False
        #: The hosts' boot installed packages= (aws): the client need not.
        self.boot_installs_packages = False

    # -- lifecycle ---------------------------------------------------------------
    def attach(self, hosts: list[HostSession]) -> None:
        self.hosts = hosts
        threading.Thread(target=self._monitor, daemon=True,
                         name=f"joblib-cloud-monitor-{self.config.cluster}").start()

    def close(self) -> None:
        with self.lock:
            self.closed = True
            hosts = list(self.hosts)
            jobs = list(self.pending) + [j for h in hosts for j in h.inflight.values()]
            self.pending.clear()
            for host in hosts:
                host.outbox.append((Kind.BYE, {}))
            self.wake_all()
        deadline = time.monotonic() + 2
        for host in hosts:
            while host.alive and host.outbox and time.monotonic() < deadline:
                time.sleep(0.01)
            host.alive = False
            host.close()
        for job in jobs:
            resolve(job, exc=AbortedError(f"{job.label}: the cluster was closed"))
        with self.lock:
            self.wake_all()

    def wake_all(self) -> None:
        """Every host's sender looks at the queue again (with ``lock`` held)."""
        for host in self.hosts:
            host.wake.notify()

    def takers(self) -> list[HostSession]:
        """The hosts that may take the next batch (with ``lock`` held): those with an idle
        worker; only when there is none, those below their capacity.

        Without that order one host could queue 2x its workers while another sits idle,
        which leaves a few long tasks running one after another.
        """
        alive = self.alive_hosts
        idle = [h for h in alive if len(h.inflight) < h.workers]
        return idle or [h for h in alive if len(h.inflight) < h.capacity]

    def wake_one(self, exclude: HostSession | None = None) -> None:
        """The sender of a host that may take the next queued batch (with ``lock`` held)."""
        for host in self.takers():
            if host is not exclude:
                host.wake.notify()
                return

    @property
    def alive_hosts(self) -> list[HostSession]:
        return [h for h in self.hosts if h.alive]

    @property
    def n_workers(self) -> int:
        return sum(h.workers for h in self.alive_hosts)

    # -- work ----------------------------------------------------------------------
    def submit(self, job: Batch) -> Future:
        with self.lock:
            if not self.alive_hosts:
                resolve(job, exc=self._lost_error())
                return job.future
            # This thread sends the oldest waiting batch itself if a host can take it at
            # once: queued batches keep their order, and a queue that filled up for a
            # moment does not leave every later batch to the sender threads' wake-ups.
            self.pending.append(job)
            first = self.pending[0]
            direct = next((h for h in self.takers() if h.can_send_now(first)), None)
            if direct is None:
                self.wake_one()
                return job.future
            self.pending.popleft()
            direct.inflight[first.id] = first
            direct.writer.take()
            if self.pending:
                self.wake_one(exclude=direct)
        direct.send_now(first)
        return job.future

    def abort(self, owner: object) -> None:
        """Cancel ``owner``'s batches: queued ones at once, running ones on their hosts."""
        with self.lock:
            dropped = [j for j in self.pending if j.owner is owner]
            self.pending = collections.deque(j for j in self.pending if j.owner is not owner)
            for host in self.alive_hosts:
                mine = [j for j in host.inflight.values() if j.owner is owner]
                for job in mine:
                    job.aborted = True
                if mine:
                    abort: AbortMeta = {"ids": [j.id for j in mine]}
                    host.outbox.append((Kind.ABORT, abort))
                dropped.extend(mine)
            self.wake_all()
        for job in dropped:
            resolve(job, exc=AbortedError(f"{job.label} was cancelled"))

    def live_refs(self) -> set[str]:
        with self.lock:
            jobs = list(self.pending) + [j for h in self.hosts for j in h.inflight.values()]
        return set().union(*(j.refs for j in jobs))

    def new_call(self) -> None:
        self.store.new_call()
        self.store.forget_unused(self.live_refs())

    # -- failures ------------------------------------------------------------------
    def _lost_error(self) -> ClusterLostError:
        detail = "; ".join(f"{h.name}: {h.lost_reason or 'closed'}" for h in self.hosts)
        return ClusterLostError(
            f"no host of cluster {self.config.cluster!r} is left ({detail}). "
            "The remaining work could not run; start the call again to reconnect.")

    def host_lost(self, host: HostSession, reason: str) -> None:
        with self.lock:
            if not host.alive:
                return
            host.alive = False
            host.lost_reason = reason
            jobs = sorted(host.inflight.values(), key=lambda j: j.id)
            host.inflight.clear()
            survivors = self.alive_hosts
            retry, failed = [], []
            for job in jobs:
                if job.aborted or job.future.done():
                    continue
                job.tries += 1
                (retry if survivors and job.tries < MAX_TRIES else failed).append(job)
            for job in reversed(retry):
                self.pending.appendleft(job)
            if not survivors:
                failed.extend(self.pending)
                self.pending.clear()
            self.wake_all()
        if not self.closed:
            log.warning("host %s lost: %s; %d batch(es) re-queued on %d remaining host(s)",
                        host.name, reason, len(retry), len(survivors))
        host.close()
        if failed:
            error: Exception = self._lost_error() if not survivors else HostLostError(
                f"host {host.name} was lost ({reason}) and this batch already failed on "
                f"{MAX_TRIES} hosts")
            for job in failed:
                resolve(job, exc=error)

    def _monitor(self) -> None:
        timeout = self.config.heartbeat_timeout
        while not self.closed:
            time.sleep(min(1.0, timeout / 4))
            now = time.monotonic()
            for host in self.alive_hosts:
                silent = now - host.last_recv
                if silent > timeout and not host.in_callback:
                    self.host_lost(host, f"no heartbeat for {silent:.1f}s (the host or its "
                                         "network stalled)")

