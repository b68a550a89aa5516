"""A handle on N connected hosts: schedules batches on them and survives losing some.

Threads per host: a *sender* (uploads, control frames, pings, and batches that cannot go
out at once; one writer at a time keeps frames in order) and a *reader* (results, output,
heartbeats): over SSH that is paramiko's own transport thread, which hands us each
packet's data (``paramiko_fast.DeliveringPipe``); over a pipe, a thread of ours.  One
*monitor* per cluster declares a host lost after ``heartbeat_timeout`` of silence.

The cluster is the scheduler (``scheduling.Scheduler``) a host's session meets: the next
batch for a host, a slot freed, a host lost.  The queue itself and which host takes the
next batch are ``dispatch.Dispatch``; this module adds hosts joining and leaving.

Invariant: every submitted batch's future ends in a result or an exception.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from ..config import CloudConfig
from ..errors import (
    AbortedError,
    ClusterLostError,
    HostConnectError,
    HostLostError,
)
from ..wire.protocol import (
    Kind,
)
from ..wire.serialization import ObjectStore
from .batch import Batch, resolve
from .dispatch import Dispatch
from .hearing import Hearing
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


class Cluster(Dispatch):
    """Connected hosts plus the queue of batches waiting for a free slot."""

    def __init__(self, config: CloudConfig, workers_per_host: int | None = None) -> None:
        super().__init__()
        self.config = config
        #: Every host that joined, lost ones included (their reasons make errors).
        self.hosts: list[HostSession] = []
        self.store = ObjectStore(config.cache_threshold)
        self.closed = False
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
        #: Why the hosts stopped for lack of work.
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
            if host.alive:  # not lost between its handshake and now
                self._running[host] = {}
                self._update(host)
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
            if self._running and not self.closed:  # said before anyone sees the failure
                log.warning("host %s did not come up, the others take its share: %s",
                            name, error)
            self.joining -= 1
            self.failures[name] = error
            if self.progress is not None:
                self.progress.host(name, "failed", detail=type(error).__name__)
            self.changed.notify_all()
            self.wake_all()  # with none left to come, hosts may queue a batch ahead
            stranded = self._strand_if_hopeless()
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
            jobs = list(self.pending) + [j for t in self._running.values() for j in t.values()]
            self.pending.clear()
            for host in hosts:
                host.post(Kind.BYE, {})
        deadline = time.monotonic() + 2
        for host in hosts:
            while host.alive and not host.out.drained() and time.monotonic() < deadline:
                time.sleep(0.01)
            with self.lock:
                host.mark_lost("closed")
                self._forget(host)
                host.wake()
            host.close()
        for job in jobs:
            resolve(job, exc=AbortedError(f"{job.label}: the cluster was closed"))
        with self.lock:
            self.wake_all()

    def fail_everything(self, error: BaseException) -> None:
        """Every waiting and running batch fails with ``error``; the cluster closes."""
        with self.lock:
            batches = list(self.pending) + [j for t in self._running.values()
                                            for j in t.values()]
            self.pending.clear()
        for job in batches:
            resolve(job, exc=error)
        self.close()

    def result_came(self, host: HostSession, job: Batch) -> None:
        if self.progress is not None:
            self.progress.task_done(host.name, job.size)
            if self.announce_first_result:  # the fleet is still coming up: say it works
                self.first_result()

    def host_installing(self, host: HostSession, detail: str) -> None:
        if self.progress is not None:
            self.progress.host(host.name, "ready", host.workers, detail)

    def host_stopped_idle(self, host: HostSession, seconds: float) -> None:
        self.stopped_idle = (f"stopped after {seconds:.0f}s without work "
                             f"(idle_timeout={self.config.idle_timeout:g})")
        self.host_lost(host, self.stopped_idle)

    def hosts_without(self, digest: str) -> int:
        with self.lock:
            alive = self.alive_hosts
            holders = sum(digest in h.uploads.cache for h in alive)
            return len(alive) + self.joining - holders

    def expired(self) -> str:
        """Why this cluster must not take new work although it may look alive: its hosts
        stopped, or are about to stop, after ``idle_timeout`` without work ("" if not)."""
        if self.stopped_idle:
            return self.stopped_idle
        idle = time.monotonic() - self.last_work
        with self.lock:
            busy = bool(self.pending) or any(self._running.values())
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

    def flush_output(self) -> None:
        """The end of a call: what tasks printed without a final newline is shown."""
        for host in list(self.hosts):
            host.flush_output()

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
            if not host.mark_lost(reason):
                return
            if self.progress is not None:
                self.progress.host(host.name, "lost", detail=reason[:60])
            jobs = sorted(self._forget(host).values(), key=lambda j: j.id)
            survivors = self.alive_hosts
            hope = bool(survivors or self.joining)
            retry: list[Batch] = []
            failed: list[Batch] = []
            for job in jobs:
                if job.aborted or job.future.done():
                    continue
                job.tries += 1
                (retry if hope and job.tries < MAX_TRIES else failed).append(job)
            for job in reversed(retry):
                self.pending.appendleft(job)
            failed.extend(self._strand_if_hopeless())
            self.wake_all()
        if self.closed or (self.stopped_idle and not jobs):
            pass
        elif jobs:
            log.warning("host %s lost: %s; %d batch(es) re-queued on %d remaining host(s)",
                        host.name, reason, len(retry), len(survivors))
        else:  # nothing ran there: said when work would have gone to it, if it ever does
            self.lost_idle.append(f"{host.name} ({reason})")
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
        """Silence counts only while this process could hear (``hearing.Hearing``).  A
        host whose connection has bytes we have not read yet spoke: it is not silent,
        however late we read them."""
        timeout = self.config.heartbeat_timeout
        hearing = Hearing(min(1.0, timeout / 4))
        while not self.closed:
            time.sleep(hearing.period)
            now = hearing.tick()
            for host in self.alive_hosts:
                silent = hearing.silence(host.last_recv, now)
                if silent > timeout and not host.in_callback and not host.stream.has_unread():
                    self.host_lost(host, f"no heartbeat for {silent:.1f}s (the host or its "
                                         "network stalled)")

