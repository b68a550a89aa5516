"""The agent's worker processes: one pipe pair each, nothing in between.

A batch arrives at the agent as bytes and leaves a worker as bytes, so the agent only has
to hand frames through.  A general process pool (loky) costs more than the whole SSH hop
per task at ``batch_size=1``: its feeder and manager threads, a pickler built per result,
and a wake-up pipe.  Here the agent writes the batch frame straight into an idle worker's
pipe, and one thread per worker relays the result frame and hands that worker the next
queued batch before forwarding anything (bench/tiny_tasks.py).

Crashes are per worker: a worker that dies fails only the batch it was running, and a
fresh one takes its place.  Workers leave when the agent does, even if it is SIGKILLed:
each one watches a "lifeline" pipe whose only write end the agent holds.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from .protocol import FrameReader, Kind, encode

#: Run in each worker process: the agent's import path (it may be a zip), then the loop.
WORKER_BOOTSTRAP = (
    "import json, os, sys; sys.path[:] = json.loads(os.environ.pop('JOBLIB_CLOUD_SYS_PATH'));"
    "from joblib_cloud.task_runner import serve; serve(*map(int, sys.argv[1:5]), sys.argv[5])"
)
#: Workers that die before they are ready, in a row, before the agent stops replacing them.
MAX_FAILED_STARTS = 3

Send = Callable[[Kind, dict[str, Any], bytes], None]
#: (batch id, frame meta, cloudpickled batch)
Batch = tuple[int, dict[str, Any], bytes]


def write_all(fd: int, parts: list[bytes | memoryview]) -> None:
    for part in parts:
        view = memoryview(part)
        while view:
            view = view[os.write(fd, view):]


def grow_pipe(fd: int, size: int = 1 << 20) -> None:
    """At the default 64 KiB both ends of a pipe wake up every 64 KiB; 1 MiB (the
    unprivileged maximum) made uploads faster in bench/ssh_throughput.py.  Not a pipe,
    or not allowed: no harm."""
    try:
        import fcntl

        if fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) < size:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
    except (OSError, AttributeError, ValueError):
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
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER_BOOTSTRAP, str(to_r), str(from_w),
             str(pool.lifeline), str(pool.max_result_size), pool.cache_dir],
            stdin=subprocess.DEVNULL, pass_fds=(to_r, from_w, pool.lifeline),
            env=pool.env, start_new_session=True)
        os.close(to_r)
        os.close(from_w)
        self.to_worker = to_w
        self.from_worker = from_r
        self.batch: Batch | None = None  # kept until its result: re-run if we die starting
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
    """``workers`` processes fed from one queue; every batch ends in exactly one result."""

    def __init__(self, workers: int, env: dict[str, str], cache_dir: str,
                 max_result_size: int, send: Send) -> None:
        self.env = {**env, "JOBLIB_CLOUD_SYS_PATH": _json_sys_path()}
        self.cache_dir = cache_dir
        self.max_result_size = max_result_size
        self.send = send
        self.lock = threading.Lock()
        self.queue: collections.deque[Batch] = collections.deque()
        self.idle: list[WorkerProcess] = []
        self.running: dict[int, WorkerProcess] = {}
        self.workers: list[WorkerProcess] = []
        self.failed_starts = 0
        self.broken = ""  # why no worker can start: batches fail at once instead of waiting
        self.closed = False
        self.lifeline, self._lifeline_w = os.pipe()  # not inherited, unless passed
        for _ in range(workers):
            self._start_worker()

    @property
    def busy(self) -> int:
        return len(self.running) + len(self.queue)

    # ----------------------------------------------------------------- workers
    def _start_worker(self) -> None:
        try:
            worker = WorkerProcess(self)
        except OSError as exc:  # out of processes, memory or file descriptors
            with self.lock:
                self.failed_starts += 1
            self._give_up_if_none_left(f"starting a worker process failed: {exc}")
            return
        with self.lock:
            self.workers.append(worker)
        threading.Thread(target=self._relay, args=(worker,), daemon=True,
                         name=f"relay-{worker.pid}").start()
        self._hand_next(worker)

    def _hand_next(self, worker: WorkerProcess) -> None:
        """Give ``worker`` the next queued batch, or file it as idle."""
        with self.lock:
            if worker.doomed or self.closed:
                return
            if not self.queue:
                self.idle.append(worker)
                return
            worker.batch = batch = self.queue.popleft()
            self.running[batch[0]] = worker
        self._write(worker, batch)

    def _write(self, worker: WorkerProcess, batch: Batch) -> None:
        try:
            write_all(worker.to_worker, encode(Kind.BATCH, batch[1], batch[2]))
        except OSError:
            pass  # it died: its relay thread reports the batch as crashed

    def _relay(self, worker: WorkerProcess) -> None:
        """Results of one worker to the client, until it dies."""
        reader = FrameReader(lambda n: os.read(worker.from_worker, n))
        while True:
            try:
                _, meta, data = reader.read()
            except (EOFError, OSError):
                break
            if not worker.ready:  # its first frame: imports done, reading batches
                worker.ready = True
                with self.lock:
                    self.failed_starts = 0
                continue
            with self.lock:
                batch, worker.batch = worker.batch, None
                if batch is not None:
                    del self.running[batch[0]]
            self._hand_next(worker)  # first: the worker starts on it while we forward
            if batch is not None:  # None: an abort already answered for it
                meta["id"] = batch[0]
                self._send(Kind.RESULT, meta, data)
        self._buried(worker)

    def _buried(self, worker: WorkerProcess) -> None:
        returncode = worker.proc.wait()
        for fd in (worker.to_worker, worker.from_worker):
            os.close(fd)
        how = describe_exit(returncode)
        with self.lock:
            self.workers.remove(worker)
            if worker in self.idle:
                self.idle.remove(worker)
            batch, worker.batch = worker.batch, None
            if batch is not None:
                del self.running[batch[0]]
            if not worker.ready and not worker.doomed:
                self.failed_starts += 1
                if batch is not None:  # it never ran: the next worker takes it
                    self.queue.appendleft(batch)
                    batch = None
            restart = not self.closed and self.failed_starts < MAX_FAILED_STARTS
        if batch is not None and not self.closed:
            self._send(Kind.RESULT, {"id": batch[0], "status": "crashed",
                                     "message": f"worker process {worker.pid}: {how}"})
        if restart:
            self._start_worker()
        else:
            self._give_up_if_none_left(f"{MAX_FAILED_STARTS} worker processes in a row died "
                                       f"while starting (the last: {how}); see the host's "
                                       "stderr above")
            self._feed_idle()  # a batch given back above may wait for a ready worker

    def _give_up_if_none_left(self, reason: str) -> None:
        """No worker is left and none can start: fail what waits, and all that comes."""
        with self.lock:
            if self.closed or self.workers:
                return
            self.broken = reason
            stranded = [queued[0] for queued in self.queue]
            self.queue.clear()
        for batch_id in stranded:
            self._send(Kind.RESULT, {"id": batch_id, "status": "broken", "message": reason})

    def _feed_idle(self) -> None:
        with self.lock:
            if not (self.idle and self.queue) or self.closed:
                return
            worker = self.idle.pop()
        self._hand_next(worker)

    def _send(self, kind: Kind, meta: dict[str, Any], data: bytes = b"") -> None:
        try:
            self.send(kind, meta, data)
        except OSError:
            pass  # the client is gone; the agent is shutting down

    # ----------------------------------------------------------------- work
    def submit(self, batch_id: int, meta: dict[str, Any], payload: bytes) -> None:
        batch = (batch_id, meta, payload)
        with self.lock:
            broken = self.broken
            if not broken and (not self.idle or self.closed):
                self.queue.append(batch)
                return
            if not broken:
                worker = self.idle.pop()
                worker.batch = batch
                self.running[batch_id] = worker
        if broken:
            self._send(Kind.RESULT, {"id": batch_id, "status": "broken", "message": broken})
        else:
            self._write(worker, batch)

    def abort(self, batch_ids: list[int]) -> list[int]:
        """Cancel these batches: drop queued ones, kill the workers running the others
        (fresh ones replace them).  Returns the cancelled ids."""
        wanted = set(batch_ids)
        with self.lock:
            cancelled_ids = [item[0] for item in self.queue if item[0] in wanted]
            self.queue = collections.deque(item for item in self.queue if item[0] not in wanted)
            victims = [w for bid, w in self.running.items() if bid in wanted]
            for worker in victims:
                batch_id = worker.batch[0]
                cancelled_ids.append(batch_id)
                del self.running[batch_id]
                worker.batch = None
                worker.doomed = True
        for worker in victims:
            worker.kill()
        return cancelled_ids

    def close(self) -> None:
        with self.lock:
            self.closed = True
            workers = list(self.workers)
        for worker in workers:
            worker.kill()
        os.close(self._lifeline_w)
        deadline = time.monotonic() + 5
        for worker in workers:
            try:
                worker.proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                pass


def _json_sys_path() -> str:
    import json

    return json.dumps(sys.path)
