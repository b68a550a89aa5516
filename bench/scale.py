"""How far one client goes: N loopback sshd hosts, the client's costs measured per N.

For each N (``--hosts 8,32,64,128``) a fresh client process connects to N hosts of one
loopback fleet (``tests/sshfleet.py``: real sshd, real agents) with ``--workers`` worker
processes each, then runs

  * sleep tasks of ``--task`` seconds at ``batch_size=1``, ``--rounds`` per worker:
    efficiency = ideal time (tasks x task / workers) / measured wall time;
  * ``--tiny`` trivial tasks per worker, auto-batched: tasks/s and client CPU per task.

and reports hosts lost (must be 0), connect time, the client's CPU seconds per host
connected and per task, and its threads, file descriptors and memory (RSS) per host.
Each measurement runs in its own process, so one N's threads and memory do not count in
the next.  ``--compare REV`` runs the same in turns with the code of a git revision
(``git archive`` into a temporary directory), so a change is measured against what it
replaces on the same machine, under the same load.  ``--pressure K`` keeps K busy-loop
processes running meanwhile (CPU pressure from a known load; stopped by PID).

    python bench/scale.py --hosts 8,32,64,128 --workers 1 --plot docs/scale.png
    python bench/scale.py --hosts 64 --workers 3 --compare main --pressure 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _fleet import ROOT, isolated_home, load_note, ssh_fleet

#: Run in a fresh interpreter with PYTHONPATH at the code under test: connects, measures,
#: prints one JSON line.
CHILD = r"""
import json, logging, os, resource, sys, threading, time

settings, task, rounds, tiny = json.loads(sys.argv[1])
from joblib import Parallel, delayed, parallel_backend
import joblib_cloud
from joblib_cloud.client import registry
from joblib_cloud.config import resolve_config

lost = []
class Lost(logging.Handler):
    def emit(self, record):
        if " lost: " in record.getMessage():
            lost.append(record.getMessage())
logging.getLogger("joblib_cloud").addHandler(Lost(logging.WARNING))

def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return (int(fields["Threads"]), len(os.listdir("/proc/self/fd")),
            int(fields["VmRSS"].split()[0]) * 1024)

def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime

threads0, fds0, rss0 = status()
start, cpu0 = time.monotonic(), cpu()
config = resolve_config(**settings)
cluster = registry.get_cluster(config)
cluster.wait_until_settled(600)
connect_s, connect_cpu = time.monotonic() - start, cpu() - cpu0
hosts = len(cluster.alive_hosts)
workers = cluster.n_workers
threads1, fds1, rss1 = status()

with parallel_backend("cloud", **settings):
    Parallel(n_jobs=-1, batch_size=1)(delayed(time.sleep)(0) for _ in range(workers))  # warm-up
    n = workers * rounds
    cpu1, t1 = cpu(), time.monotonic()
    out = Parallel(n_jobs=-1, batch_size=1)(delayed(time.sleep)(task) for _ in range(n))
    sleep_s, sleep_cpu = time.monotonic() - t1, cpu() - cpu1
    assert len(out) == n
    m = workers * tiny
    cpu2, t2 = cpu(), time.monotonic()
    out = Parallel(n_jobs=-1)(delayed(abs)(-i) for i in range(m))
    tiny_s, tiny_cpu = time.monotonic() - t2, cpu() - cpu2
    assert out[-1] == m - 1
alive = len(cluster.alive_hosts)
print(json.dumps({
    "hosts": hosts, "workers": workers, "connect_s": connect_s,
    "connect_cpu_per_host": connect_cpu / max(hosts, 1),
    "efficiency": n * task / workers / sleep_s, "sleep_s": sleep_s,
    "cpu_per_task_b1_us": sleep_cpu / n * 1e6,
    "tiny_tasks_per_s": m / tiny_s, "cpu_per_task_tiny_us": tiny_cpu / m * 1e6,
    "threads_per_host": (threads1 - threads0) / max(hosts, 1),
    "fds_per_host": (fds1 - fds0) / max(hosts, 1),
    "rss_mb_per_host": (rss1 - rss0) / max(hosts, 1) / 2**20,
    "lost": len(lost) + (hosts - alive) + len(cluster.failures), "lost_lines": lost[:3],
}), flush=True)
registry.close_all()
"""


def measure(code: Path, settings: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(code)}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps([settings, args.task, args.rounds, args.tiny])],
        env=env, capture_output=True, text=True, timeout=1800, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the run failed ({proc.returncode}): {proc.stderr[-3000:]}")
    if proc.stderr.strip():
        print("    stderr: " + proc.stderr.strip().replace("\n", "\n    ")[-1500:], flush=True)
    return json.loads(lines[-1])


def code_of(rev: str, into: Path) -> Path:
    """The package as of git revision ``rev``, unpacked into ``into``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "joblib_cloud"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def busy_loops(k: int) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(k)]


def raise_fd_limit() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("efficiency", "efficiency, 0.25 s tasks, batch_size=1"),
              ("cpu_per_task_b1_us", "client CPU µs per task, batch_size=1"),
              ("cpu_per_task_tiny_us", "client CPU µs per task, auto-batched tiny"),
              ("connect_cpu_per_host", "client CPU s per host connected"),
              ("connect_s", "connect time (s)"),
              ("threads_per_host", "client threads per host"),
              ("fds_per_host", "client fds per host"),
              ("rss_mb_per_host", "client RSS MB per host")]
    fig, axes = plt.subplots(2, 4, figsize=(17, 7.5))
    for ax, (key, label) in zip(axes.flat, panels, strict=True):
        for code in dict.fromkeys(r["code"] for r in rows):
            mine = sorted((r for r in rows if r["code"] == code), key=lambda r: r["n"])
            ax.plot([r["n"] for r in mine], [r[key] for r in mine], "o-", label=code)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("hosts (N)")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        if key == "efficiency":
            ax.axhline(0.95, color="grey", ls="--", lw=0.8)
            ax.set_ylim(0.5, 1.02)
        else:
            ax.set_ylim(bottom=0)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", default="8,32,64,128")
    parser.add_argument("--workers", type=int, default=1, help="worker processes per host")
    parser.add_argument("--task", type=float, default=0.25)
    parser.add_argument("--rounds", type=int, default=12, help="sleep tasks per worker")
    parser.add_argument("--tiny", type=int, default=2000, help="tiny tasks per worker")
    parser.add_argument("--compare", metavar="REV", help="also run the code of this git rev")
    parser.add_argument("--pressure", type=int, default=0, help="busy-loop processes")
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    isolated_home()
    raise_fd_limit()
    sizes = [int(n) for n in args.hosts.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="joblib-cloud-scale-"))
    codes = {"this tree": ROOT}
    if args.compare:
        codes[args.compare] = code_of(args.compare, tmp)
    rows: list[dict[str, Any]] = []
    before = load_note()
    print(f"# {before}; {args.workers} worker(s) per host, pressure {args.pressure}",
          flush=True)
    hogs = busy_loops(args.pressure)
    try:
        with ssh_fleet(max(sizes)) as fleet:
            for n in sizes:
                for label, code in codes.items():  # in turns: the same load for both
                    settings = fleet.kwargs(fleet.hosts[:n], workers_per_host=args.workers,
                                            cluster=f"scale-{n}-{len(rows)}")
                    row = {"n": n, "code": label, **measure(code, settings, args)}
                    rows.append(row)
                    print(f"  N={n:<4} {label:<10} eff {row['efficiency']:.3f}  lost "
                          f"{row['lost']}  connect {row['connect_s']:.1f}s "
                          f"({row['connect_cpu_per_host'] * 1e3:.0f} ms CPU/host)  CPU/task "
                          f"b1 {row['cpu_per_task_b1_us']:.0f} µs, tiny "
                          f"{row['cpu_per_task_tiny_us']:.1f} µs "
                          f"({row['tiny_tasks_per_s']:,.0f}/s)  per host: "
                          f"{row['threads_per_host']:.2f} threads, "
                          f"{row['fds_per_host']:.2f} fds, {row['rss_mb_per_host']:.2f} MB"
                          + (f"  {row['lost_lines']}" if row["lost"] else ""), flush=True)
                    time.sleep(1)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"# {load_note()}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.plot:
        plot(rows, args.plot, f"joblib-cloud, one client, N loopback sshd hosts x "
                              f"{args.workers} worker(s), {args.task} s tasks; at the start: "
                              f"{before}; at the end: {load_note()}")


if __name__ == "__main__":
    main()
