"""Faults that cloud machines really have, on the real loopback sshd fleet.

A host dies by killing its sshd and everything below it; a network stalls by SIGSTOP; a
worker dies by os._exit / segfault / SIGKILL inside a task.  Every case must end in the
same results as a sequential run, or in a clear error within a bounded time: never a hang.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from joblib import Parallel, delayed, parallel_backend
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV

from joblib_cloud.client import registry
from joblib_cloud.config import resolve_config
from joblib_cloud.errors import ClusterLostError, HostConnectError, TerminatedWorkerError


def wait_for(predicate, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


class SlowLogged(LogisticRegression):
    """Logs each fit's start (and the host it runs on) to a file shared by the fleet."""

    def __init__(self, C=1.0, log_path="", delay=0.0):
        super().__init__(C=C, max_iter=300)
        self.log_path = log_path
        self.delay = delay

    def fit(self, X, y):
        if self.log_path:
            with open(self.log_path, "a") as fh:
                fh.write(json.dumps({"host": os.environ.get("JOBLIB_CLOUD_HOME", "local"),
                                     "C": self.C, "n": len(X),
                                     "key": float(np.round(X[:, 0].sum(), 6))}) + "\n")
        time.sleep(self.delay)
        return super().fit(X, y)


def _log_entries(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _grid(log_path: str, delay: float) -> GridSearchCV:
    return GridSearchCV(SlowLogged(log_path=log_path, delay=delay),
                        {"C": [0.01, 0.1, 1.0, 10.0]}, cv=3, n_jobs=-1)


@pytest.fixture(scope="module")
def data():
    return make_classification(n_samples=150, n_features=6, random_state=0)


def test_host_dies_mid_grid_search_results_unchanged(fresh_fleet, data, tmp_path):
    X, y = data
    expected = _grid("", 0).fit(X, y)
    log = tmp_path / "fits.log"
    victim = fresh_fleet.hosts[0]

    def kill_when_busy():
        wait_for(lambda: any(e["host"] == str(victim.home) for e in _log_entries(log)), 60)
        victim.kill()

    killer = threading.Thread(target=kill_when_busy)
    killer.start()
    with parallel_backend("cloud", **fresh_fleet.kwargs(workers_per_host=2,
                                                        heartbeat_timeout=5)):
        actual = _grid(str(log), delay=1.0).fit(X, y)
    killer.join()
    np.testing.assert_allclose(actual.cv_results_["mean_test_score"],
                               expected.cv_results_["mean_test_score"])
    assert actual.best_params_ == expected.best_params_
    entries = _log_entries(log)
    rerun = {(e["C"], e["key"]) for e in entries if e["host"] == str(victim.home)}
    assert rerun, "the killed host never started a fit"
    # Fits in flight on the dead host started again on another host.
    again = [e for e in entries if (e["C"], e["key"]) in rerun and e["host"] != str(victim.home)]
    assert again


def _sleepy(i, seconds):
    time.sleep(seconds)
    return i * 2


def test_stalled_host_detected_by_heartbeat(fresh_fleet):
    timeout = 3.0
    stalled = fresh_fleet.hosts[1]
    kwargs = fresh_fleet.kwargs(workers_per_host=1, heartbeat_timeout=timeout)
    with parallel_backend("cloud", **kwargs):
        Parallel()(delayed(abs)(i) for i in range(3))  # connect first
        timer = threading.Timer(0.5, stalled.signal_all, args=(signal.SIGSTOP,))
        timer.start()
        start = time.monotonic()
        out = Parallel(n_jobs=-1, batch_size=1)(delayed(_sleepy)(i, 0.5) for i in range(12))
        elapsed = time.monotonic() - start
    timer.join()
    assert out == [i * 2 for i in range(12)]
    # 12 half-second tasks on 2-3 workers + detection; far below a hang.
    assert elapsed < 6 * 0.5 + timeout + 10, elapsed
    stalled.signal_all(signal.SIGCONT)


def test_every_host_dies_clear_error_within_bound(fresh_fleet):
    timeout = 3.0
    kwargs = fresh_fleet.kwargs(workers_per_host=1, heartbeat_timeout=timeout)

    def kill_all():
        for host in fresh_fleet.hosts:
            host.signal_all(signal.SIGSTOP)  # silent, not closed: the hardest case

    with parallel_backend("cloud", **kwargs):
        Parallel()(delayed(abs)(i) for i in range(3))
        timer = threading.Timer(0.5, kill_all)
        timer.start()
        start = time.monotonic()
        with pytest.raises(ClusterLostError) as info:
            Parallel(n_jobs=-1)(delayed(_sleepy)(i, 2) for i in range(6))
        elapsed = time.monotonic() - start
    timer.join()
    assert elapsed < timeout * 2 + 5, elapsed
    for host in fresh_fleet.hosts:
        assert host.address in str(info.value)
    assert "heartbeat" in str(info.value)


def _kill_the_agent() -> None:
    os.kill(os.getppid(), signal.SIGKILL)  # a worker's parent is its host's agent


def test_a_lost_hosts_reason_is_what_it_said_last_though_its_stderr_comes_late(
        fleet, tmp_path, monkeypatch):
    """The agent's process ends, and what it said last reaches the client after the end of
    its stdout (two streams, read by two threads; the stderr one runs late here, as under
    CPU pressure): the host is still reported lost with those words, not a bare
    "connection closed"."""
    from joblib_cloud.client import streams

    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\n{sys.executable} "$@"\n'
                      'echo "the agent ended with status $?" >&2\n')
    python.chmod(0o755)
    pump = streams.pump_stderr

    def late_pump(read, sink, ended) -> None:
        def late(data: bytes) -> None:
            time.sleep(0.5)
            sink(data)
        pump(read, late, ended)

    monkeypatch.setattr(streams, "pump_stderr", late_pump)
    kwargs = fleet.kwargs(hosts=fleet.hosts[:1], python=str(python), workers_per_host=1)
    try:
        with parallel_backend("cloud", **kwargs), pytest.raises(ClusterLostError) as info:
            Parallel()(delayed(_kill_the_agent)() for _ in range(1))
    finally:
        registry.close_all()
    assert "the agent ended with status 137" in str(info.value), info.value


def _crash(how: str, i: int):
    if i == 2:
        if how == "exit":
            os._exit(3)
        elif how == "segfault":
            import ctypes

            ctypes.string_at(0)
        elif how == "oom-kill":  # what the kernel's OOM killer does
            os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.2)
    return i


@pytest.mark.parametrize(("how", "cause"), [("exit", "exited with code 3"),
                                            ("segfault", "killed by SIGSEGV"),
                                            ("oom-kill", "killed by SIGKILL")])
def test_worker_crash_is_reported_and_replaced(fleet, how, cause):
    kwargs = fleet.kwargs(workers_per_host=2, cluster=f"crash-{how}")
    with parallel_backend("cloud", **kwargs):
        with pytest.raises(TerminatedWorkerError) as info:
            Parallel(n_jobs=-1, batch_size=1)(delayed(_crash)(how, i) for i in range(6))
        message = str(info.value)
        assert "_crash" in message and "127.0.0." in message and cause in message
        # The same cluster works again: the agent started fresh workers.
        assert Parallel(n_jobs=-1)(delayed(_crash)(how, i) for i in (0, 1, 3)) == [0, 1, 3]


def _client_script(kwargs: dict, pid_dir: Path, mode: str) -> str:
    return textwrap.dedent(f"""
        import json, os, sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import joblib_cloud
        from joblib import Parallel, delayed, parallel_backend

        def long_task(i):
            with open(os.path.join({str(pid_dir)!r}, str(os.getpid())), "w"):
                pass
            time.sleep(120)
            return i

        with parallel_backend("cloud", **json.loads({json.dumps(kwargs)!r})):
            Parallel()(delayed(abs)(i) for i in range(2))
            print("READY", flush=True)
            try:
                Parallel(n_jobs=-1)(delayed(long_task)(i) for i in range(4))
            except KeyboardInterrupt:
                print("INTERRUPTED", time.monotonic(), flush=True)
            if {mode!r} == "interrupt":
                print("AGAIN", Parallel(n_jobs=-1)(delayed(abs)(-i) for i in range(5)),
                      flush=True)
    """)


def _start_client(fleet, tmp_path: Path, mode: str) -> tuple[subprocess.Popen, Path]:
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    script = tmp_path / "client.py"
    script.write_text(_client_script(fleet.kwargs(workers_per_host=2), pid_dir, mode))
    env = {k: v for k, v in os.environ.items()}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    assert proc.stdout.readline().strip() == "READY", proc.stderr.read()
    assert wait_for(lambda: len(list(pid_dir.iterdir())) >= 4, 30), "tasks did not start"
    return proc, pid_dir


def _task_pids(pid_dir: Path) -> list[int]:
    return [int(p.name) for p in pid_dir.iterdir()]


def _gone(pids: list[int]) -> bool:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return not alive


def test_ctrl_c_stops_remote_work_and_cluster_stays_usable(fresh_fleet, tmp_path):
    proc, pid_dir = _start_client(fresh_fleet, tmp_path, "interrupt")
    try:
        pids = _task_pids(pid_dir)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        line = proc.stdout.readline()
        returned = time.monotonic()
        assert line.startswith("INTERRUPTED"), line + proc.stderr.read()
        assert returned - sent < 2.0, returned - sent
        assert wait_for(lambda: _gone(pids), 5), "remote task processes survived Ctrl-C"
        again = proc.stdout.readline()
        assert again.strip() == "AGAIN [0, 1, 2, 3, 4]", again + proc.stderr.read()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_client_killed_agents_stop_their_workers(fresh_fleet, tmp_path):
    proc, pid_dir = _start_client(fresh_fleet, tmp_path, "kill")
    try:
        task_pids = _task_pids(pid_dir)
        agent_pids = [p.pid for h in fresh_fleet.hosts for p in h.agent_processes()]
        assert len(agent_pids) == len(fresh_fleet.hosts)
        proc.kill()
        proc.wait()
        # No orphans: the agent and every process it started are gone, even those that
        # would have been re-parented away from sshd.
        assert wait_for(lambda: _gone(task_pids + agent_pids), 30), "orphans left on hosts"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _slow_home(i):
    time.sleep(0.2)
    return os.environ["JOBLIB_CLOUD_HOME"]  # each fleet host has its own (sshd SetEnv)


def test_work_starts_on_the_first_hosts_and_a_late_host_joins_mid_call(fresh_fleet):
    """A host whose sshd starts late is retried with back-off; the call does not wait
    for it, and it takes work as soon as it joins.  joblib is told the fleet's full
    capacity from the start, so enough batches are queued for it."""
    late = fresh_fleet.hosts[2]
    late.kill()
    kwargs = fresh_fleet.kwargs(workers_per_host=2, connect_timeout=60, cluster="late")
    homes: list[str] = []
    try:
        with parallel_backend("cloud", **kwargs):
            backend = registry.get_cluster(resolve_config(**kwargs))
            assert backend.target_workers == 6  # 2 hosts here, 1 on its way, 2 workers each
            for i, home in enumerate(Parallel(n_jobs=-1, batch_size=1,
                                              return_as="generator")(
                    delayed(_slow_home)(i) for i in range(60))):
                homes.append(home)
                if i == 3:  # the call is under way without the late host: start it now
                    assert str(late.home) not in homes
                    late.start(wait=False)
        assert str(late.home) in homes, "the host that joined mid-call took no work"
        assert len(homes) == 60
    finally:
        registry.get_cluster(resolve_config(**kwargs)).close()


def test_host_never_up_is_dropped_and_the_call_runs_on_the_others(fresh_fleet, caplog):
    dead = fresh_fleet.hosts[1]
    dead.kill()
    kwargs = fresh_fleet.kwargs(connect_timeout=2, workers_per_host=1, cluster="one-dead")
    try:
        with parallel_backend("cloud", **kwargs):
            assert Parallel(n_jobs=-1)(delayed(abs)(-i) for i in range(6)) == list(range(6))
        cluster = registry.get_cluster(resolve_config(**kwargs))
        deadline = time.monotonic() + 15
        while dead.spec not in cluster.failures and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "unreachable after" in str(cluster.failures[dead.spec])
        assert len(cluster.alive_hosts) == 2
        assert any(dead.spec in r.getMessage() and "did not come up" in r.getMessage()
                   for r in caplog.records)
    finally:
        registry.get_cluster(resolve_config(**kwargs)).close()


def test_no_host_up_is_a_clear_error_naming_every_host(fresh_fleet):
    for host in fresh_fleet.hosts:
        host.kill()
    start = time.monotonic()
    with pytest.raises(HostConnectError) as info:
        with parallel_backend("cloud", **fresh_fleet.kwargs(connect_timeout=2,
                                                            cluster="none-up")):
            Parallel(n_jobs=-1)(delayed(abs)(i) for i in range(3))
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert "3 hosts failed to connect" in message
    assert all(h.spec in message for h in fresh_fleet.hosts)
    assert message.count("unreachable after") == 3
    assert 1.5 < elapsed < 15


def test_agent_killed_its_busy_workers_exit_and_cluster_carries_on(fresh_fleet, tmp_path):
    """An agent SIGKILLed (no chance to clean up) takes its workers with it, even those in
    the middle of a long task, and the client carries on with the other hosts."""
    marks = tmp_path / "marks"
    marks.mkdir()
    outcome: list = []

    def long_call():
        try:
            with parallel_backend("cloud", **kwargs):
                Parallel(n_jobs=2)(
                    delayed(_mark_and_sleep)(str(marks), i, 60.0) for i in range(2))
        except ClusterLostError as exc:  # that call lost its only host
            outcome.append(exc)

    victim = fresh_fleet.hosts[0]
    kwargs = fresh_fleet.kwargs([victim], workers_per_host=2, cluster="agent-kill")
    thread = threading.Thread(target=long_call, daemon=True)
    thread.start()
    assert wait_for(lambda: len(list(marks.iterdir())) == 2, 30), "tasks did not start"
    workers = [int(f.read_text()) for f in marks.iterdir()]
    victim.agent_processes()[0].kill()
    assert wait_for(lambda: _gone(workers), 10), "busy workers outlived their agent"
    thread.join(30)
    assert not thread.is_alive() and len(outcome) == 1, outcome
    with parallel_backend("cloud", **fresh_fleet.kwargs(workers_per_host=2)):
        assert Parallel(n_jobs=-1)(delayed(abs)(-i) for i in range(20)) == list(range(20))


def _mark_and_sleep(folder: str, i: int, seconds: float) -> int:
    with open(os.path.join(folder, str(i)), "a") as fh:
        fh.write(f"{os.getpid()}\n")
    time.sleep(seconds)
    return i


def test_timeout_of_one_caller_leaves_another_callers_tasks_alone(tmp_path):
    """Two threads share one host: one caller's timeout kills its own tasks only; the
    other's run once, undisturbed (not killed and re-run)."""
    kwargs = {"provider": "local", "n": 1, "workers_per_host": 4, "cluster": "two-callers"}
    marks = tmp_path / "marks"
    marks.mkdir()
    results: list = []

    def other_caller():
        with parallel_backend("cloud", **kwargs):
            results.extend(Parallel(n_jobs=2)(
                delayed(_mark_and_sleep)(str(marks), i, 3.0) for i in range(2)))

    with parallel_backend("cloud", **kwargs):
        Parallel(n_jobs=2)(delayed(abs)(i) for i in range(2))  # connect once, up front
        thread = threading.Thread(target=other_caller)
        thread.start()
        try:
            assert wait_for(lambda: len(list(marks.iterdir())) == 2, 20)
            with pytest.raises(Exception) as info:
                Parallel(n_jobs=2, timeout=0.5)(delayed(time.sleep)(30) for _ in range(2))
            assert "Timeout" in type(info.value).__name__
        finally:
            thread.join(60)
    assert results == [0, 1]
    starts = {p.name: p.read_text().split() for p in marks.iterdir()}
    assert all(len(pids) == 1 for pids in starts.values()), starts


def test_slow_task_generator_is_not_taken_for_a_dead_host(fleet):
    """joblib pulls the next task from the user's generator inside a result callback; a
    generator slower than heartbeat_timeout must not make the client drop a healthy host."""
    def tasks():
        for i in range(8):
            if i == 5:
                time.sleep(3)  # the user's own slow step (loading data, say): > 1.5 s
            yield delayed(abs)(-i)

    kwargs = fleet.kwargs(fleet.hosts[:1], workers_per_host=1, heartbeat_timeout=1.5,
                          cluster="slow-generator")  # one host: losing it loses the call
    with parallel_backend("cloud", **kwargs):
        assert Parallel(n_jobs=2, batch_size=1, pre_dispatch=2)(tasks()) == list(range(8))


def _megabyte(i: int) -> bytes:
    return bytes([i]) * 2**20


def test_agent_blocked_on_a_busy_client_does_not_take_it_for_gone(fleet, monkeypatch):
    """While the client sits in a slow callback, results back up and the agent's writes
    block, so it cannot read the client's pings either: that time is not the client's
    silence, or the agent would quit under a healthy client."""
    from joblib_cloud.client import ssh

    monkeypatch.setattr(ssh, "WINDOW_SIZE", 256 * 1024)

    def tasks():
        for i in range(8):
            if i == 5:
                time.sleep(3)  # > heartbeat_timeout, with 1 MB results waiting
            yield delayed(_megabyte)(i)

    kwargs = fleet.kwargs(fleet.hosts[:1], workers_per_host=2, heartbeat_timeout=1.5,
                          cluster="blocked-agent")  # one host: losing it loses the call
    with parallel_backend("cloud", **kwargs):
        assert Parallel(n_jobs=2, batch_size=1, pre_dispatch=4)(tasks()) == [
            _megabyte(i) for i in range(8)]
