"""The agent's worker processes: one pipe pair each, nothing in between.

A batch arrives at the agent as a frame and a result leaves a worker as a frame, so the
agent only hands frames through, unparsed: the client's batch frame goes to an idle
worker's pipe as it came, and the worker's result frame (which names its batch) goes back
to the client as it came.  Everything runs on the agent's one event-loop thread: with a
relay thread per worker, thread wake-ups and GIL hand-offs cost the agent more than the
forwarding itself (agent CPU per task at ``batch_size=1``: ~55 -> ~35 µs over pipes,
~70 -> ~55 µs over SSH; docs/performance.md).

Crashes are per worker: a worker that dies fails only the batch it was running, and a
fresh one takes its place.  Workers leave when the agent does, even if it is SIGKILLed:
each one watches a "lifeline" pipe whose only write end the agent holds.
"""

from __future__ import annotations

import collections
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from ..wire.protocol import FrameBuffer, Kind, RawFrame, ResultMeta, Status

#: Run in each worker process: the agent's import path (it may be a zip), then the loop.
WORKER_BOOTSTRAP = (
    "import json, os, sys; sys.path[:] = json.loads(os.environ.pop('JOBLIB_CLOUD_SYS_PATH'));"
    "from joblib_cloud.host.task_runner import serve; serve(*map(int, sys.argv[1:5]), sys.argv[5])"
)
#: Workers that die before they are ready, in a row, before the agent stops replacing them.
MAX_FAILED_STARTS = 3

Send = Callable[[Kind, dict[str, Any]], None]
SendRaw = Callable[[RawFrame], None]
#: (batch id, the client's batch frame as it came)
Queued = tuple[int, RawFrame]


def write_all(fd: int, parts: list[bytes | memoryview]) -> None:
    for part in parts:
        view = memoryview(part)
        while view:
            view = view[os.write(fd, view):]


def grow_pipe(fd: int, size: int = 1 << 20) -> None:
    """At the default 64 KiB both ends of a pipe wake up every 64 KiB; 1 MiB (the
    unprivileged maximum) made uploads faster in bench/ssh_throughput.py.  Not a pipe,
    not allowed, or not Linux: no harm."""
    try:
        import fcntl

        if fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) < size:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
    except (OSError, AttributeError, ValueError, ImportError):
        pass


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"it was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"it was killed by signal {-returncode}"
    return f"it exited with code {returncode}"


class WorkerProcess:
    def __init__(self, pool: WorkerPool) -> None:
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        for fd in (to_w, from_w):
            grow_pipe(fd)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", WORKER_BOOTSTRAP, str(to_r), str(from_w),
                 str(pool.lifeline), str(pool.max_result_size), pool.cache_dir],
                stdin=subprocess.DEVNULL, pass_fds=(to_r, from_w, pool.lifeline),
                env=pool.env, start_new_session=True)
        except OSError:
            for fd in (to_w, from_r):
                os.close(fd)
            raise
        finally:
            os.close(to_r)
            os.close(from_w)
        self.to_worker = to_w
        self.from_worker = from_r
        self.frames = FrameBuffer()
        self.batch: Queued | None = None  # the one it runs, until its result comes
        self.ready = False
        self.doomed = False  # being killed by an abort: hand it nothing more

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        """The worker and anything its tasks started (its own process group)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class WorkerPool:
    """``workers`` processes fed from one queue; every batch ends in exactly one result.

    Not thread-safe: the agent's event loop (``selector``) is its only caller."""

    def __init__(self, workers: int, env: dict[str, str], cache_dir: str,
                 max_result_size: int, selector: selectors.BaseSelector, send: Send,
                 send_raw: SendRaw) -> None:
        self.env = {**env, "JOBLIB_CLOUD_SYS_PATH": _json_sys_path()}
        self.cache_dir = cache_dir
        self.max_result_size = max_result_size
        self.selector = selector
        self.send = send
        self.send_raw = send_raw
        self.queue: collections.deque[Queued] = collections.deque()
        self.idle: list[WorkerProcess] = []
        self.running: dict[int, WorkerProcess] = {}
        self.workers: list[WorkerProcess] = []
        self.failed_starts = 0
        self.broken = ""  # why no worker can start: batches fail at once instead of waiting
        self.closed = False
        self.lifeline, self._lifeline_w = os.pipe()  # not inherited, unless passed
        for _ in range(workers):
            self._start_worker()

    # ----------------------------------------------------------------- workers
    def _start_worker(self) -> None:
        try:
            worker = WorkerProcess(self)
        except OSError as exc:  # out of processes, memory or file descriptors
            self.failed_starts += 1
            self._give_up_if_none_left(f"starting a worker process failed: {exc}")
            return
        self.workers.append(worker)
        self.selector.register(worker.from_worker, selectors.EVENT_READ,
                               lambda fd: self._on_readable(worker))
        # No batch until it says it is ready: a worker still importing does not read, and
        # a large batch written to it would block this loop (and its heartbeats).

    def _hand_next(self, worker: WorkerProcess) -> None:
        """Give ``worker`` the next queued batch, or file it as idle."""
        if worker.doomed or self.closed:
            return
        if not self.queue:
            self.idle.append(worker)
            return
        self._run(worker, self.queue.popleft())

    def _run(self, worker: WorkerProcess, batch: Queued) -> None:
        worker.batch = batch
        self.running[batch[0]] = worker
        try:
            write_all(worker.to_worker, [batch[1][1]])
        except OSError:
            pass  # it died: the end of its pipe reports the batch as crashed

    def _on_readable(self, worker: WorkerProcess) -> None:
        """Frames from one worker: first "ready", then one result per batch."""
        try:
            chunk = os.read(worker.from_worker, worker.frames.want())
        except OSError:
            chunk = b""
        if not chunk:
            self._buried(worker)
            return
        worker.frames.feed(chunk)
        while (frame := worker.frames.pop()) is not None:
            if not worker.ready:  # its first frame: imports done, reading batches
                worker.ready = True
                self.failed_starts = 0
                self._hand_next(worker)
                continue
            batch, worker.batch = worker.batch, None
            if batch is not None:
                del self.running[batch[0]]
            self._hand_next(worker)  # first: the worker starts on it while we forward
            if batch is not None:  # None: an abort already answered for it
                self._send(self.send_raw, frame)

    def _buried(self, worker: WorkerProcess) -> None:
        self.selector.unregister(worker.from_worker)
        try:
            returncode = worker.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # it closed its pipe but lives on
            worker.kill()
            returncode = worker.proc.wait()
        for fd in (worker.to_worker, worker.from_worker):
            os.close(fd)
        how = describe_exit(returncode)
        self.workers.remove(worker)
        if worker in self.idle:
            self.idle.remove(worker)
        batch, worker.batch = worker.batch, None
        if batch is not None:
            del self.running[batch[0]]
        if not worker.ready and not worker.doomed:
            self.failed_starts += 1
        if self.closed:
            return
        if batch is not None:
            self._result(batch[0], Status.CRASHED, f"worker process {worker.pid}: {how}")
        if self.failed_starts < MAX_FAILED_STARTS:
            self._start_worker()
        else:
            self._give_up_if_none_left(f"{MAX_FAILED_STARTS} worker processes in a row died "
                                       f"while starting (the last: {how}); see the host's "
                                       "stderr above")

    def _give_up_if_none_left(self, reason: str) -> None:
        """No worker is left and none can start: fail what waits, and all that comes."""
        if self.closed or self.workers:
            return
        self.broken = reason
        stranded = [queued[0] for queued in self.queue]
        self.queue.clear()
        for batch_id in stranded:
            self._result(batch_id, Status.BROKEN, reason)

    def _result(self, batch_id: int, status: Status, message: str) -> None:
        """The pool's own answer for a batch no worker could finish."""
        meta: ResultMeta = {"id": batch_id, "status": status.value, "message": message}
        self._send(self.send, Kind.RESULT, meta)

    @staticmethod
    def _send(send: Callable[..., None], *frame: Any) -> None:
        try:
            send(*frame)
        except OSError:
            pass  # the client is gone; the agent is shutting down

    # ----------------------------------------------------------------- work
    def submit(self, batch_id: int, frame: RawFrame) -> None:
        if self.broken:
            self._result(batch_id, Status.BROKEN, self.broken)
        elif self.idle and not self.closed:
            self._run(self.idle.pop(), (batch_id, frame))
        else:
            self.queue.append((batch_id, frame))

    def abort(self, batch_ids: list[int]) -> list[int]:
        """Cancel these batches: drop queued ones, kill the workers running the others
        (fresh ones replace them).  Returns the cancelled ids."""
        wanted = set(batch_ids)
        cancelled_ids = [item[0] for item in self.queue if item[0] in wanted]
        self.queue = collections.deque(item for item in self.queue if item[0] not in wanted)
        victims = [(bid, w) for bid, w in self.running.items() if bid in wanted]
        for batch_id, worker in victims:
            cancelled_ids.append(batch_id)
            del self.running[batch_id]
            worker.batch = None
            worker.doomed = True
            worker.kill()
        return cancelled_ids

    def close(self) -> None:
        self.closed = True
        for worker in self.workers:
            worker.kill()
        os.close(self._lifeline_w)
        deadline = time.monotonic() + 5
        for worker in self.workers:
            try:
                worker.proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                pass


def _json_sys_path() -> str:
    import json

    return json.dumps(sys.path)
