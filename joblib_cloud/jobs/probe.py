"""Run on a ``run -n N`` job's machine, in the job's environment (``python -m
joblib_cloud.jobs.probe start|end``), logged in to the cluster's machines the way the
job's backend will be.

``start``, before the job: log in to every machine, so hosts that cannot reach each
other, a key they refuse or a host key that does not match stop the job before it runs,
with a message that says which host and what is missing; then give every other machine a
copy of the shared directory (``$JOBLIB_CLOUD_SHARED``: the job's backend points its
agents there, so tasks on every host see it).  ``keep``, while the job runs on aws: the
other machines' idle timers start again.  ``end``, after the job: what tasks
created or changed in those copies comes back into the job machine's directory (which
is saved to S3 next, on aws).  Exit code 1 and one line on stderr when something fails.
"""

from __future__ import annotations

import io
import os
import socket
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from ..client.hosts import parse_host
from ..config import CloudConfig, resolve_config
from ..errors import JobError
from ..provisioner import HostTarget

if TYPE_CHECKING:
    from ..client.ssh import SSHConnection

#: Seconds to wait for each sibling: they are up already (the client just reached them).
TIMEOUT = 15.0


def _connect(host: str, config: CloudConfig) -> SSHConnection:
    spec = parse_host(host)
    return HostTarget(spec.name, spec, config.ssh_key, config.known_hosts).connect(TIMEOUT)


def _try(host: str, config: CloudConfig) -> str | None:
    try:
        _connect(host, config).close()
    except Exception as exc:  # noqa: BLE001 - each host's own reason is the answer
        return f"{host}: {exc}"
    return None


def _pack(root: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in sorted(os.listdir(root)):
            tar.add(os.path.join(root, name), arcname=name,
                    filter=lambda info: None if info.issym() else info)
    return buffer.getvalue()


def _helper(host: str, config: CloudConfig, args: list[str], stdin: bytes = b"") -> bytes:
    from .targets import SSHTarget

    target = SSHTarget(_connect(host, config), config.python or "python3")
    try:
        result = target.call(args, stdin=stdin)
    finally:
        target.close()
    if result.code != 0:
        raise JobError(result.stderr.decode(errors="replace").strip()
                       .replace("joblib-cloud (on host): ", "") or f"exit {result.code}")
    return result.stdout


def _on_others(config: CloudConfig, fn, failed: str = "") -> bool:  # noqa: ANN001
    """``fn(host)`` on every machine but this one (the first); False, after printing
    ``failed`` and each failing host's reason, when any failed."""
    def attempt(host: str) -> str | None:
        try:
            fn(host)
        except Exception as exc:  # noqa: BLE001 - each host's own reason is the answer
            return f"{host}: {' '.join(str(exc).split())}"
        return None

    others = config.hosts[1:]
    with ThreadPoolExecutor(max(len(others), 1)) as pool:
        failures = [f for f in pool.map(attempt, others) if f]
    if failures:
        print(failed + " | ".join(failures), file=sys.stderr)
    return not failures


def start(config: CloudConfig) -> int:
    with ThreadPoolExecutor(len(config.hosts)) as pool:
        failures = [f for f in pool.map(lambda h: _try(h, config), config.hosts) if f]
    if failures:
        how = ("with the cluster's key" if config.ssh_key else
               "with the ssh-agent forwarded from the client")
        print(f"the job's machine ({socket.gethostname()}) cannot log in over SSH {how} "
              f"to {len(failures)} of the cluster's {len(config.hosts)} machines, so the "
              "job was not started: " + " | ".join(" ".join(f.split()) for f in failures)
              + ". The machines of a cluster must reach each other on their SSH port (a "
              "firewall or addresses only this computer can use?) and accept the key; or "
              "run with -n 1.", file=sys.stderr)
        return 1
    shared = os.environ.get("JOBLIB_CLOUD_SHARED")
    if shared:
        archive = _pack(shared)
        args = ["shared-replace", config.cluster, os.environ["JOBLIB_CLOUD_JOB_ID"]]
        if not _on_others(config, lambda host: _helper(host, config, args, archive),
                          "copying the shared directory to the cluster's other machines "
                          "failed, so the job was not started: "):
            return 1
    return 0


def end(config: CloudConfig) -> int:
    shared = os.environ.get("JOBLIB_CLOUD_SHARED")
    if not shared:
        return 0
    from .outputs import unpack

    args = ["shared-changed", config.cluster, os.environ["JOBLIB_CLOUD_JOB_ID"]]
    return 0 if _on_others(config,
                           lambda host: unpack(_helper(host, config, args), Path(shared)),
                           "bringing back what tasks wrote to the shared directory on the "
                           "other machines failed: ") else 1


def keep(config: CloudConfig) -> int:
    """While the job runs: the other machines' idle timers start again."""
    from .siblings import touch

    def one(host: str) -> None:
        connection = _connect(host, config)
        try:
            touch(connection)
        finally:
            connection.close()

    return 0 if _on_others(config, one) else 1


def main(argv: list[str]) -> int:
    try:
        import paramiko  # noqa: F401  (what the job's backend logs in with)
    except ImportError as exc:
        print(f"the job's machine lacks {exc.name} ({sys.executable}), which the job's "
              "backend needs to reach the cluster's other machines: install it there (on "
              "aws, machines launched by this version have it: `joblib-cloud down`, then "
              "run again), or run with -n 1.", file=sys.stderr)
        return 1
    config = resolve_config()
    return {"end": end, "keep": keep}.get(argv[0] if argv else "", start)(config)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
