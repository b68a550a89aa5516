"""A GridSearchCV on a large ``X`` over a 2-host loopback ssh fleet: bytes on the wire
and memory on the hosts.

Prints, per host:
  * bytes the client sent on that host's SSH socket during the search (Linux
    ``tcp_info.tcpi_bytes_acked``: everything, encryption and framing included) and the
    ratio to size(X) + size(y) (the cache's target: <= 1.1);
  * peak PSS of the host's agent + workers (PSS splits a shared page between the
    processes mapping it, so the memory-mapped cached ``X`` counts once) and the ratio to
    size(X) (target: <= 1.5 with 2 workers per host), with its parts: the processes' own
    baseline before the search, the cached ``X``'s mapped pages (shared by all workers),
    and the rest (scikit-learn's per-fold copies ``X[train]``, ``X[test]`` and the fit);
  * the same search with loky on this machine (2 workers; joblib memory-maps ``X`` for
    them): the peak PSS of loky's workers, and each host's peak as a ratio to it.
Usage::

    python bench/big_data.py [--mb 240] [--features 100] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import psutil
from _fleet import MACHINE, isolated_home, load_note, ssh_fleet
from joblib import parallel_backend
from sklearn.linear_model import Ridge
from sklearn.model_selection import GridSearchCV, KFold, ShuffleSplit

import joblib_cloud  # noqa: F401
from joblib_cloud.client.registry import get_cluster
from joblib_cloud.config import resolve_config

ALPHAS = list(np.logspace(-3, 3, 20))


def tcp_bytes_acked(sock: socket.socket) -> int:
    """Bytes sent on ``sock`` and acknowledged by the peer (``struct tcp_info``)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return struct.unpack_from("Q", info, 120)[0]


def _mapped_pss(pid: int, marker: str) -> int:
    """PSS of this process's mappings of files whose path contains ``marker``."""
    total, inside = 0, False
    try:
        with open(f"/proc/{pid}/smaps") as smaps:
            for line in smaps:
                first = line.split(maxsplit=1)[0]
                if "-" in first and not first.endswith(":"):
                    inside = marker in line
                elif inside and first == "Pss:":
                    total += int(line.split()[1]) * 1024
    except OSError:
        pass
    return total


def host_processes(host: Any) -> list[psutil.Process]:
    """A fleet host's agent and everything below it (its workers)."""
    out = []
    for agent in host.agent_processes():
        try:
            out.extend([agent, *agent.children(recursive=True)])
        except psutil.Error:
            continue
    return out


def fleet_groups(fleet: Any) -> dict[str, Callable[[], list[psutil.Process]]]:
    return {h.address: (lambda h=h: host_processes(h)) for h in fleet.hosts}


def loky_workers() -> list[psutil.Process]:
    """loky's worker processes (and its resource tracker): this process's children."""
    return psutil.Process().children(recursive=True)


class HostMemory(threading.Thread):
    """Samples the PSS of groups of processes (each host's agent and workers, or loky's
    workers) until stopped; keeps each group's peak."""

    def __init__(self, groups: dict[str, Callable[[], list[psutil.Process]]],
                 mapped_marker: str, every: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.groups, self.marker, self.every = groups, mapped_marker, every
        self.peak = dict.fromkeys(groups, 0)
        self.peak_mapped = dict.fromkeys(groups, 0)
        self.peak_procs = dict.fromkeys(groups, 0)
        self._stop_event = threading.Event()

    def sample(self, with_maps: bool) -> None:
        for name, processes in self.groups.items():
            total, mapped, procs = 0, 0, processes()
            for proc in procs:
                try:
                    pss = proc.memory_full_info().pss
                except psutil.Error:
                    continue
                total += pss
                if with_maps:
                    mapped += _mapped_pss(proc.pid, self.marker)
            self.peak[name] = max(self.peak[name], total)
            self.peak_procs[name] = max(self.peak_procs[name], len(procs))
            if with_maps:
                self.peak_mapped[name] = max(self.peak_mapped[name], mapped)

    def run(self) -> None:
        tick = 0
        while not self._stop_event.wait(self.every):
            self.sample(with_maps=tick % 5 == 0)
            tick += 1

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.sample(with_maps=True)


def baseline_pss(groups: dict[str, Callable[[], list[psutil.Process]]]) -> dict[str, int]:
    probe = HostMemory(groups, "")
    probe.sample(with_maps=False)
    return probe.peak


def search(cv: Any) -> GridSearchCV:
    return GridSearchCV(Ridge(fit_intercept=False, copy_X=False), {"alpha": ALPHAS}, cv=cv,
                        n_jobs=-1)


def loky_once(X: np.ndarray, y: np.ndarray, cv: Any, workers: int) -> dict[str, Any]:
    """The same search with loky on this machine: the peak PSS of its workers (joblib
    memory-maps ``X`` for them), the reference for the hosts' figure."""
    with parallel_backend("loky", n_jobs=workers):  # workers import scikit-learn
        GridSearchCV(Ridge(), {"alpha": ALPHAS[:4]}, n_jobs=-1).fit(X[:500], y[:500])
        base = baseline_pss({"loky": loky_workers})["loky"]
        monitor = HostMemory({"loky": loky_workers}, "joblib_memmapping_folder")
        monitor.start()
        start = time.perf_counter()
        search(cv).fit(X, y)
        wall = time.perf_counter() - start
        monitor.stop()
    return {"wall": wall, "peak": monitor.peak["loky"], "base": base,
            "mapped": monitor.peak_mapped["loky"]}


def run_once(fleet: Any, kwargs: dict, X: np.ndarray, y: np.ndarray, cv: Any
             ) -> dict[str, Any]:
    cluster = get_cluster(resolve_config(**kwargs))
    names = {h.connection.spec.address: h for h in cluster.hosts}
    with parallel_backend("cloud", **kwargs):  # workers import scikit-learn: baseline
        GridSearchCV(Ridge(), {"alpha": ALPHAS[:4]}, n_jobs=-1).fit(X[:500], y[:500])
    base = baseline_pss(fleet_groups(fleet))
    sent0 = {a: tcp_bytes_acked(h.connection.transport.sock) for a, h in names.items()}
    uploaded0 = {a: h.uploads.bytes_sent for a, h in names.items()}
    monitor = HostMemory(fleet_groups(fleet), os.sep + "cache" + os.sep)
    monitor.start()
    start = time.perf_counter()
    with parallel_backend("cloud", **kwargs):
        fitted = search(cv).fit(X, y)
    wall = time.perf_counter() - start
    monitor.stop()
    return {
        "wall": wall, "best": fitted.best_params_,
        "sent": {a: tcp_bytes_acked(h.connection.transport.sock) - sent0[a]
                 for a, h in names.items()},
        "uploaded": {a: h.uploads.bytes_sent - uploaded0[a] for a, h in names.items()},
        "peak": monitor.peak, "mapped": monitor.peak_mapped, "base": base,
        "procs": monitor.peak_procs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=240, help="size of X in MB")
    parser.add_argument("--features", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cv", choices=("kfold", "small"), default="kfold",
                        help="kfold: KFold(5); small: 5 shuffled splits of 5%% train/5%% test")
    args = parser.parse_args()
    isolated_home()
    n = args.mb * 10**6 // (8 * args.features)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, args.features))
    y = X @ rng.standard_normal(args.features) + rng.standard_normal(n)
    data = X.nbytes + y.nbytes
    cv = KFold(5) if args.cv == "kfold" else ShuffleSplit(5, train_size=0.05, test_size=0.05,
                                                          random_state=0)
    print(f"big data: GridSearchCV(Ridge, {len(ALPHAS)} candidates x 5 folds, cv={args.cv}) "
          f"on X {X.shape} = {X.nbytes / 1e6:.0f} MB, y {y.nbytes / 1e6:.1f} MB; 2 loopback "
          f"ssh hosts x 2 workers; median of {args.repeat} (each on a fresh fleet); {MACHINE}")
    print(f"before: {load_note()}")
    runs, lokys = [], []
    for i in range(args.repeat):
        loky = loky_once(X, y, cv, workers=2)
        lokys.append(loky)
        print(f"  run {i + 1}: loky on this machine, 2 workers: {loky['wall']:.1f} s; peak PSS "
              f"of its workers {loky['peak'] / 1e6:.0f} MB ({loky['peak'] / X.nbytes:.2f} x "
              f"size(X)): baseline {loky['base'] / 1e6:.0f} MB, memory-mapped X "
              f"{loky['mapped'] / 1e6:.0f} MB", flush=True)
        # A fresh fleet per run: a warm host would already hold X and send nothing.
        with ssh_fleet(2) as fleet:
            kwargs = fleet.kwargs(workers_per_host=2)
            get_cluster(resolve_config(**kwargs))  # connect first: not part of the figures
            run = run_once(fleet, kwargs, X, y, cv)
            runs.append(run)
            print(f"  run {i + 1}: cloud, {run['wall']:.1f} s, best {run['best']}", flush=True)
            for a in sorted(run["sent"]):
                print(f"    host {a}: sent {run['sent'][a] / 1e6:7.1f} MB "
                      f"({run['sent'][a] / data:.3f} x size(X)+size(y); cache uploads "
                      f"{run['uploaded'][a] / 1e6:.1f} MB); peak PSS "
                      f"{run['peak'][a] / 1e6:6.0f} MB ({run['peak'][a] / X.nbytes:.2f} x "
                      f"size(X)) of {run['procs'][a]} processes: baseline "
                      f"{run['base'][a] / 1e6:.0f} MB, mapped cache "
                      f"{run['mapped'][a] / 1e6:.0f} MB", flush=True)
    print(f"after: {load_note()}")
    hosts = sorted(runs[0]["sent"])
    print("\nmedians per host:")
    for a in hosts:
        sent = statistics.median(r["sent"][a] for r in runs)
        peak = statistics.median(r["peak"][a] for r in runs)
        mapped = statistics.median(r["mapped"][a] for r in runs)
        base = statistics.median(r["base"][a] for r in runs)
        print(f"  host {a}: bytes sent / (size(X)+size(y)) = {sent / data:.3f}   "
              f"peak PSS agent+workers / size(X) = {peak / X.nbytes:.2f} = baseline "
              f"{base / X.nbytes:.2f} (Python, scikit-learn) + mapped X "
              f"{mapped / X.nbytes:.2f} (shared) + per-fit copies "
              f"{(peak - base - mapped) / X.nbytes:.2f} (X[train], X[test], fit); "
              f"peak - baseline = {(peak - base) / X.nbytes:.2f} x size(X)")
    loky_peak = statistics.median(r["peak"] for r in lokys)
    loky_base = statistics.median(r["base"] for r in lokys)
    print(f"  loky's 2 workers on one machine: peak PSS / size(X) = "
          f"{loky_peak / X.nbytes:.2f} (baseline {loky_base / X.nbytes:.2f}); "
          f"peak - baseline = {(loky_peak - loky_base) / X.nbytes:.2f} x size(X)")
    for a in hosts:
        peak = statistics.median(r["peak"][a] for r in runs)
        print(f"  host {a}: peak PSS = {peak / loky_peak:.2f} x loky's workers' peak")
    print(f"  wall time: cloud {statistics.median(r['wall'] for r in runs):.1f} s, "
          f"loky {statistics.median(r['wall'] for r in lokys):.1f} s")
    floor = fold_copies_floor(cv, X, y, concurrent=2)
    print(f"  floor for any backend: X's own pages (1.00: the fits read rows all over X) + "
          f"2 fits at once holding X[train] and X[test] ({floor - 1:.2f}) = {floor:.2f} x "
          "size(X), before any process or library is counted")


def fold_copies_floor(cv: Any, X: np.ndarray, y: np.ndarray, concurrent: int) -> float:
    """X itself plus the largest ``concurrent`` per-fit copies, as a multiple of size(X):
    what a host must hold however the backend gets ``X`` to the fits."""
    per_fit = sorted((len(train) + len(test)) / len(X) for train, test in cv.split(X, y))
    return 1.0 + sum(per_fit[-concurrent:])


if __name__ == "__main__":
    main()
