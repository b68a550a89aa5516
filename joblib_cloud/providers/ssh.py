"""The ``ssh`` provider: machines you already have, reached with your key, verified against
your ``known_hosts``.  Nothing is created on them but the agent's files under
``~/.joblib-cloud``, and the agent stops when the client leaves."""

from __future__ import annotations

import argparse

from ..client.hosts import parse_host
from ..client.progress import Progress
from ..config import CloudConfig
from ..provisioner import Fleet, HostTarget, Out

#: How long ``status`` tries each host.
STATUS_TIMEOUT = 5.0


class SSHProvider:
    name = "ssh"

    def ensure(self, config: CloudConfig, progress: Progress) -> Fleet:
        specs = [parse_host(h) for h in config.hosts]
        return Fleet([HostTarget(s.name, s, config.ssh_key, config.known_hosts)
                      for s in specs], workers_per_host=config.workers_per_host)

    def status(self, config: CloudConfig, args: argparse.Namespace, out: Out) -> int:
        """Reachability: each host's SSH login, host key verified."""
        from ..client.ssh import SSHConnection

        if not config.hosts:
            out("no ssh hosts configured (hosts= or JOBLIB_CLOUD_HOSTS)")
            return 1
        unreachable = 0
        for text in config.hosts:
            spec = parse_host(text)
            try:
                SSHConnection(spec, key_path=config.ssh_key, known_hosts=config.known_hosts,
                              connect_timeout=STATUS_TIMEOUT).close()
                out(f"{spec.name}: reachable, host key verified, login accepted")
            except Exception as exc:  # noqa: BLE001 - each host's own answer is the status
                unreachable += 1
                out(f"{spec.name}: NOT reachable: {exc}")
        return 1 if unreachable else 0

    def down(self, config: CloudConfig, args: argparse.Namespace, out: Out) -> int:
        out("provider 'ssh' uses machines you own: nothing to remove (agents stop when "
            "their client leaves; their files stay under ~/.joblib-cloud on each host)")
        return 0
