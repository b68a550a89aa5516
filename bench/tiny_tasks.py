"""Dispatch cost: many trivial tasks through each backend, measured side by side.

Two figures per backend, both with the same number of worker processes:
  * auto-batched throughput (tasks/s) for ``--tasks`` trivial tasks (default 200,000);
  * ``batch_size=1`` latency (µs/task) for ``--b1-tasks`` tasks (default 2,000), which
    exposes any per-task round trip.
Ratios are to loky measured in the same run.  Usage::

    python bench/tiny_tasks.py [--workers 2] [--repeat 3] [--no-dask]
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from _fleet import MACHINE, isolated_home, load_note, median_time, ssh_fleet
from joblib import Parallel, delayed, parallel_backend

import joblib_cloud  # noqa: F401  (registers the backend)

Context = Callable[[], contextlib.AbstractContextManager]


def run_tasks(n: int, batch_size: int | str, n_jobs: int) -> None:
    # abs is a builtin: the figure is the backend's dispatch cost, not pickling a function.
    out = Parallel(n_jobs=n_jobs, batch_size=batch_size)(delayed(abs)(-i) for i in range(n))
    if len(out) != n or out[-1] != n - 1:
        raise AssertionError("wrong results")


@contextlib.contextmanager
def loky_ctx(workers: int) -> Iterator[int]:
    with parallel_backend("loky", n_jobs=workers):
        yield workers


@contextlib.contextmanager
def cloud_ctx(**kwargs: Any) -> Iterator[int]:
    with parallel_backend("cloud", **kwargs):
        yield -1


@contextlib.contextmanager
def dask_ctx(workers: int) -> Iterator[int]:
    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster), \
            parallel_backend("dask"):
        yield workers


def measure(name: str, ctx: contextlib.AbstractContextManager, args: argparse.Namespace
            ) -> dict[str, float]:
    with ctx as n_jobs:
        run_tasks(2000, "auto", n_jobs)  # warm up: workers started, connections open
        batched, runs_b = median_time(lambda: run_tasks(args.tasks, "auto", n_jobs),
                                      args.repeat)
        single, runs_1 = median_time(lambda: run_tasks(args.b1_tasks, 1, n_jobs),
                                     args.repeat)
    row = {"tasks_per_s": args.tasks / batched, "us_per_task": single / args.b1_tasks * 1e6}
    print(f"  {name:<22} batched {row['tasks_per_s']:>10,.0f} tasks/s  "
          f"(runs {', '.join(f'{t:.2f}' for t in runs_b)} s)   batch_size=1 "
          f"{row['us_per_task']:>7,.0f} µs/task (runs {', '.join(f'{t:.2f}' for t in runs_1)} s)",
          flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200_000)
    parser.add_argument("--b1-tasks", type=int, default=2_000)
    parser.add_argument("--workers", type=int, default=2, help="worker processes per backend")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-dask", action="store_true")
    parser.add_argument("--no-fleet", action="store_true")
    args = parser.parse_args()
    isolated_home()
    w = args.workers
    print(f"tiny tasks: {args.tasks:,} auto-batched, {args.b1_tasks:,} at batch_size=1, "
          f"{w} workers per backend, median of {args.repeat}; {MACHINE}")
    print(f"before: {load_note()}")
    rows: dict[str, dict[str, float]] = {}
    rows["loky"] = measure("loky", loky_ctx(w), args)
    rows["cloud local"] = measure(
        "cloud local (1 host)", cloud_ctx(provider="local", n=1, workers_per_host=w), args)
    if not args.no_fleet:
        with ssh_fleet(2) as fleet:
            rows["cloud ssh 2 hosts"] = measure(
                f"cloud ssh (2 x {max(w // 2, 1)})",
                cloud_ctx(**fleet.kwargs(workers_per_host=max(w // 2, 1))), args)
    if not args.no_dask:
        rows["dask"] = measure("dask LocalCluster", dask_ctx(w), args)
    print(f"after: {load_note()}")
    loky = rows["loky"]
    print("\nratios to loky (batched: throughput ratio, higher is better; "
          "batch_size=1: µs/task ratio, lower is better)")
    for name, row in rows.items():
        print(f"  {name:<22} batched {row['tasks_per_s'] / loky['tasks_per_s']:5.2f}x loky   "
              f"batch_size=1 {row['us_per_task'] / loky['us_per_task']:5.2f}x loky's µs/task")
    if "dask" in rows:
        dask_tps = rows["dask"]["tasks_per_s"]
        for name, row in rows.items():
            if name.startswith("cloud"):
                print(f"  {name:<22} batched {row['tasks_per_s'] / dask_tps:5.2f}x dask")


if __name__ == "__main__":
    main()
