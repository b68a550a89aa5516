"""The example's grid search (examples/grid_search.py) on each backend, side by side.

Wall time and speed-up over ``n_jobs=1`` for: sequential, loky, ``cloud`` on ``local``
(one host), ``cloud`` on a 2-host loopback ssh fleet, each with the same number of worker
processes.  Every backend must find the same best parameters.  Usage::

    python bench/grid_search.py [--samples 3000] [--workers 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from typing import Any

from _fleet import (
    MACHINE,
    ROOT,
    Backend,
    backend,
    compared_backends,
    interleaved,
    isolated_home,
    load_note,
    runs,
    ssh_fleet,
)

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


def measure_all(backends: dict[str, Backend],
                X: Any, y: Any, repeat: int) -> dict[str, float]:
    """Median wall time per backend; every backend must find n_jobs=1's best parameters."""
    expected = make_search(1).fit(X, y).best_params_

    def work(n_jobs: int) -> None:
        best = fit(n_jobs, X, y)
        if best != expected:
            raise AssertionError(f"found {best}, n_jobs=1 found {expected}")

    times = interleaved(backends, work, repeat)
    walls = {}
    for name, values in times.items():
        walls[name] = statistics.median(values)
        print(f"  {name:<22} {walls[name]:7.2f} s   (runs {runs(values)})", flush=True)
    return walls


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
          f"{args.samples} samples, {w} workers per backend, median of {args.repeat}, "
          f"backends in turns; {MACHINE}")
    print(f"before: {load_note()}")
    with ssh_fleet(2) as fleet:
        walls = measure_all({"sequential (n_jobs=1)": backend(None, 1),
                             **compared_backends(w, fleet)}, X, y, args.repeat)
    print(f"after: {load_note()}")
    seq, loky = walls["sequential (n_jobs=1)"], walls["loky"]
    print("\nspeed-up over n_jobs=1, and time relative to loky:")
    for name, wall in walls.items():
        print(f"  {name:<22} x{seq / wall:5.2f}   {wall / loky:5.2f}x loky's time")


if __name__ == "__main__":
    main()
