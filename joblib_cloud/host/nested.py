"""The backend that nested ``Parallel`` calls get inside a task on a host.

Threads (like loky's workers do for nested calls), capped at the worker's share of the
host's cores, so ``n_jobs=-1`` inside a task on a 16-core host with 16 workers runs on one
core instead of spawning 16 more threads per worker.
"""

from __future__ import annotations

import os

from joblib.parallel import ThreadingBackend

from .task_runner import CORES_PER_WORKER_ENV


class HostThreadingBackend(ThreadingBackend):
    def effective_n_jobs(self, n_jobs: int | None) -> int:
        wanted = super().effective_n_jobs(n_jobs)
        share = os.environ.get(CORES_PER_WORKER_ENV)
        return min(wanted, int(share)) if share else wanted

