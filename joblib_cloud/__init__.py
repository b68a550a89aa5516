"""joblib-cloud: run unmodified joblib / scikit-learn ``n_jobs`` code on many machines.

``import joblib_cloud`` registers the ``cloud`` joblib backend::

    from joblib import parallel_backend
    with parallel_backend('cloud', instance='C16', n=16):
        grid.fit(X, y)
"""

from joblib.parallel import register_parallel_backend

from .backend import CloudBackend
from .errors import (
    AbortedError,
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
from .pool import DistributedPool

__version__ = "0.1.0"

register_parallel_backend("cloud", CloudBackend)

__all__ = [
    "AbortedError",
    "CloudBackend",
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
]
