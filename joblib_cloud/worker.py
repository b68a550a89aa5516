"""The host agent: ``python -m joblib_cloud.worker``.

It speaks the framed protocol on its stdin/stdout (an SSH channel, or a pipe for the
``local`` provider) and never listens on a network port.  Batches run in worker processes
fed straight through pipes (``worker_pool``); the agent's own jobs are the protocol, the
per-host cache of large arguments, forwarding what tasks print, heartbeats both ways, and
stopping everything when the client goes away.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import select
import selectors
import shutil
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO, cast

from joblib.parallel import ParallelBackendBase

from .host import background
from .host.fetch_object import Fetcher
from .host.installer import Installer
from .host.task_runner import CORES_PER_WORKER_ENV
from .host.worker_pool import WorkerPool, grow_pipe, write_all
from .wire import contract
from .wire.protocol import (
    AGENT_MAGIC,
    PROTOCOL_VERSION,
    BootInstallMeta,
    ConfigMeta,
    FetchedMeta,
    FetchMeta,
    FrameReader,
    HelloMeta,
    IdleMeta,
    InstalledMeta,
    InstallMeta,
    Kind,
    RawFrame,
    ReadyMeta,
    ResultMeta,
    Status,
    encode,
    frame_data,
    frame_meta,
)

#: The variables joblib itself caps for nested threads (BLAS, OpenMP, numexpr...).
THREAD_VARS = tuple(ParallelBackendBase.MAX_NUM_THREADS_VARS)
#: Frames that are work: they restart the idle clock.
WORK = frozenset({Kind.BATCH, Kind.PUT, Kind.FETCH, Kind.INSTALL})
REPORTED_PACKAGES = ("joblib", "cloudpickle", "numpy", "scipy", "scikit-learn",
                     "pandas")


def agent_home() -> Path:
    home = Path(contract.home())
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    return home


def host_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in REPORTED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def boot_install() -> BootInstallMeta:
    """What the boot is still installing, for the client's display."""
    install = background.current()
    if install is None or install.state == "installed":
        return {"installing": []}
    return {"installing": install.distributions,
            "install_failed": install.state != "installing" or not install.running}


def _cpu_count() -> int:
    """The cores this process may use (joblib reads cgroup and affinity limits)."""
    import joblib

    return joblib.cpu_count()


class Agent:
    """One thread, one event loop: the client's stream, every worker's result pipe and
    the tasks' output pipes, with heartbeats on the loop's timeout."""

    def __init__(self, in_fd: int, out_fd: int, outputs: list[tuple[int, str]]) -> None:
        self.in_fd = in_fd
        self.out_fd = out_fd
        self.outputs = outputs
        self.selector = selectors.DefaultSelector()
        self.reader = FrameReader(self._recv_waiting)  # the handshake's
        self.frames = self.reader.frames  # then fed by the event loop
        self.last_recv = time.monotonic()
        self.pool: WorkerPool | None = None
        self.installer = Installer(self.selector, self._installed)
        self.fetcher: Fetcher | None = None
        self.home = agent_home()
        self.cache_dir = self.home / "cache" / str(os.getpid())
        self.uploads: dict[str, Any] = {}
        self.heartbeat_timeout = 30.0
        self.beat_interval = 6.0
        #: Seconds without work after which the agent says so (IDLE) and exits.
        self.idle_timeout = float("inf")
        self.last_work = time.monotonic()
        self.work_touched = 0.0  # when ``last_work`` was last written to the activity file
        self.fetches = 0  # downloads asked for and not yet answered
        self.boot_install = boot_install()  # as the client last heard it
        self.done = False

    # ------------------------------------------------------------------ sending
    def send(self, kind: Kind, meta: Mapping[str, Any] | None = None,
             data: bytes | memoryview = b"") -> None:
        if kind != Kind.PING:  # a result, output, an answer: work until now
            self.last_work = time.monotonic()
        self._write(encode(kind, meta, data))

    def send_raw(self, frame: RawFrame) -> None:
        self.last_work = time.monotonic()  # a worker's result, as it came
        self._write([frame[1]])

    def _write(self, parts: list[bytes | memoryview]) -> None:
        """A write blocks while the client is not reading (busy in a slow callback, say);
        meanwhile this loop cannot read either, so that time is not the client's silence."""
        start = time.monotonic()
        write_all(self.out_fd, parts)
        blocked = time.monotonic() - start
        if blocked > 0.5:
            self.last_recv += blocked

    # ------------------------------------------------------------------ receiving
    def _recv(self, n: int) -> bytes:
        data = os.read(self.in_fd, n)
        self.last_recv = time.monotonic()
        return data

    def _recv_waiting(self, n: int) -> bytes:
        """For the handshake, before the event loop runs."""
        if not select.select([self.in_fd], [], [], self.heartbeat_timeout)[0]:
            raise TimeoutError(f"no word from the client for {self.heartbeat_timeout:.0f}s")
        return self._recv(n)

    def _read_client(self) -> None:
        data = self._recv(self.frames.want())
        if not data:
            raise EOFError("the client closed the connection")
        self.frames.feed(data)

    def _on_client(self, _fd: int) -> None:
        self._read_client()
        self._handle_frames()

    def _handle_frames(self) -> None:
        while (frame := self.frames.pop()) is not None:
            kind = frame[0]
            if kind in WORK:
                self.last_work = time.monotonic()
            if kind == Kind.BATCH:
                assert self.pool is not None  # the client sends CONFIG first
                self.pool.submit(frame_meta(frame)["id"], frame)
            elif kind == Kind.PUT:
                self.put(frame_meta(frame), frame_data(frame))
            elif kind == Kind.FETCH:
                self.fetches += 1
                assert self.fetcher is not None  # made before the handshake
                self.fetcher.request(cast(FetchMeta, frame_meta(frame)))
            elif kind == Kind.EVICT:
                self.evict(frame_meta(frame)["digests"])
            elif kind == Kind.ABORT:
                self.abort(frame_meta(frame)["ids"])
            elif kind == Kind.INSTALL:
                self.installer.request(cast(InstallMeta, frame_meta(frame)))
            elif kind == Kind.BYE:
                self.done = True
                return

    def _on_output(self, fd: int, stream: str) -> None:
        """What tasks print (the workers' fds 1 and 2) goes to the client."""
        try:
            data = os.read(fd, 1 << 16)
        except OSError:
            data = b""
        if data:
            self.send(Kind.OUTPUT, {"stream": stream}, data)
        else:
            self.selector.unregister(fd)

    # ------------------------------------------------------------------ workers
    def _start_pool(self) -> None:
        env = {**os.environ, CORES_PER_WORKER_ENV: str(self.cores_per_worker)}
        env.update((var, str(self.cores_per_worker)) for var in THREAD_VARS)
        self.pool = WorkerPool(self.workers, env, str(self.cache_dir), self.max_result_size,
                               self.selector, self.send, self.send_raw)

    def abort(self, batch_ids: list[int]) -> None:
        """Kill the tasks running these batches; report them cancelled."""
        if self.pool is None:  # no CONFIG yet: nothing runs
            return
        for batch_id in self.pool.abort(batch_ids):
            cancelled: ResultMeta = {"id": batch_id, "status": Status.CANCELLED.value}
            self.send(Kind.RESULT, cancelled)

    def _installed(self, answer: InstalledMeta) -> None:
        self.send(Kind.INSTALLED, answer)

    def _fetched(self, answer: FetchedMeta) -> None:
        self.fetches -= 1
        self.last_work = time.monotonic()
        self.send(Kind.FETCHED, answer)

    # ------------------------------------------------------------------ cache
    def put(self, meta: dict[str, Any], data: memoryview) -> None:
        digest = meta["digest"]
        final = self.cache_dir / digest
        if meta["offset"] == 0:
            grow_pipe(self.in_fd)
            self.uploads[digest] = open(self.cache_dir / f".{digest}.part", "wb",  # noqa: SIM115
                                        opener=_private)
        fh = self.uploads[digest]
        fh.write(data)
        if meta["last"]:
            fh.close()
            os.replace(fh.name, final)
            del self.uploads[digest]

    def evict(self, digests: list[str]) -> None:
        for digest in digests:
            try:
                (self.cache_dir / digest).unlink()
            except FileNotFoundError:
                pass

    # ------------------------------------------------------------------ loop
    @property
    def busy(self) -> bool:
        """Work in flight: batches, an install, a download, an upload."""
        pool, installer = self.pool, self.installer
        return bool((pool is not None and (pool.running or pool.queue))
                    or installer.running is not None or installer.queue
                    or self.fetches or self.uploads)

    def _heartbeat(self, late: float = 0.0) -> None:
        """``late``: how long after its time this beat runs.  Silence counts only while
        this loop could hear: a beat late by more than its interval means the agent itself
        did not run (CPU pressure, a stopped process), and whatever the client sent
        meanwhile may still sit in sshd, which gets the CPU after us.  Before calling the
        client gone, it gets one more interval to be heard."""
        now = time.monotonic()
        if late > self.beat_interval:
            self.last_recv = min(self.last_recv + late, now)
        silent = now - self.last_recv
        if silent > self.heartbeat_timeout:
            if select.select([self.in_fd], [], [], self.beat_interval)[0]:
                self._on_client(self.in_fd)  # it spoke after all (a stalled sshd, say)
                if self.done:
                    return
                silent = time.monotonic() - self.last_recv
        if silent > self.heartbeat_timeout:
            message = f"no word from the client for {silent:.0f}s"
            print(f"joblib-cloud agent: {message}; stopping", file=_last_words, flush=True)
            raise TimeoutError(message)
        if self.busy:
            self.last_work = now
        idle = now - self.last_work
        if idle >= self.idle_timeout:  # an attached client alone is no reason to stay
            stop: IdleMeta = {"seconds": idle}
            self.send(Kind.IDLE, stop)
            self.done = True
            return
        install = boot_install() if self.boot_install["installing"] else self.boot_install
        if install != self.boot_install:  # the client's display says what still installs
            self.boot_install = install
            self.send(Kind.PING, dict(install))
        else:
            self.send(Kind.PING)
        (self.home / contract.ATTACHED_FILE).touch(mode=0o600)
        if self.last_work > self.work_touched:  # the kill switch's clock: work only
            (self.home / contract.ACTIVITY_FILE).touch(mode=0o600)
            self.work_touched = now
        self.installer.check_deadline()

    def run(self) -> None:
        self.cache_dir.parent.mkdir(exist_ok=True, mode=0o700)
        self.cache_dir.mkdir(exist_ok=True, mode=0o700)
        _remove_stale_caches(self.cache_dir.parent)
        self.fetcher = Fetcher(self.selector, self.cache_dir, self._fetched)
        os.write(self.out_fd, AGENT_MAGIC)
        cores = _cpu_count()
        hello: HelloMeta = {"protocol": PROTOCOL_VERSION, "versions": host_versions(),
                            "cpu_count": cores, "pid": os.getpid(), "home": str(self.home),
                            **self.boot_install}
        self.send(Kind.HELLO, hello)
        kind, meta, _ = self.reader.read()
        if kind != Kind.CONFIG:
            raise RuntimeError(f"expected CONFIG, got {kind!r}")
        config = cast(ConfigMeta, meta)
        self.workers = int(config.get("workers") or cores)
        self.cores_per_worker = max(cores // self.workers, 1)
        self.max_result_size = int(config["max_result_size"])
        self.heartbeat_timeout = float(config["heartbeat_timeout"])
        self.idle_timeout = float(config.get("idle_timeout") or "inf")
        selector = self.selector
        for fd, stream in self.outputs:
            selector.register(fd, selectors.EVENT_READ,
                              lambda fd, stream=stream: self._on_output(fd, stream))
        self._start_pool()
        ready: ReadyMeta = {"workers": self.workers, "cores_per_worker": self.cores_per_worker}
        self.send(Kind.READY, ready)
        for name in (contract.ACTIVITY_FILE, contract.ATTACHED_FILE):  # a client came
            (self.home / name).touch(mode=0o600)
        self.last_work = self.work_touched = time.monotonic()
        selector.register(self.in_fd, selectors.EVENT_READ, self._on_client)
        self._handle_frames()  # any that came with CONFIG
        interval = self.beat_interval = max(self.heartbeat_timeout / 5, 0.2)
        next_beat = time.monotonic() + interval
        while not self.done:
            for key, _ in selector.select(max(next_beat - time.monotonic(), 0)):
                key.data(key.fd)
                if self.done:
                    return
            if (now := time.monotonic()) >= next_beat:
                self._heartbeat(late=now - next_beat)
                next_beat = time.monotonic() + interval

    def shutdown(self) -> None:
        self.installer.close()
        if self.fetcher is not None:
            self.fetcher.close()
        if self.pool is not None:
            self.pool.close()
        for fh in self.uploads.values():
            fh.close()
        shutil.rmtree(self.cache_dir, ignore_errors=True)


def _private(path: str, flags: int) -> int:
    """Opener for files only this user may read (cached data can be sensitive)."""
    return os.open(path, flags, 0o600)


def _remove_stale_caches(cache_root: Path) -> None:
    """Delete cache directories of agents that are no longer running."""
    for entry in cache_root.iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                os.kill(int(entry.name), 0)
            except ProcessLookupError:
                shutil.rmtree(entry, ignore_errors=True)
            except PermissionError:
                pass


#: The channel's own stderr, kept for the agent's last words (why it stops, or a crash);
#: tasks' fd 2 is forwarded to the client as OUTPUT frames instead.
_last_words: TextIO = sys.stderr


def _redirect_std_streams() -> tuple[int, int, list[tuple[int, str]]]:
    """Keep stdin/stdout for the protocol; route fds 0-2 of tasks elsewhere.

    Worker processes inherit fds 1 and 2: they become pipes that the agent forwards to
    the client as OUTPUT frames, so ``print`` in a task shows up on the user's terminal
    instead of corrupting the protocol stream.
    """
    proto_in, proto_out, diag = os.dup(0), os.dup(1), os.dup(2)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    forwards = []
    for fd, stream in ((1, "stdout"), (2, "stderr")):
        r, w = os.pipe()
        os.dup2(w, fd)
        os.close(w)
        forwards.append((r, stream))
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    global _last_words
    _last_words = os.fdopen(diag, "w", buffering=1)
    return proto_in, proto_out, forwards


def main() -> None:
    proto_in, proto_out, forwards = _redirect_std_streams()
    agent = Agent(proto_in, proto_out, forwards)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(0))
    try:
        agent.run()
    except (EOFError, TimeoutError, BrokenPipeError, ConnectionError):
        pass  # the client went away: stop everything below
    except BaseException:
        import traceback

        traceback.print_exc(file=_last_words)
        raise
    finally:
        agent.shutdown()
    os._exit(0)


if __name__ == "__main__":
    main()
