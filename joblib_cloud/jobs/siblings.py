"""``run -n N``: the job's own ``parallel_backend('cloud')`` spans the whole cluster.

The job runs on the cluster's first machine; these functions decide how that machine's
backend reaches all N (itself included) and give it what it needs, as start options for
``host/jobhost.py``:

- ``local``: N local agents (``JOBLIB_CLOUD_N``).
- ``ssh``: the hosts as the user listed them, verified with the client's known-hosts
  entries for them, logged in with the client's ssh-agent forwarded over the job's own
  connection (the key never leaves this computer).  No agent, or hosts that cannot reach
  each other, fail before the job starts, saying what is missing.
- ``aws``: the machines where :func:`provisioner.sibling_address` says (private
  addresses by default), their injected host keys, and a key of the job's own (never the
  user's, nor the cluster's long-lived one) with a certificate the cluster's key signed
  for the machines' user, valid for a machine's lifetime at most (their sshd trusts the
  cluster's key as a user CA), written into the job's ``cloud/`` directory and removed
  when the job ends; the cluster's security group lets its machines reach each other on
  port 22 only.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import shlex
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import paramiko

from .. import provisioner
from ..config import CloudConfig
from ..wire import contract


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
        return JobCluster({"JOBLIB_CLOUD_PROVIDER": "local", **common})
    if fleet.hosts[0].spec is None:
        return JobCluster({"JOBLIB_CLOUD_PROVIDER": "local",
                           "JOBLIB_CLOUD_N": str(len(fleet.hosts)), **common},
                          hosts=[h.name for h in fleet.hosts])
    if config.provider == "aws":
        return _aws(config, fleet, common)
    return _ssh(config, fleet, python, common, detach)


def _ssh_env(hosts: list[str], python: str, config: CloudConfig,
             common: dict[str, str]) -> dict[str, str]:
    # The agents, their workers and so the tasks on every machine see that machine's copy
    # of the shared directory (jobs/probe.py keeps the copies in step with the job's).
    shared = f"{contract.HOME_SHELL}/shared/{shlex.quote(config.cluster)}"
    env = {"JOBLIB_CLOUD_PROVIDER": "ssh", "JOBLIB_CLOUD_HOSTS": ",".join(hosts),
           "JOBLIB_CLOUD_KNOWN_HOSTS": "{cloud}/known_hosts",
           "JOBLIB_CLOUD_PYTHON": f"env JOBLIB_CLOUD_SHARED={shared} {config.python or python}",
           "JOBLIB_CLOUD_CLUSTER": config.cluster, **common}
    if config.image:
        env["JOBLIB_CLOUD_IMAGE"] = config.image
    return env


def _ssh(config: CloudConfig, fleet: provisioner.Fleet, python: str,
         common: dict[str, str], detach: bool) -> JobCluster:
    n = len(fleet.hosts)
    if detach:
        raise ValueError(
            f"run -n {n} on provider 'ssh' cannot --detach: the job logs in to the other "
            "hosts with this computer's ssh-agent, forwarded only while `run` follows the "
            "job. Run it attached (Ctrl-C cancels it), or with -n 1 / a single host.")
    try:
        keys = paramiko.Agent().get_keys()
    except paramiko.SSHException:
        keys = ()
    if not keys:
        raise ValueError(
            f"run -n {n} on provider 'ssh': the job's machine logs in to the other hosts "
            "with this computer's ssh-agent, forwarded over the job's connection (the key "
            "never leaves this computer), and no ssh-agent holding a key is running here "
            "(SSH_AUTH_SOCK). Start one and add the hosts' key: `eval $(ssh-agent)` then "
            "`ssh-add ~/.ssh/id_ed25519`; or run on one host.")
    specs = [h.spec for h in fleet.hosts]
    lines = []
    known = paramiko.HostKeys()
    for path in {Path(t.known_hosts or Path.home() / ".ssh" / "known_hosts").expanduser()
                 for t in fleet.hosts}:
        if path.exists():
            known.load(str(path))
    for spec in specs:
        name = spec.known_hosts_name
        if spec.host_key:
            lines.append(f"{name} {spec.host_key}")
        for key in (known.lookup(name) or {}).values():
            lines.append(f"{name} {key.get_name()} {key.get_base64()}")
    hosts = [f"{s.user}@{_bracket(s.address)}:{s.port}" for s in specs]
    return JobCluster(_ssh_env(hosts, python, config, common),
                      {"known_hosts": "".join(line + "\n" for line in lines)},
                      agent=True, probe=True, hosts=hosts)


def _bracket(address: str) -> str:
    return f"[{address}]" if ":" in address else address


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


def wait_for_siblings(fleet: provisioner.Fleet, every: float) -> None:
    """Every machine but the job's own accepts SSH (they may still be booting); each gets
    what :meth:`Fleet.ready` does once it answered (aws: the metadata endpoint that served
    its user-data closes), as the backend's own connect would do, and its idle timer
    starts again, every ``every`` seconds until the last one answered: a machine that
    booted first must not stop while the others boot."""
    from ..client.ssh import SSHConnection

    reached: list[SSHConnection] = []
    lock = threading.Lock()

    def reach(host: provisioner.HostTarget) -> None:
        connection = SSHConnection(host.spec, key_path=host.ssh_key,
                                   known_hosts=host.known_hosts,
                                   connect_timeout=fleet.connect_timeout or 60.0,
                                   retry_auth=host.retry_auth, check=host.check,
                                   timeout_advice=host.timeout_advice)
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


def start_waiting(fleet: provisioner.Fleet, every: float
                  ) -> Callable[[Callable[[], None]], None]:
    """:func:`wait_for_siblings` in the background (while the job's own machine is
    reached); the function returned waits for it, calling ``tick`` every ``every`` seconds
    meanwhile (the job's machine must not idle out either), and raises what it raised."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            wait_for_siblings(fleet, every)
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


def _aws(config: CloudConfig, fleet: provisioner.Fleet, common: dict[str, str]
         ) -> JobCluster:
    from ..providers.aws import ec2api, sshkeys

    handle = fleet.handle  # type: ignore[attr-defined]  # AWSFleet
    found = {i["InstanceId"]: i for i in ec2api.instances(
        handle.ec2, "find the cluster's machines",
        [{"Name": "instance-id", "Values": handle.instance_ids}])}
    hosts, lines = [], []
    for spec in handle.specs:
        instance = found.get(spec.label)
        if instance is None:
            raise RuntimeError(f"machine {spec.label} of cluster {config.cluster!r} is "
                               "gone; run again to replace it")
        address, port = provisioner.sibling_address(instance)
        name = address if port == 22 else f"[{address}]:{port}"
        lines.append(f"{name} {spec.host_key}\n")
        hosts.append(f"{spec.user}@{_bracket(address)}:{port}")
    env = _ssh_env(hosts, handle.python, config, common)
    env.setdefault("JOBLIB_CLOUD_WORKERS_PER_HOST", str(handle.vcpus or ""))
    if not env["JOBLIB_CLOUD_WORKERS_PER_HOST"]:
        del env["JOBLIB_CLOUD_WORKERS_PER_HOST"]
    env["JOBLIB_CLOUD_SSH_KEY"] = "{cloud}/id_job"
    # The job's own key, certified for the machines' user until they stop at the latest.
    private, public = sshkeys.generate_ed25519()
    cert = sshkeys.user_certificate(Path(handle.ssh_key).read_text(), public,
                                    handle.specs[0].user, f"joblib-cloud-job@{config.cluster}",
                                    config.max_lifetime)
    return JobCluster(env, {"known_hosts": "".join(lines), "id_job": private,
                            "id_job-cert.pub": cert + "\n"},
                      probe=True, hosts=hosts, keepalive=keepalive(config))
