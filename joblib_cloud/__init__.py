"""joblib-cloud: run unmodified joblib / scikit-learn ``n_jobs`` code on many machines.

``import joblib_cloud`` registers the ``cloud`` joblib backend::

    from joblib import parallel_backend
    with parallel_backend('cloud', instance='C16', n=16):
        grid.fit(X, y)
"""

from __future__ import annotations

import importlib
from typing import Any

from joblib.parallel import register_parallel_backend

from .errors import (
    AbortedError,
    BudgetExceededError,
    ClusterLostError,
    EnvironmentMismatchError,
    HostConnectError,
    HostKeyError,
    HostLostError,
    JoblibCloudError,
    RemoteTaskError,
    ResultTooLargeError,
    TaskPicklingError,
    TerminatedWorkerError,
)

__version__ = "0.1.0"

from .backend import CloudBackend

# Hosts import this package too (the agent and every worker process), and they need only
# joblib and cloudpickle: the client side (paramiko, boto3) loads on first use.
_LAZY = {"DistributedPool": "pool", "status": "handle", "CloudCluster": "handle"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    try:
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise  # the submodule exists but needs something missing: say so
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


register_parallel_backend("cloud", CloudBackend)

__all__ = [
    "AbortedError",
    "BudgetExceededError",
    "CloudBackend",
    "CloudCluster",
    "ClusterLostError",
    "DistributedPool",
    "EnvironmentMismatchError",
    "HostConnectError",
    "HostKeyError",
    "HostLostError",
    "JoblibCloudError",
    "RemoteTaskError",
    "ResultTooLargeError",
    "TaskPicklingError",
    "TerminatedWorkerError",
    "status",
]
