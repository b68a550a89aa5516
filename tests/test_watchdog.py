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

    def start(home: Path, idle: float, lifetime: float = 3600,
              deadline: float | None = None) -> tuple[Path, Path]:
        marker = tmp_path / f"shutdown-{len(procs)}"
        log = tmp_path / f"watchdog-{len(procs)}.log"
        end = ["--max-lifetime", str(lifetime)] if deadline is None else [
            "--deadline", str(deadline)]
        with open(log, "w") as err:
            procs.append(subprocess.Popen(
                [sys.executable, watchdog.__file__, "--home", str(home),
                 "--idle-timeout", str(idle), *end,
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
    assert watchdog.reason_to_stop(str(home), now - 5, 10, now + 95, now) is None
    assert "idle" in watchdog.reason_to_stop(str(home), now - 50, 10, now + 50, now)
    (home / "activity").touch()
    os.utime(home / "activity", (now - 3, now - 3))
    assert watchdog.reason_to_stop(str(home), now - 50, 10, now + 50, now) is None
    assert "lifetime" in watchdog.reason_to_stop(str(home), now - 200, 10, now - 100, now)


def test_the_lifetime_is_an_absolute_deadline(tmp_path, start_watchdog):
    """A reboot restarts the watchdog: with --deadline, its restart does not restart the
    lifetime (with --max-lifetime it would count again from the new start)."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "activity").touch()
    marker, log = start_watchdog(home, idle=3600, deadline=time.time() - 1)
    wait_until(marker.exists, 20, "the deadline shutdown")
    assert "maximum lifetime reached" in log.read_text()


def test_no_client_timeout_applies_once_the_last_client_left(tmp_path):
    home = tmp_path / "h"
    home.mkdir()
    now = time.time()
    (home / "activity").touch()
    os.utime(home / "activity", (now - 50, now - 50))
    deadline = now + 3600
    # Never a client yet (joblib-cloud up, say): only idle_timeout applies.
    assert watchdog.reason_to_stop(str(home), now - 100, 600, deadline, now,
                                   no_client_timeout=30) is None
    (home / "attached").touch()
    os.utime(home / "attached", (now - 40, now - 40))  # the client left 40 s ago
    assert "no client for 40s" in watchdog.reason_to_stop(
        str(home), now - 100, 600, deadline, now, no_client_timeout=30)
    os.utime(home / "attached", (now - 20, now - 20))  # it left 20 s ago: not yet
    assert watchdog.reason_to_stop(str(home), now - 100, 600, deadline, now,
                                   no_client_timeout=30) is None


def test_an_attached_but_idle_client_does_not_keep_the_host_up(host, start_watchdog):
    """A notebook that ran one call and stays open: the host stops idle_timeout after the
    last work although the client's agent is still connected."""
    sshd = host.hosts[0]
    # The agent's own idle exit is far away: only the kill switch can stop this host.
    kwargs = host.kwargs(workers_per_host=1, heartbeat_timeout=1.0, idle_timeout=600)
    with parallel_backend("cloud", **kwargs):
        assert Parallel(n_jobs=-1)(delayed(abs)(-i) for i in range(4)) == [0, 1, 2, 3]
    worked = time.monotonic()
    marker, log = start_watchdog(sshd.home, idle=3.0)
    wait_until(marker.exists, 30, "the shutdown command with an idle client attached")
    assert time.monotonic() - worked >= 3.0
    assert watchdog.agent_running(str(sshd.home))  # the client really is still attached
    assert "a client attached" in log.read_text()
    registry.get_cluster(resolve_config(**kwargs)).close()


def test_a_booting_machine_is_never_idle_but_has_a_boot_deadline(tmp_path):
    """Idle time counts from the end of the boot: a long install is not cut short by
    idle_timeout, a boot that hangs is stopped by boot_timeout."""
    home, ready = tmp_path / "home", tmp_path / "ready"
    home.mkdir()
    now = time.time()
    booted = now - 300  # booting for 5 minutes, far past idle_timeout, no ready file
    end = now + 3600
    assert watchdog.reason_to_stop(str(home), booted, 10, end, now, str(ready), 600) is None
    assert "boot did not finish" in watchdog.reason_to_stop(
        str(home), booted, 10, end, now, str(ready), 200)
    ready.touch()
    os.utime(ready, (now - 4, now - 4))  # ready 4 s ago: idle for 4 s, not for 300 s
    assert watchdog.reason_to_stop(str(home), booted, 10, end, now, str(ready), 200) is None
    assert "idle for 14s" in watchdog.reason_to_stop(
        str(home), booted, 10, end, now + 10, str(ready), 200)


def test_an_idle_agent_exits_and_the_next_call_connects_again(host, caplog):
    """No work for idle_timeout: the agent says so and exits (on ssh and local hosts too,
    where no kill switch runs); the client that stayed open notices, and its next call
    connects again with one line saying so."""
    sshd = host.hosts[0]
    kwargs = host.kwargs(workers_per_host=1, heartbeat_timeout=1.0, idle_timeout=2.0,
                         cluster="idle-exit")
    with parallel_backend("cloud", **kwargs):
        assert Parallel(n_jobs=-1)(delayed(abs)(-i) for i in range(4)) == [0, 1, 2, 3]
        first = registry.get_cluster(resolve_config(**kwargs))
        worked = time.monotonic()
        wait_until(lambda: not sshd.agent_processes(), 30, "the idle agent's exit")
        assert time.monotonic() - worked >= 2.0 - 0.5
        assert "without work" in first.stopped_idle
        with caplog.at_level("WARNING", logger="joblib_cloud"):
            assert Parallel(n_jobs=-1)(delayed(abs)(-i) for i in range(3)) == [0, 1, 2]
    again = [r.getMessage() for r in caplog.records if "connecting again" in r.getMessage()]
    assert len(again) == 1 and "idle-exit" in again[0], again
    assert not [r for r in caplog.records if "lost" in r.getMessage()]
    registry.get_cluster(resolve_config(**kwargs)).close()


def test_a_job_s_output_upload_counts_as_work(tmp_path, monkeypatch):
    """A detached job's outputs go to S3 after its command ended: the machine's kill
    switch must see work until they are saved, not only while the command ran."""
    from joblib_cloud.host import jobhost

    home = tmp_path / "home"
    (home / "jobs" / "abc").mkdir(parents=True)
    monkeypatch.setenv("JOBLIB_CLOUD_HOME", str(home))
    monkeypatch.setattr(jobhost, "ACTIVITY_INTERVAL", 0.05)
    activity = home / "activity"
    seen: list[float] = []

    class SlowUpload:  # stands in for jobstore's S3 upload: it takes a while
        @staticmethod
        def on_end(directory: str, spec: dict) -> list[str]:
            end = time.monotonic() + 1.0
            while time.monotonic() < end:
                seen.append(activity.stat().st_mtime if activity.exists() else 0.0)
                time.sleep(0.05)
            return ["saved"]

    monkeypatch.setitem(sys.modules, "jobstore", SlowUpload)
    assert jobhost.finish(str(home / "jobs" / "abc"), {}) == ["saved"]
    # Touched all along the upload, up to its end: not only once at its start.
    assert len(set(seen)) >= 5, seen
    assert time.time() - seen[-1] < 0.5, seen
