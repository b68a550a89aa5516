"""Run on a ``run -n N`` job's machine before the job starts (``python -m
joblib_cloud.jobs.probe``, in the job's environment): log in to every machine of the
cluster the way the job's backend will, so hosts that cannot reach each other, a key
they refuse or a host key that does not match stop the job before it runs, with a
message that says which host and what is missing.  Exit code 1 and one line on stderr.
"""

from __future__ import annotations

import socket
import sys
from concurrent.futures import ThreadPoolExecutor

from ..client.hosts import parse_host
from ..config import resolve_config

#: Seconds to wait for each sibling: they are up already (the client just reached them).
TIMEOUT = 15.0


def _try(host: str, key: str | None, known_hosts: str | None) -> str | None:
    from ..client.ssh import SSHConnection

    try:
        SSHConnection(parse_host(host), key_path=key, known_hosts=known_hosts,
                      connect_timeout=TIMEOUT).close()
    except Exception as exc:  # noqa: BLE001 - each host's own reason is the answer
        return f"{host}: {exc}"
    return None


def main() -> int:
    try:
        import paramiko  # noqa: F401  (what the job's backend logs in with)
    except ImportError as exc:
        print(f"the job's machine lacks {exc.name} ({sys.executable}), which the job's "
              "backend needs to reach the cluster's other machines: install it there (on "
              "aws, machines launched by this version have it: `joblib-cloud down`, then "
              "run again), or run with -n 1.", file=sys.stderr)
        return 1
    config = resolve_config()
    with ThreadPoolExecutor(len(config.hosts)) as pool:
        failures = [f for f in pool.map(lambda h: _try(h, config.ssh_key, config.known_hosts),
                                        config.hosts) if f]
    if not failures:
        return 0
    how = ("with the cluster's key" if config.ssh_key else
           "with the ssh-agent forwarded from the client")
    print(f"the job's machine ({socket.gethostname()}) cannot log in over SSH {how} to "
          f"{len(failures)} of the cluster's {len(config.hosts)} machines, so the job was "
          "not started: " + " | ".join(" ".join(f.split()) for f in failures) + ". The "
          "machines of a cluster must reach each other on their SSH port (a firewall or "
          "addresses only this computer can use?) and accept the key; or run with -n 1.",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
