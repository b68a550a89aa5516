"""Dispatch cost: many trivial tasks through each backend, measured side by side.

Two figures per backend, all with the same number of worker processes:
  * auto-batched throughput (tasks/s) for ``--tasks`` trivial tasks (default 200,000);
  * ``batch_size=1`` cost (µs/task) for ``--b1-tasks`` tasks (default 2,000), which
    exposes any per-task round trip.
Backends run in turns (see ``_fleet.interleaved``); ratios are to loky in the same run.
Usage::

    python bench/tiny_tasks.py [--workers 2] [--repeat 3] [--no-dask] [--no-fleet]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from collections.abc import Iterator

from _fleet import (
    MACHINE,
    Backend,
    compared_backends,
    dask_client,
    interleaved,
    isolated_home,
    load_note,
    runs,
    ssh_fleet,
)
from joblib import Parallel, delayed, parallel_backend

import joblib_cloud  # noqa: F401  (registers the backend)


def run_tasks(n: int, batch_size: int | str, n_jobs: int) -> None:
    # abs is a builtin: the figure is the backend's dispatch cost, not pickling a function.
    out = Parallel(n_jobs=n_jobs, batch_size=batch_size)(delayed(abs)(-i) for i in range(n))
    if len(out) != n or out[-1] != n - 1:
        raise AssertionError("wrong results")


def dask_backend(workers: int) -> Backend:
    """A LocalCluster per turn (started before the clock starts), none in between: a live
    Dask client's event-loop thread slowed the other backends in this process."""
    @contextlib.contextmanager
    def make() -> Iterator[int]:
        with dask_client(workers), parallel_backend("dask"):
            yield workers

    return make


def measure_all(backends: dict[str, Backend],
                args: argparse.Namespace) -> dict[str, dict[str, float]]:
    batched = interleaved(backends, lambda n_jobs: run_tasks(args.tasks, "auto", n_jobs),
                          args.repeat)
    single = interleaved(backends, lambda n_jobs: run_tasks(args.b1_tasks, 1, n_jobs),
                         args.repeat)
    rows = {}
    for name in backends:
        rows[name] = {"tasks_per_s": args.tasks / statistics.median(batched[name]),
                      "us_per_task": statistics.median(single[name]) / args.b1_tasks * 1e6}
        print(f"  {name:<20} batched {rows[name]['tasks_per_s']:>10,.0f} tasks/s "
              f"(runs {runs(batched[name])} s)   batch_size=1 "
              f"{rows[name]['us_per_task']:>7,.0f} µs/task (runs {runs(single[name])} s)",
              flush=True)
    return rows


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
          f"{w} workers per backend, median of {args.repeat}, backends in turns; {MACHINE}")
    print(f"before: {load_note()}")
    with contextlib.ExitStack() as stack:
        fleet = None if args.no_fleet else stack.enter_context(ssh_fleet(2))
        rows = measure_all(compared_backends(w, fleet), args)
        if not args.no_dask:
            # Last: once a Dask cluster has run in this process, loky's batch_size=1
            # cost here tripled (~120 -> ~330 µs/task) for the rest of the process.
            rows.update(measure_all({"dask": dask_backend(w)}, args))
    print(f"after: {load_note()}")
    loky = rows["loky"]
    print("\nratios to loky (batched: throughput, higher is better; batch_size=1: µs/task, "
          "lower is better)")
    for name, row in rows.items():
        print(f"  {name:<20} batched {row['tasks_per_s'] / loky['tasks_per_s']:5.2f}x loky   "
              f"batch_size=1 {row['us_per_task'] / loky['us_per_task']:5.2f}x loky's µs/task")
    if "dask" in rows:
        dask = rows["dask"]
        for name, row in rows.items():
            if name.startswith("cloud"):
                print(f"  {name:<20} batched {row['tasks_per_s'] / dask['tasks_per_s']:5.2f}x "
                      f"dask   batch_size=1 {dask['us_per_task'] / row['us_per_task']:5.2f}x "
                      "faster than dask")


if __name__ == "__main__":
    main()
