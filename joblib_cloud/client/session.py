"""One host's agent as seen from the client: the handshake, its stream (what goes out:
``outbound.py``; what its cache holds: ``uploads.py``), its results, output and
heartbeats.

It meets the scheduler only through ``scheduling.Scheduler``: it asks for the next batch,
says a slot freed, says the host was lost.  Threads: a *sender* per host (uploads, control
frames, pings, and batches that cannot go out at once) and a *reader* (results, output,
heartbeats): over SSH that is paramiko's own transport thread, which hands us each
packet's data (``paramiko_fast``); over a pipe, a thread of ours.
"""

from __future__ import annotations

import pickle
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from ..config import CloudConfig
from ..errors import (
    AbortedError,
    HostConnectError,
    RemoteTaskError,
)
from ..wire.protocol import (
    JOIN_BELOW,
    PROTOCOL_VERSION,
    BatchMeta,
    ConfigMeta,
    FetchedMeta,
    FrameReader,
    InstalledMeta,
    Kind,
    RawFrame,
    ResultMeta,
    Status,
    frame_data,
    frame_meta,
)
from .agent_start import check_versions, did_not_start, said_nothing
from .batch import Batch, resolve, result_error
from .board import installing
from .hearing import StartWatch, start_silence_limit
from .outbound import Outbound
from .packages import HostPackages
from .streams import AgentStream, agent_preamble
from .uploads import HostUploads

if TYPE_CHECKING:
    from collections.abc import Mapping

    from .scheduling import Scheduler
    from .ssh import SSHConnection

#: How long an ended stream waits for the agent's stderr to end too (what it said last).
LAST_WORDS_WAIT = 2.0


class HostSession:
    """One host's agent, as seen from the client."""

    def __init__(self, scheduler: Scheduler[HostSession], name: str,
                 open_stream: Callable[[Callable[[bytes], None]], AgentStream],
                 connection: SSHConnection | None = None) -> None:
        self.scheduler = scheduler
        self.config = scheduler.config
        self.name = name
        self.connection = connection
        self.last_recv = time.monotonic()
        self.joined_at: float | None = None  # wall clock, when it started taking work
        self.in_callback = False  # a result's callbacks are running (joblib dispatching)
        self.workers = 0
        self.cpu_count = 0
        self.hello: dict[str, Any] = {}
        self._line_buffers: dict[str, bytes] = {}
        self._stderr_tail = b""
        self._reader = FrameReader(self._recv)  # the handshake's; then its frames are fed
        self.stream = open_stream(self.on_agent_stderr)
        self.out = Outbound(name, self.stream, scheduler.lock,
                            max(self.config.heartbeat_timeout / 5, 0.2))
        self.packages = HostPackages(self.out, lambda batch_id: scheduler.running(self, batch_id),
                                     lambda batch_id: scheduler.finished(self, batch_id))
        self.uploads = HostUploads(self.out, scheduler, self, self.config.cache_size)

    @property
    def alive(self) -> bool:
        return self.out.alive

    @property
    def lost_reason(self) -> str:
        return self.out.lost_reason

    def mark_lost(self, reason: str) -> bool:
        """With the scheduler's lock held: False if it was lost already."""
        if not self.out.alive:
            return False
        self.out.alive, self.out.lost_reason = False, reason
        return True

    @property
    def inflight(self) -> Mapping[int, Batch]:
        """The batches running here (the scheduler's table; read it, never change it)."""
        return self.scheduler.running_on(self)

    # -- start ---------------------------------------------------------------------
    def on_agent_stderr(self, data: bytes) -> None:
        """The channel's own stderr: shell errors, ``docker run`` pulling an image, or the
        agent's dying words."""
        self.last_recv = time.monotonic()
        self._stderr_tail = (self._stderr_tail + data)[-4000:]
        if self.alive:
            self._print("stderr", data)

    def _recv(self, n: int) -> bytes:
        data = self.stream.recv(n)
        self.last_recv = time.monotonic()
        return data

    def handshake(self, config: CloudConfig) -> None:
        """Start the agent, give it this call's settings, and wait until it is ready.
        A host that says nothing for ``start_silence_limit`` while it starts fails."""
        watch = StartWatch(self.stream, lambda: self.last_recv,
                           start_silence_limit(config.heartbeat_timeout, config.image))
        try:
            self._start(config)
        except Exception:
            if not watch.silent:
                raise
            raise said_nothing(self.name, config, watch.silent, self._stderr_tail) from None
        finally:
            watch.stop()
        self.out.alive = True
        self.last_recv = time.monotonic()
        self._on_bytes(b"")  # frames that came with the handshake's last read
        threading.Thread(target=self._send_loop, daemon=True,
                         name=f"joblib-cloud-send-{self.name}").start()
        if not self.stream.deliver(self._on_bytes, self._on_stream_closed):
            threading.Thread(target=self._read_loop, daemon=True,
                             name=f"joblib-cloud-read-{self.name}").start()

    def _start(self, config: CloudConfig) -> None:
        try:
            self.stream.sendall(agent_preamble())
            self._reader.skip_to_magic()
            kind, hello, _ = self._reader.read()
        except (EOFError, OSError) as exc:
            self.stream.stderr_ended.wait(LAST_WORDS_WAIT)
            detail = self._stderr_tail.decode(errors="replace").strip() or str(exc)
            raise did_not_start(self.name, config, detail) from None
        if kind != Kind.HELLO or hello.get("protocol") != PROTOCOL_VERSION:
            raise HostConnectError(f"host {self.name} speaks another protocol: {hello!r}")
        self.hello = hello
        check_versions(self.name, hello["versions"], hello.get("installing", ()))
        self.cpu_count = int(hello["cpu_count"])
        settings: ConfigMeta = {"workers": config.workers_per_host,
                                "max_result_size": config.max_result_size,
                                "heartbeat_timeout": config.heartbeat_timeout,
                                "idle_timeout": config.idle_timeout}
        self.out.send(Kind.CONFIG, settings)
        kind, ready, _ = self._reader.read()
        if kind != Kind.READY:
            raise HostConnectError(f"host {self.name} did not get ready: {ready!r}")
        self.workers = int(ready["workers"])

    @property
    def ping_every(self) -> float:
        """Seconds between the client's pings when it has nothing else to send."""
        return self.out.ping_every

    @property
    def capacity(self) -> int:
        """Batches in flight: two per worker, so a worker never waits for the wire."""
        return 2 * self.workers

    # -- sending -------------------------------------------------------------------
    def post(self, kind: Kind, meta: Mapping[str, Any]) -> None:
        """A control frame (ABORT, BYE) for this host's sender thread."""
        self.out.post(kind, meta)

    def _send_loop(self) -> None:
        out, scheduler = self.out, self.scheduler
        while True:
            control: tuple[Kind, Mapping[str, Any]] | None = None
            job: Batch | None = None
            with out.lock:
                while True:
                    if not out.alive:
                        return
                    wait = out.ping_every - (time.monotonic() - out.last_send)
                    if out.held:  # a dispatching thread is sending a batch now
                        out.wake.wait(max(wait, 0.01))
                        continue
                    if out.outbox:
                        control = out.outbox.popleft()
                        break
                    if out.resends:
                        job = out.resends.popleft()
                        break
                    if (job := scheduler.next_batch(self)) is not None:
                        break
                    if wait <= 0:  # neither: a ping
                        break
                    out.wake.wait(wait)
                out.take()
            try:
                if control is not None:
                    out.send(*control)
                elif job is not None:
                    self._send_job(job)
                else:
                    out.send(Kind.PING)
            except Exception as exc:  # noqa: BLE001 - the stream is gone
                self._send_failed(exc)
                return
            finally:
                with out.lock:
                    out.give_back()

    def claim(self, job: Batch) -> bool:
        """With the scheduler's lock held: take this stream's writer for the thread
        submitting ``job``, which then sends it itself (:meth:`send_now`), skipping the
        hand-off to this host's sender thread.  Only a small batch whose cached
        arguments are all here, with nothing ahead of it, that the stream takes without
        waiting: that thread is often another host's reader (joblib dispatches from the
        result callback), which a stalled host must never block."""
        size, out = len(job.payload), self.out
        if (out.held or out.outbox or size > JOIN_BELOW or not self.uploads.has_all(job.refs)
                or not self.stream.can_write_now(size + 1024)):
            return False
        out.take()
        return True

    def send_now(self, job: Batch) -> None:
        """Send ``job`` from this thread, which :meth:`claim`-ed the writer."""
        out = self.out
        try:
            self._send_job(job)
        except Exception as exc:  # noqa: BLE001 - the stream is gone
            with out.lock:
                out.give_back()
            self._send_failed(exc)
            return
        with out.lock:
            out.give_back()
            if out.outbox or self.scheduler.more_for(self):
                out.wake.notify()

    def wake(self) -> None:
        """With the scheduler's lock held: this host's sender looks at the queue again."""
        self.out.wake.notify()

    def _send_failed(self, exc: Exception) -> None:
        self.scheduler.host_lost(self, f"sending failed: {type(exc).__name__}: {exc}")

    def _send_job(self, job: Batch) -> None:
        self.uploads.provide(job)
        meta: BatchMeta = {"id": job.id, "threads": job.threads}
        self.out.send(Kind.BATCH, meta, job.payload)

    # -- receiving -------------------------------------------------------------------
    def _read_loop(self) -> None:
        """For streams that do not deliver from a thread of their own (pipes)."""
        while self.alive:
            try:
                data = self.stream.recv(self._reader.frames.want())
            except Exception:  # noqa: BLE001 - a broken pipe is a closed stream
                data = b""
            if not data:
                self._on_stream_closed()
                return
            self._on_bytes(data)

    def _on_stream_closed(self) -> None:
        """The agent's stream ended.  paramiko may call this holding the channel's lock,
        which closing the host takes again: so close from a thread of its own."""
        if self.alive:
            threading.Thread(target=self._report_closed, daemon=True,
                             name=f"joblib-cloud-lost-{self.name}").start()

    def _report_closed(self) -> None:
        """The host is lost, for the reason its agent gave on stderr, once that is in."""
        self.stream.stderr_ended.wait(LAST_WORDS_WAIT)
        tail = self._stderr_tail.decode(errors="replace").strip()
        reason = "connection closed" + (f" (agent said: {tail[-500:]})" if tail else "")
        self.scheduler.host_lost(self, reason)

    def _on_bytes(self, data: bytes) -> None:
        """What the agent sent, in order: from the SSH transport's own thread, or from
        ``_read_loop``."""
        if not self.alive:
            return
        self.last_recv = time.monotonic()
        try:
            frames = self._reader.frames
            frames.feed(data)
            while (frame := frames.pop()) is not None:
                self._on_frame(frame)
        except Exception as exc:  # noqa: BLE001 - a garbled stream: the host is gone
            self.scheduler.host_lost(self, f"{type(exc).__name__}: {exc}")

    def _on_frame(self, frame: RawFrame) -> None:
        kind = frame[0]
        if kind == Kind.RESULT:
            # joblib's callback runs here and dispatches the next batch, which pulls the
            # user's task generator: for as long as that takes, this host's silence is
            # ours, not the host's.
            self.in_callback = True
            try:
                self._on_result(cast("ResultMeta", frame_meta(frame)), frame_data(frame))
            finally:
                self.in_callback = False
                self.last_recv = time.monotonic()
        elif kind == Kind.OUTPUT:
            self._print(frame_meta(frame)["stream"], bytes(frame_data(frame)))
        elif kind == Kind.PING and (meta := frame_meta(frame)):
            self.scheduler.host_installing(self, installing(meta))
        elif kind == Kind.INSTALLED:
            self.packages.on_installed(cast("InstalledMeta", frame_meta(frame)))
        elif kind == Kind.FETCHED:
            self.uploads.on_fetched(cast("FetchedMeta", frame_meta(frame)))
        elif kind == Kind.IDLE:  # the agent exits: the cluster stopped for lack of work
            threading.Thread(target=self.scheduler.host_stopped_idle,
                             args=(self, float(frame_meta(frame)["seconds"])), daemon=True,
                             name=f"joblib-cloud-idle-{self.name}").start()

    def _on_result(self, meta: ResultMeta, data: bytes | memoryview) -> None:
        if "missing_module" in meta and self.packages.take_over(meta, data):
            return
        job = self.scheduler.finished(self, meta["id"])
        if job is None:
            return
        self.scheduler.result_came(self, job)
        status = Status(meta["status"])
        if status is Status.CANCELLED:  # only batches this client aborted, by id
            resolve(job, exc=AbortedError(f"{job.label} was cancelled"))
        elif job.aborted:
            return
        elif status is Status.OK:
            try:
                resolve(job, pickle.loads(data))
            except Exception as exc:  # noqa: BLE001
                resolve(job, exc=RemoteTaskError(
                    f"the result of {job.label} from host {self.name} could not be "
                    f"unpickled here: {type(exc).__name__}: {exc}"))
        else:
            resolve(job, exc=result_error(status, meta, data, self.name, job.label))

    def flush_output(self) -> None:
        """What tasks printed without a final newline: shown as a line of its own."""
        for stream, rest in list(self._line_buffers.items()):
            if rest:
                self._print(stream, b"\n")

    def _print(self, stream: str, data: bytes) -> None:
        text = self._line_buffers.get(stream, b"") + data
        *lines, rest = text.split(b"\n")
        self._line_buffers[stream] = rest
        if lines:
            target = sys.stdout if stream == "stdout" else sys.stderr
            prefix = f"[{self.name}] "
            target.write("".join(prefix + line.decode(errors="replace") + "\n"
                                 for line in lines))
            target.flush()

    def close(self) -> None:
        self.out.alive = False
        self.uploads.on_lost()
        for closer in (self.stream.close, self.connection.close if self.connection else None):
            if closer is not None:
                try:
                    closer()
                except Exception:  # noqa: BLE001 - closing a dead stream may fail
                    pass

