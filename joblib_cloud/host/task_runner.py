"""What runs inside one worker process on a host: read a batch frame, unpickle it, run
it, write the outcome back.  Everything sent is plain bytes and small dicts, so the agent
forwards it without unpickling user objects itself."""

from __future__ import annotations

import importlib
import io
import os
import pickle
import sys
import threading
import traceback
from typing import Any

import cloudpickle

from ..wire.cached import loads_batch
from ..wire.protocol import FrameReader, Kind, ResultMeta, Status, WorkerReadyMeta, encode
from . import background
from .worker_pool import write_all

CORES_PER_WORKER_ENV = "JOBLIB_CLOUD_CORES_PER_WORKER"


def _error(exc: BaseException) -> tuple[ResultMeta, bytes]:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    meta: ResultMeta = {
        "status": Status.ERROR.value,
        "exc_type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": _safe_str(exc),
        "traceback": text,
    }
    try:
        data = cloudpickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
        pickle.loads(data)  # an exception that pickles but cannot be rebuilt is common
    except Exception as pickling_error:
        meta["unpicklable"] = f"{type(pickling_error).__name__}: {pickling_error}"
        data = b""
    return meta, data


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<{type(exc).__name__} with unprintable message>"


def _line_buffered_output() -> None:
    """Whole lines reach the agent's pipe at once, so workers' prints never interleave
    mid-line, and nothing waits in a block buffer until the worker exits."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper) and not stream.line_buffering:
            stream.reconfigure(line_buffering=True)


def run_batch(payload: bytes | memoryview, cache_dir: str, max_result_size: int,
              inner_threads: int | None = None) -> tuple[ResultMeta, bytes]:
    """Run one cloudpickled batch; return the result frame's ``(meta, data)``.  A batch
    that fails to import a module the boot is still installing (``host/background.py``)
    waits for that install and runs again."""
    _line_buffered_output()
    while True:
        stage, outcome = _run_once(payload, cache_dir, inner_threads)
        # While the boot installs, a half-written module can fail in other ways too
        # (a truncated file): any failure to unpickle, and ImportError anywhere.
        if stage == "ran" or not (isinstance(outcome, ImportError) or (
                stage == "unpickling" and isinstance(outcome, Exception))):
            break
        install = background.wait_for(outcome.name if isinstance(outcome, ImportError)
                                      else None)
        if install is False:
            break
        if install is not None:  # it failed: so does the batch, saying why
            kind = ModuleNotFoundError if isinstance(outcome, ModuleNotFoundError) \
                else ImportError
            error = kind(f"{_safe_str(outcome)}: {install.failure()}",
                         name=outcome.name if isinstance(outcome, ImportError) else None)
            error.__cause__ = outcome
            return _error(error)
    if stage == "ran":
        return _result(outcome, max_result_size)
    meta, data = _error(outcome)
    if stage == "unpickling" and isinstance(outcome, ModuleNotFoundError) and outcome.name:
        meta["missing_module"] = outcome.name  # the client may install it (sync_packages)
    return meta, data


def _run_once(payload: bytes | memoryview, cache_dir: str,
              inner_threads: int | None) -> tuple[str, Any]:
    """``("ran", result)``, or the exception raised while ``"unpickling"`` or
    ``"running"`` the batch."""
    try:
        batch = _loads(payload, cache_dir)
    except BaseException as exc:  # noqa: BLE001 - reported to the client, not swallowed
        return "unpickling", exc
    try:
        if inner_threads:
            from threadpoolctl import threadpool_limits

            with threadpool_limits(inner_threads):
                return "ran", batch()
        return "ran", batch()
    except BaseException as exc:  # noqa: BLE001
        return "running", exc


def _result(result: Any, max_result_size: int) -> tuple[ResultMeta, bytes]:
    try:
        data = _dumps_result(result)
    except BaseException as exc:  # noqa: BLE001
        return _error(exc)
    if len(data) > max_result_size:
        return {"status": Status.TOO_LARGE.value, "size": len(data),
                "limit": max_result_size}, b""
    return {"status": Status.OK.value}, data


def _loads(payload: bytes | memoryview, cache_dir: str) -> Any:
    """Unpickle a batch.  A module missing here may have been installed since this worker
    started (the client asks the agent to install it, then sends the batch again), and the
    import system caches directory listings: look again once, on this failure path only."""
    try:
        return loads_batch(payload, cache_dir)
    except ModuleNotFoundError:
        importlib.invalidate_caches()
        return loads_batch(payload, cache_dir)


def _dumps_result(result: Any) -> bytes:
    """Plain pickle first (~6x faster for small results); cloudpickle for what plain pickle
    refuses.  Plain pickle never gets a reference wrong: it pickles a class or function by
    name only if that name leads back to the very same object here, so anything defined
    by value (in ``__main__`` on the client, say) falls through to cloudpickle."""
    try:
        return pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - PicklingError, TypeError, AttributeError, ...
        return cloudpickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)


def serve(in_fd: int, out_fd: int, lifeline: int, max_result_size: int,
          cache_dir: str) -> None:
    """A worker process's life: say ready, then run batches until the agent goes away."""
    threading.Thread(target=_exit_with_agent, args=(lifeline,), daemon=True).start()
    ready: WorkerReadyMeta = {"pid": os.getpid()}
    write_all(out_fd, encode(Kind.READY, ready))
    reader = FrameReader(lambda n: os.read(in_fd, n))
    while True:
        try:
            _, meta, payload = reader.read()
        except EOFError:
            return
        result_meta, data = run_batch(payload, cache_dir, max_result_size,
                                         meta.get("threads"))
        result_meta["id"] = meta["id"]  # the agent forwards the frame as it is
        write_all(out_fd, encode(Kind.RESULT, result_meta, data))


def _exit_with_agent(lifeline: int) -> None:
    """The agent holds the only write end: EOF means it is gone, even if SIGKILLed, and a
    task still running must not outlive it."""
    while os.read(lifeline, 1):
        pass
    os._exit(0)
