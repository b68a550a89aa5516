"""One batch's life on the client: what was submitted, and how its outcome becomes the
future's result or exception (the remote traceback kept as the cause)."""

from __future__ import annotations

import itertools
import pickle
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import (
    RemoteTaskError,
    RemoteTraceback,
    ResultTooLargeError,
    TaskPicklingError,
    TerminatedWorkerError,
)
from ..wire.protocol import (
    ResultMeta,
    Status,
)

if TYPE_CHECKING:
    from ..wire.serialization import ObjectStore


_batch_ids = itertools.count(1)


@dataclass(eq=False)
class Batch:
    payload: bytes
    refs: frozenset[str]
    label: str
    owner: object
    threads: int | None = None
    future: Future[Any] = field(default_factory=Future)
    id: int = field(default_factory=lambda: next(_batch_ids))
    tries: int = 0
    aborted: bool = False
    #: A module it misses on a host may be installed there, and then it runs again.
    sync_packages: bool = False
    #: Tasks in it (joblib's batch size), for the progress display.
    size: int = 1


def resolve(job: Batch, result: Any = None, exc: BaseException | None = None) -> None:
    try:
        if exc is not None:
            job.future.set_exception(exc)
        else:
            job.future.set_result(result)
    except InvalidStateError:
        pass  # already failed by an abort or a lost cluster


def result_error(status: Status, meta: ResultMeta, data: bytes | memoryview, host: str,
                 label: str) -> BaseException:
    """The exception a failed batch's future gets, by how it ended."""
    if status is Status.ERROR:
        return remote_exception(meta, data, host, label)
    if status is Status.CRASHED:
        return TerminatedWorkerError(
            f"a worker process on host {host} died while running {label} "
            f"({meta.get('message')}). The likely causes are a segmentation fault, "
            "os._exit, or the out-of-memory killer (try fewer workers_per_host or a "
            "larger instance); the host has started fresh workers.")
    if status is Status.BROKEN:
        return TerminatedWorkerError(
            f"host {host} cannot start worker processes, so {label} did not "
            f"run: {meta.get('message')}. Check that python= on the host imports "
            "joblib, cloudpickle and what your tasks need.")
    if status is Status.TOO_LARGE:
        return ResultTooLargeError(
            f"the result of {label} on host {host} is {meta['size']:,} bytes "
            f"pickled, over max_result_size={meta['limit']:,}. Return something "
            "smaller (e.g. write large outputs to storage and return their path), or "
            "raise max_result_size.")
    raise AssertionError(f"no error for status {status}")  # pragma: no cover


def remote_exception(meta: ResultMeta, data: bytes | memoryview, host: str, label: str
                     ) -> BaseException:
    """Rebuild a task's exception with its type, and the remote traceback as its cause."""
    exc: BaseException | None = None
    if data:
        try:
            exc = pickle.loads(data)
        except Exception as err:  # e.g. its class exists only on the host
            meta.setdefault("unpicklable", f"{type(err).__name__}: {err}")
    if meta.get("missing_module"):
        module = meta["missing_module"]
        exc = ModuleNotFoundError(
            f"{label} needs module {module!r}, which host {host} cannot import. Install it "
            f"there (packages=['{module}'] on aws, or pip install on your own hosts); "
            "modules in your working directory are sent automatically. With "
            "sync_packages=True, a module this client has from an installed package is "
            "installed on the host for you.", name=module)
    elif exc is None:
        exc = RemoteTaskError(
            f"{meta.get('exc_type')}: {meta.get('message')} (raised on host {host} in "
            f"{label}; the exception could not be sent back as itself: "
            f"{meta.get('unpicklable')})")
    exc.__cause__ = RemoteTraceback(
        f'\n"""\nTraceback on host {host}, {label}:\n{meta.get("traceback", "")}"""')
    return exc


def describe_batch(batch: Any) -> str:
    """``batch of 3 x fit_and_score`` — how errors name a batch."""
    items = getattr(batch, "items", None)
    if not items:
        return f"task {_callable_name(batch)}"
    names = sorted({_callable_name(item[0]) for item in items[:20]})  # cheap on hot path
    what = names[0] if len(names) == 1 else ", ".join(names[:3])
    return f"batch of {len(items)} x {what}" if len(items) > 1 else f"task {what}"


def _callable_name(func: Any) -> str:
    inner = getattr(func, "function", None) or getattr(func, "func", None) or func
    return getattr(inner, "__qualname__", None) or type(inner).__name__


class Submitter(Protocol):
    """Where batches go (``cluster.Cluster``)."""

    store: ObjectStore

    def submit(self, job: Batch) -> Future[Any]: ...


def submit(cluster: Submitter, obj: Any, label: str, owner: object,
           threads: int | None = None, sync_packages: bool = False, size: int = 1
           ) -> Future[Any]:
    """Pickle ``obj`` (a joblib batch, a pool's chunk) and queue it on ``cluster``; a
    pickling error becomes the future's outcome, naming what could not be sent."""
    from ..wire.serialization import dumps_batch

    try:
        payload, refs = dumps_batch(obj, cluster.store)
    except Exception as exc:  # noqa: BLE001 - becomes this batch's outcome
        future: Future[Any] = Future()
        error = TaskPicklingError(f"could not pickle {label} to send it to the cluster: "
                                  f"{type(exc).__name__}: {exc}")
        error.__cause__ = exc
        future.set_exception(error)
        return future
    return cluster.submit(Batch(payload, frozenset(refs), label, owner=owner, threads=threads,
                                sync_packages=sync_packages, size=size))
