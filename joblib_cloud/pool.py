"""``DistributedPool``: ``multiprocessing.Pool``'s interface, with workers on a cluster.

Each chunk of tasks travels exactly like a joblib batch (``client.batch.submit`` →
``Cluster.submit``), so it gets the same per-host data cache, shipping of local modules,
retries on lost hosts and remote tracebacks.  A chunk runs its items in order and stops at
the first exception, as ``multiprocessing``'s ``mapstar`` does, so results and errors
are the ones ``multiprocessing.Pool`` gives.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from typing import Any

from .client.batch import submit
from .client.cluster import Cluster
from .client.registry import get_cluster
from .config import resolve_config
from .host.pool_tasks import _Call, _Chunk, _Init
from .wire.serialization import register_local_modules


def _name(func: Any) -> str:
    return getattr(func, "__qualname__", None) or type(func).__name__


_callbacks: concurrent.futures.ThreadPoolExecutor | None = None
_callbacks_lock = threading.Lock()


def _callback_thread() -> concurrent.futures.ThreadPoolExecutor:
    global _callbacks
    with _callbacks_lock:
        if _callbacks is None:
            _callbacks = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="DistributedPool-callbacks")
        return _callbacks


class AsyncResult:
    """The result of ``apply_async``/``map_async``, as ``multiprocessing`` returns it."""

    def __init__(self, futures: list[Future], combine: Callable[[list[Any]], Any],
                 callback: Callable[[Any], Any] | None = None,
                 error_callback: Callable[[BaseException], Any] | None = None) -> None:
        self._futures = futures
        self._combine = combine
        self._done = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None
        self._callback = callback
        self._error_callback = error_callback
        self._left = len(futures)
        self._settled = False
        self._lock = threading.Lock()
        if not futures:
            self._finish()
        for future in futures:
            future.add_done_callback(self._one_done)

    def _one_done(self, future: Future) -> None:
        with self._lock:
            if self._settled:
                return
            self._left -= 1
            failed = future.exception() is not None
            if not failed and self._left:
                return
            self._settled = True
        # Like multiprocessing: the first failure settles the whole result at once.
        self._finish(future.exception() if failed else None)

    def _finish(self, error: BaseException | None = None) -> None:
        if error is None:
            try:
                self._value = self._combine([f.result() for f in self._futures])
            except BaseException as exc:  # noqa: BLE001 - becomes the result's error
                error = exc
        self._error = error
        if self._callback is None and self._error_callback is None:
            self._done.set()
            return
        # Callbacks run on one pool thread, as multiprocessing's result handler does: a
        # slow callback here must not stall the thread that reads a host's heartbeats.
        _callback_thread().submit(self._run_callback)

    def _run_callback(self) -> None:
        try:
            if self._error is None and self._callback is not None:
                self._callback(self._value)
            elif self._error is not None and self._error_callback is not None:
                self._error_callback(self._error)
        except Exception:  # noqa: BLE001 - a failing callback must not hang the pool
            logging.getLogger("joblib_cloud").exception("DistributedPool callback failed")
        finally:
            self._done.set()  # like multiprocessing: get() returns after the callback

    def ready(self) -> bool:
        return self._done.is_set()

    def successful(self) -> bool:
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return self._error is None

    def wait(self, timeout: float | None = None) -> None:
        self._done.wait(timeout)

    def get(self, timeout: float | None = None) -> Any:
        if not self._done.wait(timeout):
            raise TimeoutError
        if self._error is not None:
            raise self._error
        return self._value


class _ResultIterator:
    """``imap``/``imap_unordered`` results: ``next(it)`` and ``it.next(timeout)``."""

    def __init__(self, futures: list[Future], ordered: bool, chunked: bool) -> None:
        self._pending = list(futures)
        self._ordered = ordered
        # multiprocessing flattens chunks with a generator, which ends at the first error.
        self._stop_on_error = chunked
        self._buffer: list[Any] = []

    def __iter__(self) -> _ResultIterator:
        return self

    def next(self, timeout: float | None = None) -> Any:
        while not self._buffer:
            if not self._pending:
                raise StopIteration
            waiting = self._pending[:1] if self._ordered else self._pending
            done, _ = concurrent.futures.wait(waiting, timeout,
                                              return_when=concurrent.futures.FIRST_COMPLETED)
            if not done:
                raise TimeoutError
            future = next(f for f in self._pending if f in done)
            self._pending.remove(future)
            if future.exception() is not None and self._stop_on_error:
                self._pending = []
            self._buffer = list(future.result())  # a chunk's error is raised here
        return self._buffer.pop(0)

    __next__ = next


class DistributedPool:
    """A ``multiprocessing.Pool`` whose worker processes run on a cluster.

    ``DistributedPool(n=5, instance='C16')`` takes the same settings as the ``cloud``
    backend; ``initializer(*initargs)`` runs once in each worker process that runs this
    pool's tasks, before the first of them.  Connecting happens here, so an unreachable
    host or a version mismatch is reported before any task runs.  The cluster outlives the
    pool (it is reused by the next pool or ``Parallel`` call with the same settings);
    ``terminate`` kills only this pool's tasks.
    """

    def __init__(self, processes: int | None = None,
                 initializer: Callable[..., Any] | None = None, initargs: tuple = (),
                 maxtasksperchild: int | None = None, **settings: Any) -> None:
        if maxtasksperchild is not None:
            raise ValueError("DistributedPool does not support maxtasksperchild: host "
                             "worker processes are long-lived and shared with the backend")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        self._init = _Init(initializer, tuple(initargs)) if initializer else None
        self.config = resolve_config(**settings)
        self._cluster: Cluster = get_cluster(self.config)
        self._processes = processes or self._cluster.target_workers
        self._state = "RUN"
        self._futures: set[Future] = set()
        self._lock = threading.Lock()

    # -- submission -----------------------------------------------------------------
    def _check_running(self) -> None:
        if self._state != "RUN":
            raise ValueError("Pool not running")

    def _submit(self, task: Callable[[], Any], label: str) -> Future:
        cluster = self._cluster
        if not cluster.reusable:
            self._cluster = cluster = get_cluster(self.config)
        future = submit(cluster, task, label, owner=self,
                        sync_packages=self.config.sync_packages)
        with self._lock:
            self._futures.add(future)
        future.add_done_callback(self._forget)
        return future

    def _forget(self, future: Future) -> None:
        with self._lock:
            self._futures.discard(future)

    def _chunks(self, func: Callable[..., Any], iterable: Iterable[Any],
                chunksize: int | None, star: bool) -> list[Future]:
        self._check_running()
        items = list(iterable)
        if chunksize is None:  # multiprocessing's rule: about 4 chunks per worker
            chunksize, extra = divmod(len(items), self._processes * 4)
            chunksize = max(chunksize + bool(extra), 1)
        if chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize:n}")
        register_local_modules()
        self._cluster.new_call()
        label = f"DistributedPool task {_name(func)}"
        return [self._submit(_Chunk(func, items[i:i + chunksize], star, self._init), label)
                for i in range(0, len(items), chunksize)]

    # -- the multiprocessing.Pool interface -------------------------------------------
    def apply_async(self, func: Callable[..., Any], args: tuple = (), kwds: dict | None = None,
                    callback: Callable[[Any], Any] | None = None,
                    error_callback: Callable[[BaseException], Any] | None = None
                    ) -> AsyncResult:
        self._check_running()
        register_local_modules()
        future = self._submit(_Call(func, tuple(args), dict(kwds or {}), self._init),
                              f"DistributedPool task {_name(func)}")
        return AsyncResult([future], lambda values: values[0], callback, error_callback)

    def apply(self, func: Callable[..., Any], args: tuple = (), kwds: dict | None = None
              ) -> Any:
        return self.apply_async(func, args, kwds).get()

    def map_async(self, func: Callable[..., Any], iterable: Iterable[Any],
                  chunksize: int | None = None, callback: Callable[[Any], Any] | None = None,
                  error_callback: Callable[[BaseException], Any] | None = None
                  ) -> AsyncResult:
        return AsyncResult(self._chunks(func, iterable, chunksize, star=False), _flatten,
                           callback, error_callback)

    def map(self, func: Callable[..., Any], iterable: Iterable[Any],
            chunksize: int | None = None) -> list[Any]:
        return self.map_async(func, iterable, chunksize).get()

    def starmap_async(self, func: Callable[..., Any], iterable: Iterable[Iterable[Any]],
                      chunksize: int | None = None,
                      callback: Callable[[Any], Any] | None = None,
                      error_callback: Callable[[BaseException], Any] | None = None
                      ) -> AsyncResult:
        return AsyncResult(self._chunks(func, iterable, chunksize, star=True), _flatten,
                           callback, error_callback)

    def starmap(self, func: Callable[..., Any], iterable: Iterable[Iterable[Any]],
                chunksize: int | None = None) -> list[Any]:
        return self.starmap_async(func, iterable, chunksize).get()

    def imap(self, func: Callable[..., Any], iterable: Iterable[Any], chunksize: int = 1
             ) -> Iterator[Any]:
        return _ResultIterator(self._chunks(func, iterable, chunksize, star=False), True,
                               chunksize > 1)

    def imap_unordered(self, func: Callable[..., Any], iterable: Iterable[Any],
                       chunksize: int = 1) -> Iterator[Any]:
        return _ResultIterator(self._chunks(func, iterable, chunksize, star=False), False,
                               chunksize > 1)

    def close(self) -> None:
        """No more tasks; those submitted still run (``join`` waits for them)."""
        if self._state == "RUN":
            self._state = "CLOSE"

    def terminate(self) -> None:
        """Stop now: this pool's queued and running tasks are cancelled on the hosts."""
        self._state = "TERMINATE"
        self._cluster.abort(owner=self)

    def join(self) -> None:
        if self._state == "RUN":
            raise ValueError("Pool is still running")
        with self._lock:
            futures = list(self._futures)
        concurrent.futures.wait(futures)

    def __enter__(self) -> DistributedPool:
        self._check_running()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.terminate()  # as multiprocessing.Pool does

    def __repr__(self) -> str:
        return (f"<DistributedPool state={self._state} cluster={self.config.cluster!r} "
                f"processes={self._processes}>")


def _flatten(chunks: list[list[Any]]) -> list[Any]:
    return [value for chunk in chunks for value in chunk]
