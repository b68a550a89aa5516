"""Deadlines count what the other side could have seen, and "lost" means lost.

Under CPU pressure a host's processes (sshd, the agent) and the client do not all run
when they should: silence measured across one's own stall, or judged before the other
side's bytes could arrive, drops healthy hosts (issue 23: a host lost while 64 connected
at once).  These tests stall real processes with SIGSTOP on the loopback sshd fleet.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import psutil
import pytest
from joblib import Parallel, delayed, parallel_backend

from joblib_cloud.client import registry
from joblib_cloud.client.hearing import START_SILENCE_MIN
from joblib_cloud.config import resolve_config
from joblib_cloud.errors import HostConnectError


def _printing(seconds: float) -> int:
    """Prints steadily (the client keeps hearing the host) and returns its pid."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        print("tick", flush=True)
        time.sleep(0.05)
    return os.getpid()


def _wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


def _signal(procs: list[psutil.Process], sig: int) -> None:
    for proc in procs:
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def test_a_host_stalled_whole_is_not_dropped_when_its_agent_wakes_before_sshd(
        fresh_fleet, caplog, capsys):
    """The whole host stops (sshd and the agent: CPU starved, say) for less than
    heartbeat_timeout; the agent gets the CPU back a moment before sshd, which still holds
    the client's pings.  The client heard the host until the stall began and hears it
    again right after, so neither side may call the other gone.  An agent that counted
    its own stall as the client's silence quit at once ("connection closed")."""
    caplog.set_level(logging.WARNING, logger="joblib_cloud")
    timeout, stall, sshd_later = 10.0, 8.8, 0.3
    host = fresh_fleet.hosts[0]
    kwargs = fresh_fleet.kwargs([host], workers_per_host=2, heartbeat_timeout=timeout,
                                cluster="whole-host-stall")
    cluster = registry.get_cluster(resolve_config(**kwargs))
    session = cluster.alive_hosts[0]
    [agent] = host.agent_processes()
    result: list[object] = []

    def call() -> None:
        with parallel_backend("cloud", **kwargs):
            result.extend(Parallel(n_jobs=-1)(delayed(_printing)(stall + 4) for _ in range(2)))

    caller = threading.Thread(target=call)
    caller.start()
    try:
        assert _wait_for(lambda: len(session.inflight) == 2, 10)
        time.sleep(0.5)
        # Stop right before the client's next ping: the agent last heard the client
        # almost one ping interval ago, the client heard the agent a moment ago.
        assert _wait_for(lambda: time.monotonic() - session.out.last_send
                         >= session.ping_every - 0.1, 2 * session.ping_every)
        agent_side = [agent, *agent.children(recursive=True)]
        sshd_side = [p for p in host.processes() if p.pid not in {a.pid for a in agent_side}]
        _signal(sshd_side, signal.SIGSTOP)
        _signal(agent_side, signal.SIGSTOP)
        time.sleep(stall)
        _signal(agent_side, signal.SIGCONT)
        time.sleep(sshd_later)
    finally:
        _signal(host.processes(), signal.SIGCONT)
        caller.join(60)
    capsys.readouterr()
    assert not caller.is_alive()
    assert len(result) == 2 and set(result) <= {p.pid for p in agent.children(recursive=True)}
    assert session.alive and agent.is_running(), session.lost_reason
    assert not [r.getMessage() for r in caplog.records if "lost" in r.getMessage()]


def test_a_connection_closed_while_idle_is_said_when_work_comes_not_when_it_closes(
        fresh_fleet, caplog):
    """A program that ends behind a tunnel or proxy sees its connections close before
    the cluster is closed: no host was lost for that program, so nothing is said then.
    If work does come later, the host that is gone is named once."""
    caplog.set_level(logging.WARNING, logger="joblib_cloud")
    hosts = fresh_fleet.hosts[:2]
    kwargs = fresh_fleet.kwargs(hosts, workers_per_host=1, cluster="closed-while-idle")
    with parallel_backend("cloud", **kwargs):
        assert Parallel(n_jobs=-1)(delayed(abs)(-i) for i in range(20)) == list(range(20))
    cluster = registry.get_cluster(resolve_config(**kwargs))
    assert cluster.wait_until_settled(30) and len(cluster.alive_hosts) == 2
    gone = next(s for s in cluster.alive_hosts if s.name == hosts[1].spec)
    hosts[1].kill()  # its connection closes, as a proxy's does when the program ends
    assert _wait_for(lambda: not gone.alive, 10)
    assert not [r.getMessage() for r in caplog.records if "lost" in r.getMessage()]
    with parallel_backend("cloud", **kwargs):
        assert Parallel(n_jobs=-1)(delayed(abs)(-i) for i in range(20)) == list(range(20))
    said = [r.getMessage() for r in caplog.records if "lost" in r.getMessage()]
    assert len(said) == 1 and "lost while idle" in said[0] and gone.name in said[0], said


def _python_that_hangs_where_marked(fresh_fleet, tmp_path) -> str:
    """A ``python=`` that never says hello on hosts whose home holds ``hang`` (as an
    interpreter stuck importing from a dead network mount does), and is the fleet's own
    Python elsewhere.  The one that hangs starts a child, and writes both pids next to the
    mark."""
    wrapper = tmp_path / "python-or-hang"
    wrapper.write_text(
        "#!/bin/sh\n"
        'if [ -e "$JOBLIB_CLOUD_HOME/hang" ]; then\n'
        '  sleep 600 & echo $$ $! > "$JOBLIB_CLOUD_HOME/hung.pids"; exec sleep 600\n'
        "fi\n"
        f'exec {fresh_fleet.kwargs()["python"]} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def _hung_pids(host) -> list[int]:
    """The hung start's process and the child it started."""
    pid_file = host.home / "hung.pids"
    return [int(p) for p in pid_file.read_text().split()] if pid_file.exists() else []


def _kill_hung(host) -> None:
    for pid in _hung_pids(host):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _gone(pids: list[int]) -> bool:
    def dead(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True
    return all(dead(pid) for pid in pids)


def test_an_agent_silent_while_it_starts_is_given_up_and_the_others_work(
        fresh_fleet, tmp_path):
    """A host whose agent never says hello fails after 4 x heartbeat_timeout of silence
    (at least 20 s) with a message that says what to check; the call runs on the other
    host meanwhile, and the cluster is not kept waiting for it."""
    hung, good = fresh_fleet.hosts[:2]
    (hung.home / "hang").touch()
    kwargs = fresh_fleet.kwargs([hung, good], workers_per_host=2, heartbeat_timeout=2.0,
                                python=_python_that_hangs_where_marked(fresh_fleet, tmp_path),
                                cluster="silent-start")
    try:
        start = time.monotonic()
        with parallel_backend("cloud", **kwargs):
            assert Parallel(n_jobs=-1)(delayed(abs)(-i) for i in range(10)) == list(range(10))
        cluster = registry.get_cluster(resolve_config(**kwargs))
        assert cluster.wait_until_settled(60), "the silent host kept the cluster waiting"
        elapsed = time.monotonic() - start
        assert [s.name for s in cluster.alive_hosts] == [good.spec]
        error = cluster.failures[hung.spec]
        assert isinstance(error, HostConnectError)
        assert "said nothing for" in str(error) and "python-or-hang" in str(error)
        assert START_SILENCE_MIN <= elapsed < START_SILENCE_MIN + 10, elapsed
        pids = _hung_pids(hung)
        assert len(pids) == 2 and _wait_for(lambda: _gone(pids), 10), "the hung start lives on"
    finally:
        _kill_hung(hung)


def test_a_lone_silent_agent_fails_the_call_instead_of_hanging_it(fresh_fleet, tmp_path):
    host = fresh_fleet.hosts[0]
    (host.home / "hang").touch()
    kwargs = fresh_fleet.kwargs([host], heartbeat_timeout=1.5, cluster="lone-silent",
                                python=_python_that_hangs_where_marked(fresh_fleet, tmp_path))
    try:
        start = time.monotonic()
        with pytest.raises(HostConnectError, match="said nothing for"), \
                parallel_backend("cloud", **kwargs):
            Parallel(n_jobs=-1)(delayed(abs)(-i) for i in range(4))
        assert START_SILENCE_MIN <= time.monotonic() - start < START_SILENCE_MIN + 10
        pids = _hung_pids(host)
        assert len(pids) == 2 and _wait_for(lambda: _gone(pids), 10), "the hung start lives on"
    finally:
        _kill_hung(host)
