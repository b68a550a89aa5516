"""Shared helpers for the benchmarks: a loopback sshd fleet stopped by PID, timing, load.

The fleet is the test suite's (``tests/support/sshfleet.py``): real OpenSSH servers on 127.0.0.x,
so the numbers include the real SSH encryption and the real agent, not a mock.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "support"))
sys.path.insert(0, str(ROOT))

from sshfleet import SSHFleet  # noqa: E402

from joblib_cloud.client import registry  # noqa: E402

MACHINE = f"{os.cpu_count()}-core CPU machine"


Backend = Callable[[], contextlib.AbstractContextManager]


def backend(name: str | None, jobs: int, **settings: Any) -> Backend:
    """A context that selects joblib backend ``name`` (None: none, so ``n_jobs=1`` runs
    in this process) and gives the ``n_jobs`` to pass."""
    @contextlib.contextmanager
    def make() -> Iterator[int]:
        from joblib import parallel_backend

        with parallel_backend(name, **settings) if name else contextlib.nullcontext():
            yield jobs

    return make


def compared_backends(workers: int, fleet: SSHFleet | None) -> dict[str, Backend]:
    """loky, ``cloud`` on the local provider and ``cloud`` on the 2-host ``fleet`` (if
    any), each with ``workers`` worker processes in all."""
    backends = {
        "loky": backend("loky", workers, n_jobs=workers),
        "cloud local": backend("cloud", -1, provider="local", n=1, workers_per_host=workers),
    }
    if fleet is not None:
        backends["cloud ssh 2 hosts"] = backend(
            "cloud", -1, **fleet.kwargs(workers_per_host=max(workers // 2, 1)))
    return backends


@contextlib.contextmanager
def ssh_fleet(n: int = 2) -> Iterator[SSHFleet]:
    """``n`` loopback sshd hosts; every process below them is stopped by PID on exit."""
    root = Path(tempfile.mkdtemp(prefix="joblib-cloud-bench-"))
    fleet = SSHFleet(root, n=n)
    try:
        fleet.start()
        yield fleet
    finally:
        try:

            registry.close_all()
        finally:
            fleet.stop()
            shutil.rmtree(root, ignore_errors=True)


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_time(fn: Callable[[], Any], repeat: int = 3) -> tuple[float, list[float]]:
    """Median wall time of ``repeat`` runs (the machine is shared, so never one run)."""
    times = [timed(fn) for _ in range(repeat)]
    return statistics.median(times), times


def load_note() -> str:
    """The 1-minute load average: benchmarks on a shared 2-core box must say it."""
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on a {MACHINE}"


def isolated_home() -> None:
    """Client state (keys, records) in a throw-away directory, not the user's home."""
    os.environ.setdefault("JOBLIB_CLOUD_HOME", tempfile.mkdtemp(prefix="joblib-cloud-home-"))


def interleaved(backends: dict[str, Callable[[], contextlib.AbstractContextManager]],
                work: Callable[[Any], Any], repeat: int) -> dict[str, list[float]]:
    """Wall times of ``work(value of the backend's context)``, backends taken in turns.

    Round-robin (A, B, C, A, B, C, ...) after one untimed warm-up each: on a machine
    shared with other people a burst of their load then hits every backend alike instead
    of whichever happened to run at that moment.
    """
    times: dict[str, list[float]] = {name: [] for name in backends}
    for make in backends.values():
        with make() as value:
            work(value)
    for _ in range(repeat):
        for name, make in backends.items():
            with make() as value:
                times[name].append(timed(lambda: work(value)))  # noqa: B023
    return times


@contextlib.contextmanager
def dask_client(workers: int) -> Iterator[None]:
    """A Dask LocalCluster of ``workers`` single-threaded processes, as default client."""
    from dask.distributed import Client, LocalCluster

    saved = dict(os.environ)
    try:
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                          dashboard_address=None) as cluster, Client(cluster):
            yield None
    finally:
        # Dask's nanny leaves MALLOC_TRIM_THRESHOLD_, OMP_NUM_THREADS, PYTHONHASHSEED...
        # in this process's environment; processes started later (loky workers, local
        # agents) inherited them and loky's batch_size=1 cost went from ~120 to ~330 µs.
        os.environ.clear()
        os.environ.update(saved)


def runs(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)
