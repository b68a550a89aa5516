"""The client's one small record per job: how to reach its host again.

All of a job's state lives on its host (see ``host/jobhost.py``); the client keeps only
``home_dir()/job-records/<id>.json`` (mode 0600) with the address, user, key and
known-hosts paths, so ``jobs``, ``logs``, ``cancel``, ``pull`` and ``forward`` connect
with the same host-key verification as the backend.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..client.hosts import HostSpec
from ..config import home_dir, write_private
from ..errors import JobError
from ..provisioner import HostTarget
from .targets import LocalTarget, SSHTarget, Target


@dataclasses.dataclass
class JobRecord:
    """How to reach a job's host again (all the state itself is on the host)."""

    id: str
    provider: str
    cluster: str
    host: str
    python: str
    command: str
    created: float
    address: str = ""
    port: int = 22
    user: str = ""
    host_key: str | None = None
    ssh_key: str | None = None
    known_hosts: str | None = None
    #: Where the provider kept what outlives the machine (aws: the bucket's region).
    region: str | None = None
    #: The job logs in to its siblings with the client's ssh-agent (``run -n N`` on ssh):
    #: only then is the agent forwarded when the job is followed again.
    agent: bool = False


class JobNotFoundError(JobError, ValueError):
    """No job, or more than one, matches the id given."""


def records_dir() -> Path:
    path = home_dir() / "job-records"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def save_record(record: JobRecord) -> None:
    write_private(records_dir() / f"{record.id}.json", json.dumps(dataclasses.asdict(record)))


def load_records() -> list[JobRecord]:
    out = []
    fields = {f.name for f in dataclasses.fields(JobRecord)}
    for path in records_dir().glob("*.json"):
        try:
            data = json.loads(path.read_text())
            out.append(JobRecord(**{k: v for k, v in data.items() if k in fields}))
        except (OSError, ValueError, TypeError):
            continue  # a damaged record must not hide the others
    return sorted(out, key=lambda r: r.created)


def find_record(prefix: str) -> JobRecord:
    matches = [r for r in load_records() if r.id.startswith(prefix)]
    if not matches:
        raise JobNotFoundError(f"no job {prefix!r} in this machine's records; "
                         "`joblib-cloud jobs` lists the jobs started from here")
    if len(matches) > 1:
        raise JobNotFoundError(f"job id {prefix!r} is ambiguous: it matches "
                         f"{', '.join(r.id for r in matches)}")
    return matches[0]


def target_for(record: JobRecord, connect_timeout: float = 20.0) -> Target:
    if not record.address:  # the job's host was an agent on this machine
        return LocalTarget(record.python, record.host)
    spec = HostSpec(address=record.address, port=record.port, user=record.user,
                    host_key=record.host_key)
    host = HostTarget(record.host, spec, record.ssh_key, record.known_hosts)
    return SSHTarget(host.connect(connect_timeout), record.python)


def host_key(record: JobRecord) -> tuple:
    """Records with the same key are jobs of one host: ask it once."""
    return (record.provider, record.address, record.port, record.user, record.python)
