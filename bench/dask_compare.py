"""joblib-cloud vs Dask's joblib backend, same workloads, same number of workers.

Runs the example grid search (examples/grid_search.py) and the tiny tasks of
bench/tiny_tasks.py through: loky (the anchor), Dask (``parallel_backend('dask')`` on a
``LocalCluster`` of ``--workers`` single-threaded worker processes), ``cloud`` on
``local`` and ``cloud`` on a 2-host loopback ssh fleet; backends in turns.  Prints each
figure and the ratios to Dask.  Usage::

    python bench/dask_compare.py [--workers 2] [--repeat 3] [--tasks 200000]
"""

from __future__ import annotations

import argparse

import grid_search
import tiny_tasks
from _fleet import MACHINE, compared_backends, isolated_home, load_note, ssh_fleet

import joblib_cloud  # noqa: F401


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--tasks", type=int, default=200_000)
    parser.add_argument("--b1-tasks", type=int, default=2_000)
    args = parser.parse_args()
    isolated_home()
    w = args.workers
    X, y = grid_search.make_data(args.samples)
    print(f"dask vs joblib-cloud: {w} workers per backend, median of {args.repeat}, "
          f"backends in turns; {MACHINE}")
    print(f"before: {load_note()}")
    with ssh_fleet(2) as fleet:
        ours = compared_backends(w, fleet)

        # Dask last: once a Dask cluster has run in a process, loky's batch_size=1 cost
        # in that process tripled, which would flatter everything measured after it.
        print("\ngrid search (wall time):")
        search = grid_search.measure_all(ours, X, y, args.repeat)
        print("\ntiny tasks:")
        tiny = tiny_tasks.measure_all(ours, args)
        print("\ndask (grid search, then tiny tasks):")
        search.update(grid_search.measure_all({"dask": tiny_tasks.dask_backend(w)}, X, y,
                                              args.repeat))
        tiny.update(tiny_tasks.measure_all({"dask": tiny_tasks.dask_backend(w)}, args))
    print(f"after: {load_note()}")
    print("\nratios to dask (> 1: faster than dask):")
    for name in search:
        print(f"  {name:<20} grid search {search['dask'] / search[name]:5.2f}x   tiny batched "
              f"{tiny[name]['tasks_per_s'] / tiny['dask']['tasks_per_s']:5.2f}x   "
              f"batch_size=1 {tiny['dask']['us_per_task'] / tiny[name]['us_per_task']:5.2f}x")


if __name__ == "__main__":
    main()
