"""The on-VM kill switch, run against a loopback sshd host as if it were the VM."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import wait_until
from joblib import Parallel, delayed, parallel_backend
from sshfleet import SSHFleet

from joblib_cloud.client import registry
from joblib_cloud.config import resolve_config
from joblib_cloud.host import watchdog


@pytest.fixture
def host(tmp_path):
    fleet = SSHFleet(tmp_path / "fleet", n=1).start()
    yield fleet
    fleet.stop()


@pytest.fixture
def start_watchdog(tmp_path):
    procs: list[subprocess.Popen] = []

    def start(home: Path, idle: float, lifetime: float = 3600) -> tuple[Path, Path]:
        marker = tmp_path / f"shutdown-{len(procs)}"
        log = tmp_path / f"watchdog-{len(procs)}.log"
        with open(log, "w") as err:
            procs.append(subprocess.Popen(
                [sys.executable, watchdog.__file__, "--home", str(home),
                 "--idle-timeout", str(idle), "--max-lifetime", str(lifetime),
                 "--shutdown-command", f"touch {marker}", "--poll", "0.1"],
                stdout=subprocess.DEVNULL, stderr=err))
        return marker, log

    yield start
    for proc in procs:  # only the watchdogs this test started, by PID
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def test_idle_host_shuts_itself_down(host, start_watchdog):
    home = host.hosts[0].home
    started = time.monotonic()
    marker, log = start_watchdog(home, idle=1.5)
    wait_until(marker.exists, 20, "the shutdown command")
    assert time.monotonic() - started >= 1.5
    assert "idle for" in log.read_text() and "no client" in log.read_text()


def test_no_shutdown_while_a_client_runs_work(host, start_watchdog, tmp_path):
    sshd = host.hosts[0]
    kwargs = host.kwargs(workers_per_host=1, heartbeat_timeout=3.0)
    outcome: dict = {}

    def work() -> None:
        try:
            with parallel_backend("cloud", **kwargs):
                outcome["result"] = Parallel(n_jobs=-1)(delayed(time.sleep)(6) for _ in range(1))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = exc

    worker = threading.Thread(target=work)
    worker.start()
    try:
        wait_until(lambda: sshd.agent_processes(), 30, "the agent on the host")
        marker, log = start_watchdog(sshd.home, idle=2.0)
        busy_until = time.monotonic() + 4.5  # more than twice idle_timeout, task still running
        while time.monotonic() < busy_until:
            assert not marker.exists(), log.read_text()
            time.sleep(0.1)
        assert watchdog.agent_running(str(sshd.home))
        assert not watchdog.agent_running(str(tmp_path / "someone-else"))
        assert worker.is_alive()  # the task really was still running
    finally:
        worker.join(timeout=60)
    assert outcome.get("result") == [None], outcome
    # The client goes away: now the host is idle and the kill switch fires.
    registry.get_cluster(resolve_config(**kwargs)).close()
    wait_until(marker.exists, 30, "the shutdown command after the client left")
    assert "idle for" in log.read_text()


def test_maximum_lifetime_wins_over_activity(tmp_path, start_watchdog):
    home = tmp_path / "home"
    home.mkdir()
    stop = threading.Event()

    def keep_busy() -> None:
        while not stop.wait(0.1):
            (home / "activity").touch()

    threading.Thread(target=keep_busy, daemon=True).start()
    try:
        started = time.monotonic()
        marker, log = start_watchdog(home, idle=0.5, lifetime=2.0)
        wait_until(marker.exists, 20, "the lifetime shutdown")
        assert time.monotonic() - started >= 2.0
        assert "maximum lifetime" in log.read_text()
    finally:
        stop.set()


def test_reason_to_stop_is_computed_from_the_activity_file(tmp_path):
    home = tmp_path / "h"
    home.mkdir()
    now = time.time()
    assert watchdog.reason_to_stop(str(home), now - 5, 10, 100, now) is None
    assert "idle" in watchdog.reason_to_stop(str(home), now - 50, 10, 100, now)
    (home / "activity").touch()
    os.utime(home / "activity", (now - 3, now - 3))
    assert watchdog.reason_to_stop(str(home), now - 50, 10, 100, now) is None
    assert "lifetime" in watchdog.reason_to_stop(str(home), now - 200, 10, 100, now)


def test_a_booting_machine_is_never_idle_but_has_a_boot_deadline(tmp_path):
    """Idle time counts from the end of the boot: a long install is not cut short by
    idle_timeout, a boot that hangs is stopped by boot_timeout."""
    home, ready = tmp_path / "home", tmp_path / "ready"
    home.mkdir()
    now = time.time()
    booted = now - 300  # booting for 5 minutes, far past idle_timeout, no ready file
    assert watchdog.reason_to_stop(str(home), booted, 10, 3600, now, str(ready), 600) is None
    assert "boot did not finish" in watchdog.reason_to_stop(
        str(home), booted, 10, 3600, now, str(ready), 200)
    ready.touch()
    os.utime(ready, (now - 4, now - 4))  # ready 4 s ago: idle for 4 s, not for 300 s
    assert watchdog.reason_to_stop(str(home), booted, 10, 3600, now, str(ready), 200) is None
    assert "idle for 14s" in watchdog.reason_to_stop(
        str(home), booted, 10, 3600, now + 10, str(ready), 200)
