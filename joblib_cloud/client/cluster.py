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
    HostConnectError,
    HostLostError,
)
from ..wire.protocol import (
    AbortMeta,
    Kind,
)
from ..wire.serialization import ObjectStore
from .batch import Batch, resolve
from .progress import Progress
from .session import HostSession

if TYPE_CHECKING:
    from .staging import Staging


log = logging.getLogger("joblib_cloud")

#: A batch whose host was lost is re-run at most this many times.
MAX_TRIES = 3
#: A cluster idle this close to ``idle_timeout`` is not given new work: its agents may be
#: stopping at that very moment (their clock starts no earlier than the client's).
IDLE_MARGIN = 5.0


class Cluster:
    """Connected hosts plus the queue of batches waiting for a free slot."""

    def __init__(self, config: CloudConfig, workers_per_host: int | None = None) -> None:
        self.config = config
        #: Guards the queue and every host's in-flight table.  Each host's sender waits on
        #: its own condition of this lock, so a result or a new batch wakes one thread,
        #: not all of them (bench/tiny_tasks.py, batch_size=1).
        self.lock = threading.RLock()
        self.pending: collections.deque[Batch] = collections.deque()
        self.hosts: list[HostSession] = []
        self.store = ObjectStore(config.cache_threshold)
        self.closed = False
        #: Hosts still connecting (booting, installing): they take work once they join,
        #: so the queue waits for them rather than failing while any is on its way.
        self.joining = 0
        #: Hosts that never joined, and why.
        self.failures: dict[str, BaseException] = {}
        #: The workers a host will have, before it says so (the fleet's target capacity).
        self.workers_per_host = workers_per_host
        self.changed = threading.Condition(self.lock)  # a host joined or gave up
        #: What the user sees of this cluster: the launch, then each call's progress.
        self.progress: Progress | None = None
        #: Say "first results" once, while a fleet of several hosts comes up.
        self.announce_first_result = False
        self._monitoring = False
        #: The hosts' boot installed packages= (aws): the client need not.
        self.boot_installs_packages = False
        #: Large arguments staged once for all hosts, where the provider has a store.
        self.staging: Staging | None = None
        #: When work last went out or came back; why the hosts stopped for lack of it.
        self.last_work = time.monotonic()
        self.stopped_idle = ""

    # -- lifecycle ---------------------------------------------------------------
    def attach(self, hosts: list[HostSession]) -> None:
        """These hosts are connected: they take work from now on."""
        for host in hosts:
            self.join(host, expected=False)

    def expect(self, count: int) -> None:
        """``count`` hosts are on their way (see :meth:`join` and :meth:`give_up_on`)."""
        with self.lock:
            self.joining += count

    def join(self, host: HostSession, expected: bool = True) -> None:
        """A host finished its handshake: it takes work at once."""
        with self.lock:
            if expected:
                self.joining -= 1
            if self.closed:
                host.close()
                return
            host.joined_at = time.time()
            self.last_work = time.monotonic()  # its agent's idle clock starts now
            self.hosts.append(host)
            self.wake_all()
            self.changed.notify_all()
            if not self._monitoring:
                self._monitoring = True
                threading.Thread(target=self._monitor, daemon=True,
                                 name=f"joblib-cloud-monitor-{self.config.cluster}").start()

    def give_up_on(self, name: str, error: BaseException) -> None:
        """A host that never came up: the others take its share; with none left and none
        coming, what waits fails with every host's reason."""
        with self.lock:
            self.joining -= 1
            self.failures[name] = error
            if self.progress is not None:
                self.progress.host(name, "failed", detail=type(error).__name__)
            self.changed.notify_all()
            self.wake_all()  # with none left to come, hosts may queue a batch ahead
            stranded = self._strand_if_hopeless()
        if self.alive_hosts and not self.closed:
            log.warning("host %s did not come up, the others take its share: %s", name, error)
        self._fail(stranded)

    def first_result(self) -> None:
        progress, self.announce_first_result = self.progress, False
        if progress is not None:
            progress.update(f"first results; {len(self.alive_hosts)} of "
                            f"{len(self.alive_hosts) + self.joining + len(self.failures)} "
                            "hosts ready")

    def wait_until_settled(self, timeout: float | None = None) -> bool:
        """Until every host has joined or given up (``joblib-cloud up``, tests)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.lock:
            while self.joining and not self.closed:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self.changed.wait(left)
            return True

    def wait_for_first_host(self) -> None:
        """Until a host has joined; raises the reason(s) when none will."""
        with self.lock:
            while not self.alive_hosts and self.joining and not self.closed:
                self.changed.wait()
            if self.alive_hosts:
                return
        raise self.connect_error()

    def connect_error(self) -> BaseException:
        """Why no host came up: the one error as it is, or all of them."""
        errors = list(self.failures.items())
        if len(errors) == 1:
            return errors[0][1]
        message = "; ".join(f"{name}: {exc}" for name, exc in errors)
        error = HostConnectError(f"{len(errors)} hosts failed to connect: {message}")
        error.__cause__ = errors[0][1] if errors else None
        return error

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

    def fail_everything(self, error: BaseException) -> None:
        """Every waiting and running batch fails with ``error``; the cluster closes."""
        with self.lock:
            batches = list(self.pending) + [j for h in self.hosts for j in h.inflight.values()]
            self.pending.clear()
        for job in batches:
            resolve(job, exc=error)
        self.close()

    def wake_all(self) -> None:
        """Every host's sender looks at the queue again (with ``lock`` held)."""
        for host in self.hosts:
            host.wake.notify()

    def takers(self) -> list[HostSession]:
        """The hosts that may take the next batch (with ``lock`` held): those with an idle
        worker; only when there is none and no host is still joining, those below their
        capacity.

        Without that order one host could queue 2x its workers while another sits idle,
        which leaves a few long tasks running one after another.
        """
        alive = self.alive_hosts
        idle = [h for h in alive if len(h.inflight) < h.workers]
        if idle or self.joining:  # hosts on their way take what waits here, not behind a
            return idle           # busy host's running batches
        return [h for h in alive if len(h.inflight) < h.capacity]

    def wake_one(self, exclude: HostSession | None = None) -> None:
        """The sender of a host that may take the next queued batch (with ``lock`` held)."""
        for host in self.takers():
            if host is not exclude:
                host.wake.notify()
                return

    @property
    def alive_hosts(self) -> list[HostSession]:
        return [h for h in self.hosts if h.alive]

    def expired(self) -> str:
        """Why this cluster must not take new work although it may look alive: its hosts
        stopped, or are about to stop, after ``idle_timeout`` without work ("" if not)."""
        if self.stopped_idle:
            return self.stopped_idle
        idle = time.monotonic() - self.last_work
        with self.lock:
            busy = bool(self.pending) or any(h.inflight for h in self.hosts)
        margin = min(IDLE_MARGIN, self.config.idle_timeout / 4)
        if not busy and self.alive_hosts and idle >= self.config.idle_timeout - margin:
            return f"had no work for {idle:.0f}s (idle_timeout={self.config.idle_timeout:g})"
        return ""

    @property
    def usable(self) -> bool:
        """Open, with a host here or on its way."""
        return not self.closed and bool(self.alive_hosts or self.joining)

    @property
    def reusable(self) -> bool:
        """Usable, and not stopped or stopping for lack of work (see :meth:`expired`)."""
        return self.usable and not self.expired()

    @property
    def n_workers(self) -> int:
        return sum(h.workers for h in self.alive_hosts)

    @property
    def target_workers(self) -> int:
        """The workers of the hosts that are here and of those still coming: joblib keeps
        enough batches queued for hosts that join mid-call."""
        alive = self.alive_hosts
        per_host = self.workers_per_host or max((h.workers for h in alive), default=1)
        return sum(h.workers for h in alive) + self.joining * per_host

    # -- work ----------------------------------------------------------------------
    def submit(self, job: Batch) -> Future:
        self.last_work = time.monotonic()
        with self.lock:
            if not self.alive_hosts and not self.joining:
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

    def flush_output(self) -> None:
        """The end of a call: what tasks printed without a final newline is shown."""
        for host in list(self.hosts):
            host.flush_output()

    def live_refs(self) -> set[str]:
        with self.lock:
            jobs = list(self.pending) + [j for h in self.hosts for j in h.inflight.values()]
        return set().union(*(j.refs for j in jobs))

    def new_call(self) -> None:
        self.store.new_call()
        self.store.forget_unused(self.live_refs())

    # -- failures ------------------------------------------------------------------
    def _lost_error(self) -> ClusterLostError:
        detail = "; ".join([f"{h.name}: {h.lost_reason or 'closed'}" for h in self.hosts]
                           + [f"{name}: did not come up: {exc}"
                              for name, exc in self.failures.items()])
        return ClusterLostError(
            f"no host of cluster {self.config.cluster!r} is left ({detail}). "
            "The remaining work could not run; start the call again to reconnect.")

    def host_lost(self, host: HostSession, reason: str) -> None:
        with self.lock:
            if not host.alive:
                return
            host.alive = False
            host.lost_reason = reason
            if self.progress is not None:
                self.progress.host(host.name, "lost", detail=reason[:60])
            jobs = sorted(host.inflight.values(), key=lambda j: j.id)
            host.inflight.clear()
            survivors = self.alive_hosts
            hope = bool(survivors or self.joining)
            retry, failed = [], []
            for job in jobs:
                if job.aborted or job.future.done():
                    continue
                job.tries += 1
                (retry if hope and job.tries < MAX_TRIES else failed).append(job)
            for job in reversed(retry):
                self.pending.appendleft(job)
            failed.extend(self._strand_if_hopeless())
            self.wake_all()
        if not self.closed and (jobs or not self.stopped_idle):
            log.warning("host %s lost: %s; %d batch(es) re-queued on %d remaining host(s)",
                        host.name, reason, len(retry), len(survivors))
        host.close()
        if failed:
            error: Exception = self._lost_error() if not hope else HostLostError(
                f"host {host.name} was lost ({reason}) and this batch already failed on "
                f"{MAX_TRIES} hosts")
            for job in failed:
                resolve(job, exc=error)

    def _strand_if_hopeless(self) -> list[Batch]:
        """With ``lock`` held: no host here and none coming, so the queue can never run."""
        if self.alive_hosts or self.joining:
            return []
        stranded = list(self.pending)
        self.pending.clear()
        return stranded

    def _fail(self, batches: list[Batch]) -> None:
        if batches:
            error = self._lost_error()
            for job in batches:
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

