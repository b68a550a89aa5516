"""joblib-cloud vs Dask's joblib backend, same workloads, same number of workers.

Runs the example grid search (examples/grid_search.py) and the tiny tasks of
bench/tiny_tasks.py through: loky (the anchor), Dask (``parallel_backend('dask')`` on a
``LocalCluster`` of ``--workers`` single-threaded worker processes), ``cloud`` on
``local`` and ``cloud`` on a 2-host loopback ssh fleet.  Prints each figure and the ratios
to Dask.  Usage::

    python bench/dask_compare.py [--workers 2] [--repeat 3] [--tasks 200000]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator

from _fleet import MACHINE, isolated_home, load_note, ssh_fleet
from grid_search import make_data, make_search
from grid_search import measure as measure_search
from joblib import parallel_backend
from tiny_tasks import measure as measure_tiny

import joblib_cloud  # noqa: F401


@contextlib.contextmanager
def dask_backend(workers: int) -> Iterator[int]:
    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster), \
            parallel_backend("dask"):
        yield workers


@contextlib.contextmanager
def cloud(**kwargs: object) -> Iterator[int]:
    with parallel_backend("cloud", **kwargs):
        yield -1


@contextlib.contextmanager
def loky(workers: int) -> Iterator[int]:
    with parallel_backend("loky", n_jobs=workers):
        yield workers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--tasks", type=int, default=200_000)
    parser.add_argument("--b1-tasks", type=int, default=2_000)
    args = parser.parse_args()
    isolated_home()
    w, per_host = args.workers, max(args.workers // 2, 1)
    X, y = make_data(args.samples)
    expected = make_search(1).fit(X, y).best_params_
    print(f"dask vs joblib-cloud: {w} workers per backend, median of {args.repeat}; {MACHINE}")
    print(f"before: {load_note()}")
    search: dict[str, float] = {}
    tiny: dict[str, dict[str, float]] = {}
    with ssh_fleet(2) as fleet:
        backends = {
            "loky": lambda: loky(w),
            "dask": lambda: dask_backend(w),
            "cloud local": lambda: cloud(provider="local", n=1, workers_per_host=w),
            "cloud ssh 2 hosts": lambda: cloud(**fleet.kwargs(workers_per_host=per_host)),
        }
        print("\ngrid search (wall time):")
        for name, make in backends.items():
            with make() as n_jobs:
                search[name] = measure_search(name, contextlib.nullcontext(), n_jobs, X, y,
                                              args.repeat, expected)
        print("\ntiny tasks:")
        for name, make in backends.items():
            tiny[name] = measure_tiny(name, make(), args)
    print(f"after: {load_note()}")
    print("\nratios to dask (> 1: faster than dask):")
    for name in backends:
        print(f"  {name:<20} grid search {search['dask'] / search[name]:5.2f}x   tiny batched "
              f"{tiny[name]['tasks_per_s'] / tiny['dask']['tasks_per_s']:5.2f}x   "
              f"batch_size=1 {tiny['dask']['us_per_task'] / tiny[name]['us_per_task']:5.2f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
