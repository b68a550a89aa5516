"""The ``cloud`` joblib backend: a sibling of joblib's ``LokyBackend`` whose workers are
processes on other machines.

joblib builds and configures backends freely (once per ``Parallel`` call), so everything
here is cheap: the cluster is looked up in a registry and connected only the first time
it is needed, and ``terminate`` leaves it running for the next call.

``import joblib_cloud`` registers this class, and hosts import the package too (the agent
and every worker process), with only joblib and cloudpickle installed: so the client's
machinery is imported inside the methods, on first use.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from joblib.parallel import AutoBatchingMixin, ParallelBackendBase

from .config import resolve_config

if TYPE_CHECKING:
    from .client.cluster import Cluster
    from .config import CloudConfig
    from .host.nested import HostThreadingBackend


class CloudBackend(AutoBatchingMixin, ParallelBackendBase):
    """Run joblib batches on a cluster of hosts (``local``, ``ssh`` or ``aws``)."""

    supports_retrieve_callback = True  # generators, unordered generators, timeout=
    supports_inner_max_num_threads = True
    supports_sharedmem = False
    uses_threads = False
    default_n_jobs = -1
    # A remote round trip costs more than a local pipe: aim for batches long enough to
    # hide it, but short enough that a lost host does not throw much work away.
    MIN_IDEAL_BATCH_DURATION = 0.2
    MAX_IDEAL_BATCH_DURATION = 2.0

    def __init__(self, nesting_level: int | None = None,
                 inner_max_num_threads: int | None = None, **settings: Any) -> None:
        super().__init__(nesting_level=nesting_level,
                         inner_max_num_threads=inner_max_num_threads)
        self.config: CloudConfig = resolve_config(**settings)
        self._cluster: Cluster | None = None

    @property
    def cluster(self) -> Cluster:
        """Connected on first use, then reused by every call with the same settings."""
        if self._cluster is None or not self._cluster.reusable:
            from .client.registry import get_cluster

            self._cluster = get_cluster(self.config)
        return self._cluster

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs == 1:
            return 1  # joblib's convention: run in the calling process
        total = self.cluster.target_workers
        if n_jobs is None:
            n_jobs = -1
        wanted = max(total + 1 + n_jobs, 1) if n_jobs < 0 else n_jobs
        # joblib runs everything in the caller when this is 1: a cluster of one worker
        # (one small VM, say) must still get the work, so report at least two slots.
        return max(wanted, 2)

    def configure(self, n_jobs: int = 1, parallel: Any = None, prefer: Any = None,
                  require: Any = None, **_memmapping_kwargs: Any) -> int:
        # joblib passes loky's memmapping options (max_nbytes, mmap_mode, ...); large
        # arguments are handled by the per-host cache instead.
        self.parallel = parallel
        return self.effective_n_jobs(n_jobs)

    def start_call(self) -> None:
        from .wire.serialization import register_local_modules

        register_local_modules()
        cluster = self.cluster
        cluster.new_call()
        if cluster.progress is not None:
            cluster.progress.start_call(getattr(self, "parallel", None))

    def stop_call(self) -> None:
        cluster = self._cluster
        if cluster is not None:
            cluster.flush_output()
            if cluster.progress is not None:
                cluster.progress.stop_call()

    def submit(self, func: Any, callback: Any = None) -> Future:
        from .client.batch import describe_batch, submit

        future = submit(self.cluster, func, describe_batch(func), owner=self,
                        threads=self.inner_max_num_threads,
                        sync_packages=self.config.sync_packages,
                        size=len(func) if hasattr(func, "__len__") else 1)
        if callback is not None:
            future.add_done_callback(callback)
        return future

    def retrieve_result_callback(self, future: Future) -> Any:
        return future.result()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """Kill this backend's remote tasks; the cluster itself stays up and usable."""
        if self._cluster is not None:
            self._cluster.abort(owner=self)

    def terminate(self) -> None:
        # Cluster lifetime is not tied to one Parallel call (see the module docstring).
        self.reset_batch_stats()

    def get_nested_backend(self) -> tuple[HostThreadingBackend, None]:
        from .host.nested import HostThreadingBackend

        return HostThreadingBackend(nesting_level=(self.nesting_level or 0) + 1), None
