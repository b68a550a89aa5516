"""The example's grid search (examples/grid_search.py) on each backend, side by side.

Wall time and speed-up over ``n_jobs=1`` for: sequential, loky, ``cloud`` on ``local``
(one host), ``cloud`` on a 2-host loopback ssh fleet, each with the same number of worker
processes.  Every backend must find the same best parameters.  Usage::

    python bench/grid_search.py [--samples 3000] [--workers 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from typing import Any

from _fleet import MACHINE, ROOT, isolated_home, load_note, median_time, ssh_fleet
from joblib import parallel_backend

import joblib_cloud  # noqa: F401


def _load_example() -> Any:
    """examples/grid_search.py under another name (this file has the same one)."""
    spec = importlib.util.spec_from_file_location("example_grid_search",
                                                  ROOT / "examples" / "grid_search.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # importable by name on hosts (pickled by value)
    spec.loader.exec_module(module)
    return module


_example = _load_example()
PARAM_GRID, make_data, make_search = _example.PARAM_GRID, _example.make_data, _example.make_search


def fit(n_jobs: int | None, X: Any, y: Any) -> dict:
    return make_search(n_jobs).fit(X, y).best_params_


def measure(name: str, ctx: contextlib.AbstractContextManager, n_jobs: int | None,
            X: Any, y: Any, repeat: int, expected: dict | None) -> float:
    with ctx:
        best = fit(n_jobs, X, y)  # warm up: connections open, workers started
        if expected is not None and best != expected:
            raise AssertionError(f"{name} found {best}, n_jobs=1 found {expected}")
        wall, runs = median_time(lambda: fit(n_jobs, X, y), repeat)
    print(f"  {name:<24} {wall:7.2f} s   (runs {', '.join(f'{t:.2f}' for t in runs)})",
          flush=True)
    return wall


@contextlib.contextmanager
def nothing() -> Iterator[None]:
    yield None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    isolated_home()
    w = args.workers
    X, y = make_data(args.samples)
    candidates = len(PARAM_GRID["svc__C"]) * len(PARAM_GRID["svc__gamma"])
    print(f"grid search: examples/grid_search.py, {candidates} candidates x 5 folds, "
          f"{args.samples} samples, {w} workers per backend, median of {args.repeat}; "
          f"{MACHINE}")
    print(f"before: {load_note()}")
    expected = make_search(1).fit(X, y).best_params_
    walls = {"sequential (n_jobs=1)": measure("sequential (n_jobs=1)", nothing(), 1, X, y,
                                              args.repeat, expected)}
    walls["loky"] = measure("loky", parallel_backend("loky", n_jobs=w), -1, X, y,
                            args.repeat, expected)
    walls["cloud local"] = measure(
        "cloud local (1 host)",
        parallel_backend("cloud", provider="local", n=1, workers_per_host=w), -1, X, y,
        args.repeat, expected)
    with ssh_fleet(2) as fleet:
        walls["cloud ssh 2 hosts"] = measure(
            f"cloud ssh (2 x {max(w // 2, 1)})",
            parallel_backend("cloud", **fleet.kwargs(workers_per_host=max(w // 2, 1))), -1,
            X, y, args.repeat, expected)
    print(f"after: {load_note()}")
    seq, loky = walls["sequential (n_jobs=1)"], walls["loky"]
    print("\nspeed-up over n_jobs=1, and time relative to loky:")
    for name, wall in walls.items():
        print(f"  {name:<24} x{seq / wall:5.2f}   {wall / loky:5.2f}x loky's time")


if __name__ == "__main__":
    main()
