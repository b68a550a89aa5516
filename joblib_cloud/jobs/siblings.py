"""``run -n N``: the job's own ``parallel_backend('cloud')`` spans the whole cluster.

The job runs on the cluster's first machine; its fleet (:meth:`Fleet.job_cluster`) says
how that machine's backend reaches all N (itself included) and what it needs, as start
options for ``host/jobhost.py``: ``local`` starts N agents on one machine, ``ssh`` logs in
with the client's forwarded ssh-agent (``providers/ssh.py``), ``aws`` with a key of the
job's own certified by the cluster's key (``providers/aws/jobs.py``).  This module holds
what every provider shares: the options, waiting for siblings that still boot, and
keeping their idle timers from running out while the job runs.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any

from .. import provisioner
from ..config import CloudConfig
from ..providers import THIS_MACHINE
from ..wire import contract

if TYPE_CHECKING:
    from ..client.ssh import SSHConnection


@dataclasses.dataclass
class JobCluster:
    """Start options for the job's backend (see ``jobhost.op_start``)."""

    env: dict[str, str]
    files: dict[str, str] = dataclasses.field(default_factory=dict)
    #: The job logs in with the client's forwarded ssh-agent.
    agent: bool = False
    #: The job's machine checks it can log in to each sibling before the job starts.
    probe: bool = False
    hosts: list[str] = dataclasses.field(default_factory=list)
    #: aws: seconds between touches of the siblings' idle timers while the job runs.
    keepalive: float | None = None

    def options(self) -> dict[str, Any]:
        return {"env": self.env, "files": self.files, "agent": self.agent,
                "probe": self.probe, "keepalive": self.keepalive}


def for_job(config: CloudConfig, fleet: provisioner.Fleet, python: str,
            detach: bool) -> JobCluster:
    """How the job's own backend reaches the cluster of ``fleet``."""
    common = {}
    if config.workers_per_host:
        common["JOBLIB_CLOUD_WORKERS_PER_HOST"] = str(config.workers_per_host)
    if len(fleet.hosts) <= 1:
        # One machine: parallel_backend('cloud') uses its own cores, no SSH needed.
        return JobCluster({"JOBLIB_CLOUD_PROVIDER": THIS_MACHINE, **common})
    return fleet.job_cluster(config, python, detach, common)


def paramiko_pin() -> str:
    """The job's backend logs in to the siblings with paramiko, at the client's version."""
    return f"paramiko=={importlib.metadata.version('paramiko')}"


#: Resets a machine's idle timer (its kill switch reads the activity file's mtime).
TOUCH = (f"mkdir -p {contract.HOME_SHELL} && "
         f"touch {contract.HOME_SHELL}/{contract.ACTIVITY_FILE}")


def touch(connection: Any) -> None:
    channel = connection.exec(TOUCH)
    try:
        channel.recv_exit_status()
    finally:
        channel.close()


def wait_for_siblings(fleet: provisioner.Fleet, config: CloudConfig, every: float) -> None:
    """Every machine but the job's own accepts SSH (they may still be booting); each gets
    what :meth:`Fleet.ready` does once it answered (aws: the metadata endpoint that served
    its user-data closes), as the backend's own connect would do, and its idle timer
    starts again, every ``every`` seconds until the last one answered: a machine that
    booted first must not stop while the others boot."""
    reached: list[SSHConnection] = []
    lock = threading.Lock()

    def reach(host: provisioner.HostTarget) -> None:
        connection = fleet.connect(host, config)
        try:
            touch(connection)
        except BaseException:
            connection.close()
            raise
        with lock:
            reached.append(connection)
        fleet.ready(host)

    try:
        with ThreadPoolExecutor(max(len(fleet.hosts) - 1, 1)) as pool:
            pending = {pool.submit(reach, host) for host in fleet.hosts[1:]}
            while pending:
                done, pending = wait(pending, timeout=every)
                for future in done:
                    future.result()
                if pending:
                    with lock:
                        for connection in reached:
                            touch(connection)
    finally:
        for connection in reached:
            connection.close()


def start_waiting(fleet: provisioner.Fleet, config: CloudConfig, every: float
                  ) -> Callable[[Callable[[], None]], None]:
    """:func:`wait_for_siblings` in the background (while the job's own machine is
    reached); the function returned waits for it, calling ``tick`` every ``every`` seconds
    meanwhile (the job's machine must not idle out either), and raises what it raised."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            wait_for_siblings(fleet, config, every)
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=run, daemon=True, name="siblings")
    thread.start()

    def join(tick: Callable[[], None]) -> None:
        due = time.monotonic() + every
        while thread.is_alive():
            thread.join(0.2)
            if time.monotonic() >= due:
                tick()
                due = time.monotonic() + every
        if failure:
            raise failure[0]

    return join


def keepalive(config: CloudConfig) -> float:
    """Seconds between touches of the siblings' activity files while the job runs: their
    kill switches know nothing of a job on another machine."""
    return max(5.0, min(60.0, config.idle_timeout / 3))
