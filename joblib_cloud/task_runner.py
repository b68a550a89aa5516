"""What runs inside one worker process on a host: unpickle a batch, run it, encode the
outcome.  Everything returned is plain bytes and small dicts, so the agent forwards it
without unpickling user objects itself."""

from __future__ import annotations

import os
import pickle
import sys
import traceback
from typing import Any

import cloudpickle

from .serialization import loads_batch

CORES_PER_WORKER_ENV = "JOBLIB_CLOUD_CORES_PER_WORKER"


def _error(exc: BaseException, stage: str) -> tuple[str, dict[str, Any], bytes]:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    meta = {
        "status": "error",
        "stage": stage,
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
    return "error", meta, data


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<{type(exc).__name__} with unprintable message>"


def _line_buffered_output() -> None:
    """Whole lines reach the agent's pipe at once, so workers' prints never interleave
    mid-line, and nothing waits in a block buffer until the worker exits."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None and not getattr(stream, "line_buffering", True):
            stream.reconfigure(line_buffering=True)


def run_batch(payload: bytes, cache_dir: str, max_result_size: int,
              inner_threads: int | None = None) -> tuple[str, dict[str, Any], bytes]:
    """Run one cloudpickled batch; return ``(status, meta, data)``."""
    _line_buffered_output()
    try:
        batch = loads_batch(payload, cache_dir)
    except BaseException as exc:  # noqa: BLE001 - reported to the client, not swallowed
        status, meta, data = _error(exc, "unpickle")
        if isinstance(exc, ModuleNotFoundError):
            meta["missing_module"] = exc.name
        return status, meta, data
    try:
        if inner_threads:
            from threadpoolctl import threadpool_limits

            with threadpool_limits(inner_threads):
                result = batch()
        else:
            result = batch()
    except BaseException as exc:  # noqa: BLE001
        return _error(exc, "run")
    try:
        data = cloudpickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
    except BaseException as exc:  # noqa: BLE001
        return _error(exc, "pickle-result")
    if len(data) > max_result_size:
        return "too_large", {"status": "too_large", "size": len(data),
                             "limit": max_result_size}, b""
    return "ok", {"status": "ok"}, data


def warm_up() -> int:
    """Run once per worker at start so the first real batch does not pay the spawn."""
    return os.getpid()
