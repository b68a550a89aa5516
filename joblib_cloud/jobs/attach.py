"""Reaching a detached job again: ``joblib-cloud pull JOB [PATH]`` and ``joblib-cloud
forward JOB PORT``, through the job's record (how to reach its host)."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import HostConnectError, JobError
from ..provisioner import provider
from . import outputs, ports
from .control import state_of
from .records import JobRecord, find_record, target_for


def pull(job: str, path: str = "", into: Path | None = None,
         max_bytes: int = outputs.DEFAULT_MAX_OUTPUT) -> int:
    """Copy a job's outputs (below ``path``) here; 0, or 1 if there was nothing.  A job
    whose machine is gone, or no longer has it, gets what its provider kept elsewhere."""
    record = find_record(job)
    keeper = provider(record.provider)
    try:
        target = target_for(record, connect_timeout=keeper.reattach_timeout)
    except (HostConnectError, OSError):
        code = _saved(record, path, into, max_bytes)
        if code is None:
            raise
        return code
    try:
        info = state_of(target, record)
        if info["state"] == "missing":
            target.close()
            code = _saved(record, path, into, max_bytes)
            if code is not None:
                return code
            raise JobError(f"job {record.id} no longer exists on {record.host}")
        if info["state"] == "running":
            print(f"joblib-cloud: note: job {record.id} is still running: these are its "
                  "outputs so far", file=sys.stderr)
        into, names, nbytes = outputs.fetch(target, record.id, into, path, max_bytes)
    finally:
        target.close()
    outputs.report(record.id, into, names, nbytes)
    return 0 if names else 1


def _saved(record: JobRecord, path: str, into: Path | None, max_bytes: int) -> int | None:
    """What the job's provider kept beyond its machine, copied here (an exit code), or
    None when it keeps nothing."""
    keeper = provider(record.provider)
    found = keeper.saved_outputs(record, path, into or outputs.default_into(record.id),
                                 max_bytes)
    if found is None:
        return None
    into, names, nbytes = found
    print(f"joblib-cloud: job {record.id}'s machine is gone; its outputs come from "
          f"{keeper.saved_where}", file=sys.stderr)
    outputs.report(record.id, into, names, nbytes)
    return 0 if names else 1


def forward(job: str, spec: ports.PortSpec) -> int:
    """Serve the job's port here until Ctrl-C or until the job ends."""
    record = find_record(job)
    target = target_for(record)
    try:
        if state_of(target, record)["state"] != "running":
            raise JobError(f"job {record.id} is not running: nothing to forward")

        def announce(url: str) -> None:
            print(url, flush=True)

        forwards = ports.forward_all(target.connection, [spec], announce)
        print(f"joblib-cloud: forwarding port {spec.remote} of job {record.id} to "
              f"127.0.0.1:{spec.local} until it ends (Ctrl-C stops)", file=sys.stderr,
              flush=True)
        checks = [0]

        def alive() -> bool:
            checks[0] += 1
            if target.connection is not None and not target.connection.alive:
                return False
            return bool(checks[0] % 5) or state_of(target, record)["state"] == "running"

        try:
            ports.hold(forwards, alive)
        except KeyboardInterrupt:
            pass
        return 0
    finally:
        target.close()
