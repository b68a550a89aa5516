"""The ``ssh`` provider: machines you already have, reached with your key, verified against
your ``known_hosts``.  Nothing is created on them but the agent's files under
``~/.joblib-cloud``, and the agent stops when the client leaves.

``run -n N``: the job's machine logs in to the hosts as the user listed them, verified
with the client's known-hosts entries for them, with the client's ssh-agent forwarded over
the job's own connection (the key never leaves this computer).  No agent, or hosts that
cannot reach each other, fail before the job starts, saying what is missing.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paramiko

from ..client.hosts import parse_host
from ..client.progress import Progress
from ..config import CloudConfig
from ..errors import ConfigError
from ..jobs.siblings import JobCluster
from ..provisioner import Fleet, HostTarget, Out, Provider
from ..wire import contract

#: How long ``status`` tries each host.
STATUS_TIMEOUT = 5.0
NAME = "ssh"


def bracket(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def job_env(hosts: list[str], python: str, config: CloudConfig,
            common: dict[str, str]) -> dict[str, str]:
    """Settings of a job backend that reaches ``hosts`` (``user@addr:port``) by SSH."""
    # The agents, their workers and so the tasks on every machine see that machine's copy
    # of the shared directory (jobs/probe.py keeps the copies in step with the job's).
    shared = f"{contract.HOME_SHELL}/shared/{shlex.quote(config.cluster)}"
    env = {"JOBLIB_CLOUD_PROVIDER": NAME, "JOBLIB_CLOUD_HOSTS": ",".join(hosts),
           "JOBLIB_CLOUD_KNOWN_HOSTS": "{cloud}/known_hosts",
           "JOBLIB_CLOUD_PYTHON": f"env JOBLIB_CLOUD_SHARED={shared} {config.python or python}",
           "JOBLIB_CLOUD_CLUSTER": config.cluster, **common}
    if config.image:
        env["JOBLIB_CLOUD_IMAGE"] = config.image
    return env


def known_hosts_lines(fleet: Fleet) -> str:
    """What this computer knows of the fleet's hosts' keys, as known-hosts lines."""
    lines = []
    known = paramiko.HostKeys()
    for path in {Path(t.known_hosts or Path.home() / ".ssh" / "known_hosts").expanduser()
                 for t in fleet.hosts}:
        if path.exists():
            known.load(str(path))
    for host in fleet.hosts:
        assert host.spec is not None
        name = host.spec.known_hosts_name
        if host.spec.host_key:
            lines.append(f"{name} {host.spec.host_key}")
        for key in (known.lookup(name) or {}).values():
            lines.append(f"{name} {key.get_name()} {key.get_base64()}")
    return "".join(line + "\n" for line in lines)


def host_names(fleet: Fleet) -> list[str]:
    specs = [h.spec for h in fleet.hosts if h.spec is not None]
    return [f"{s.user}@{bracket(s.address)}:{s.port}" for s in specs]


class SSHFleet(Fleet):
    """Hosts named by address; a job's machine reaches the others with the client's
    forwarded ssh-agent."""

    def job_cluster(self, config: CloudConfig, python: str, detach: bool,
                    common: dict[str, str]) -> JobCluster:
        n = len(self.hosts)
        if detach:
            raise ConfigError(
                f"run -n {n} on provider {config.provider!r} cannot --detach: the job logs "
                "in to the other hosts with this computer's ssh-agent, forwarded only while "
                "`run` follows the job. Run it attached (Ctrl-C cancels it), or with -n 1 / "
                "a single host.")
        try:
            keys = paramiko.Agent().get_keys()
        except paramiko.SSHException:
            keys = ()
        if not keys:
            raise ConfigError(
                f"run -n {n} on provider {config.provider!r}: the job's machine logs in to "
                "the other hosts with this computer's ssh-agent, forwarded over the job's "
                "connection (the key never leaves this computer), and no ssh-agent holding "
                "a key is running here (SSH_AUTH_SOCK). Start one and add the hosts' key: "
                "`eval $(ssh-agent)` then `ssh-add ~/.ssh/id_ed25519`; or run on one host.")
        hosts = host_names(self)
        return JobCluster(job_env(hosts, python, config, common),
                          {"known_hosts": known_hosts_lines(self)},
                          agent=True, probe=True, hosts=hosts)


class SSHProvider(Provider):
    name = NAME

    def ensure(self, config: CloudConfig, progress: Progress) -> Fleet:
        specs = [parse_host(h) for h in config.hosts]
        return SSHFleet([HostTarget(s.name, s, config.ssh_key, config.known_hosts)
                         for s in specs], workers_per_host=config.workers_per_host)

    def validate(self, values: dict[str, Any], origin: Callable[[str], str]) -> None:
        if not values["hosts"]:
            raise ValueError(
                f"provider {values['provider']!r} needs hosts: pass hosts=['user@addr:port', "
                "...] or set JOBLIB_CLOUD_HOSTS=user@addr:port,user@addr2:port")
        for host in values["hosts"]:
            try:
                parse_host(host)
            except ValueError as exc:
                raise ValueError(f"invalid value {host!r} in {origin('hosts')}: {exc}"
                                 ) from None

    def scale(self, config: CloudConfig) -> None:
        raise ConfigError(f"provider {config.provider!r} has the machines of hosts=: change "
                          "hosts= to use more or fewer")

    def run_note(self, config: CloudConfig, n: int | None) -> str | None:
        if n and n != len(config.hosts):
            return (f"provider {config.provider!r} uses the {len(config.hosts)} host(s) you "
                    f"listed (hosts= / JOBLIB_CLOUD_HOSTS), not -n {n}")
        return None

    def status(self, config: CloudConfig, args: argparse.Namespace, out: Out) -> int:
        """Reachability: each host's SSH login, host key verified."""
        if not config.hosts:
            out("no ssh hosts configured (hosts= or JOBLIB_CLOUD_HOSTS)")
            return 1
        unreachable = 0
        for text in config.hosts:
            spec = parse_host(text)
            try:
                HostTarget(spec.name, spec, config.ssh_key, config.known_hosts
                           ).connect(STATUS_TIMEOUT).close()
                out(f"{spec.name}: reachable, host key verified, login accepted")
            except Exception as exc:  # noqa: BLE001 - each host's own answer is the status
                unreachable += 1
                out(f"{spec.name}: NOT reachable: {exc}")
        return 1 if unreachable else 0

    def down(self, config: CloudConfig, args: argparse.Namespace, out: Out) -> int:
        out("provider 'ssh' uses machines you own: nothing to remove (agents stop when "
            "their client leaves; their files stay under ~/.joblib-cloud on each host)")
        return 0
