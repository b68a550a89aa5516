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
    and the rest (scikit-learn's per-fold copies ``X[train]``, ``X[test]`` and the fit).
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
from typing import Any

import numpy as np
import psutil
from _fleet import MACHINE, isolated_home, load_note, ssh_fleet
from joblib import parallel_backend
from sklearn.linear_model import Ridge
from sklearn.model_selection import GridSearchCV, KFold, ShuffleSplit

import joblib_cloud  # noqa: F401
from joblib_cloud.config import resolve_config
from joblib_cloud.providers import get_cluster

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


class HostMemory(threading.Thread):
    """Samples the PSS of each host's agent and workers until stopped; keeps the peak."""

    def __init__(self, fleet: Any, cache_marker: str, every: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.fleet, self.marker, self.every = fleet, cache_marker, every
        self.peak = {h.address: 0 for h in fleet.hosts}
        self.peak_mapped = {h.address: 0 for h in fleet.hosts}
        self.peak_procs = {h.address: 0 for h in fleet.hosts}
        self.per_process: dict[int, int] = {}
        self._stop_event = threading.Event()

    def procs(self, host: Any) -> list[psutil.Process]:
        """The agent and everything below it (loky workers, resource tracker)."""
        out = []
        for agent in host.agent_processes():
            try:
                out.extend([agent, *agent.children(recursive=True)])
            except psutil.Error:
                continue
        return out

    def sample(self, with_maps: bool) -> None:
        for host in self.fleet.hosts:
            total, mapped, procs = 0, 0, self.procs(host)
            for proc in procs:
                try:
                    pss = proc.memory_full_info().pss
                except psutil.Error:
                    continue
                total += pss
                self.per_process[proc.pid] = max(self.per_process.get(proc.pid, 0), pss)
                if with_maps:
                    mapped += _mapped_pss(proc.pid, self.marker)
            self.peak[host.address] = max(self.peak[host.address], total)
            self.peak_procs[host.address] = max(self.peak_procs[host.address], len(procs))
            if with_maps:
                self.peak_mapped[host.address] = max(self.peak_mapped[host.address], mapped)

    def run(self) -> None:
        tick = 0
        while not self._stop_event.wait(self.every):
            self.sample(with_maps=tick % 5 == 0)
            tick += 1

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.sample(with_maps=True)


def baseline_pss(fleet: Any) -> dict[str, int]:
    probe = HostMemory(fleet, "/cache/")
    probe.sample(with_maps=False)
    return probe.peak


def run_once(fleet: Any, kwargs: dict, X: np.ndarray, y: np.ndarray, cv: Any
             ) -> dict[str, Any]:
    cluster = get_cluster(resolve_config(**kwargs))
    names = {h.connection.spec.address: h for h in cluster.hosts}
    with parallel_backend("cloud", **kwargs):  # workers import scikit-learn: baseline
        GridSearchCV(Ridge(), {"alpha": ALPHAS[:4]}, n_jobs=-1).fit(X[:500], y[:500])
    base = baseline_pss(fleet)
    sent0 = {a: tcp_bytes_acked(h.connection.transport.sock) for a, h in names.items()}
    uploaded0 = {a: h.bytes_uploaded for a, h in names.items()}
    monitor = HostMemory(fleet, os.sep + "cache" + os.sep)
    monitor.start()
    start = time.perf_counter()
    with parallel_backend("cloud", **kwargs):
        search = GridSearchCV(Ridge(fit_intercept=False, copy_X=False), {"alpha": ALPHAS}, cv=cv,
                              n_jobs=-1).fit(X, y)
    wall = time.perf_counter() - start
    monitor.stop()
    return {
        "wall": wall, "best": search.best_params_,
        "sent": {a: tcp_bytes_acked(h.connection.transport.sock) - sent0[a]
                 for a, h in names.items()},
        "uploaded": {a: h.bytes_uploaded - uploaded0[a] for a, h in names.items()},
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
    runs = []
    for i in range(args.repeat):
        # A fresh fleet per run: a warm host would already hold X and send nothing.
        with ssh_fleet(2) as fleet:
            kwargs = fleet.kwargs(workers_per_host=2)
            get_cluster(resolve_config(**kwargs))  # connect first: not part of the figures
            run = run_once(fleet, kwargs, X, y, cv)
            runs.append(run)
            print(f"  run {i + 1}: {run['wall']:.1f} s, best {run['best']}", flush=True)
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
    print(f"  wall time: {statistics.median(r['wall'] for r in runs):.1f} s")


if __name__ == "__main__":
    main()
