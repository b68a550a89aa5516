"""Client side of ``joblib-cloud run``: start a job on a host, follow it, list, cancel.

A job's state lives on its host (see :mod:`jobhost`, which each call ships and runs with
the backend's ``python``); the client keeps only a small record per job under
``home_dir()/job-records`` saying how to reach that host again.  The host is reached the
way the backend reaches it: a local subprocess for ``local``, an exec channel of a
verified :class:`SSHConnection` for ``ssh`` and ``aws``.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from .. import provisioner
from ..client.hosts import HostSpec
from ..client.progress import Progress
from ..client.ssh import SSHConnection
from ..client.streams import agent_zip
from ..config import CloudConfig, home_dir, write_private
from ..host import jobhost
from ..wire.contract import length_prefix
from .docker import docker_python
from .workspace import DEFAULT_MAX_UPLOAD, human, pack

Sink = Callable[[bytes], None]


def _helper_source() -> str:
    return Path(jobhost.__file__).read_text()


def helper_command(python: str, args: list[str]) -> str:
    """Shell command running the host helper with ``python`` (itself a command line)."""
    return f"exec {python} -c {shlex.quote(_helper_source())} {shlex.join(args)}"


@dataclasses.dataclass
class Result:
    code: int
    stdout: bytes
    stderr: bytes


class Target:
    """A machine that runs host-helper commands: the same interface for every provider."""

    name: str
    python: str

    def call(self, args: list[str], stdin: bytes = b"", out: Sink | None = None,
             err: Sink | None = None) -> Result:
        """Run the helper; stream its output to ``out``/``err`` or collect it."""
        raise NotImplementedError

    def close(self) -> None:
        pass


def _pump(read: Callable[[int], bytes], sink: Sink | None, keep: list[bytes]) -> None:
    while True:
        try:
            data = read(1 << 16)
        except (OSError, EOFError):
            return
        if not data:
            return
        if sink is None:
            keep.append(data)
        else:
            sink(data)


def _collect(readers: list[tuple[Callable[[int], bytes], Sink | None]],
             send: Callable[[], None]) -> tuple[bytes, bytes]:
    kept: list[list[bytes]] = [[], []]
    threads = [threading.Thread(target=_pump, args=(read, sink, kept[i]), daemon=True)
               for i, (read, sink) in enumerate(readers)]
    for thread in threads:
        thread.start()
    send()
    for thread in threads:
        while thread.is_alive():  # join() with a timeout keeps Ctrl-C responsive
            thread.join(0.2)
    return b"".join(kept[0]), b"".join(kept[1])


class LocalTarget(Target):
    """The ``local`` provider: jobs run in a copy under this machine's home_dir()."""

    def __init__(self, python: str) -> None:
        self.name = "local"
        self.python = python

    def call(self, args: list[str], stdin: bytes = b"", out: Sink | None = None,
             err: Sink | None = None) -> Result:
        proc = subprocess.Popen(["/bin/sh", "-c", helper_command(self.python, args)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, bufsize=0)

        def send() -> None:
            try:
                proc.stdin.write(stdin)
            except BrokenPipeError:
                pass
            proc.stdin.close()

        try:
            stdout, stderr = _collect([(proc.stdout.read, out), (proc.stderr.read, err)],
                                      send)
            return Result(proc.wait(), stdout, stderr)
        finally:
            if proc.poll() is None:  # interrupted: the helper, not the job, stops
                proc.kill()
                proc.wait()


class SSHTarget(Target):
    """An ``ssh`` or ``aws`` host: one verified SSH connection, a channel per call."""

    def __init__(self, connection: SSHConnection, python: str) -> None:
        self.connection = connection
        self.name = connection.spec.name
        self.python = python

    def call(self, args: list[str], stdin: bytes = b"", out: Sink | None = None,
             err: Sink | None = None) -> Result:
        channel = self.connection.exec(helper_command(self.python, args))

        def send() -> None:
            if stdin:
                channel.sendall(stdin)
            channel.shutdown_write()

        try:
            stdout, stderr = _collect([(channel.recv, out), (channel.recv_stderr, err)],
                                      send)
            return Result(channel.recv_exit_status(), stdout, stderr)
        finally:
            channel.close()

    def close(self) -> None:
        self.connection.close()


# ------------------------------------------------------------------------- records


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


def records_dir() -> Path:
    path = home_dir() / "job-records"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def save_record(record: JobRecord) -> None:
    write_private(records_dir() / f"{record.id}.json", json.dumps(dataclasses.asdict(record)))


def load_records() -> list[JobRecord]:
    out = []
    for path in records_dir().glob("*.json"):
        try:
            out.append(JobRecord(**json.loads(path.read_text())))
        except (OSError, ValueError, TypeError):
            continue  # a damaged record must not hide the others
    return sorted(out, key=lambda r: r.created)


def find_record(prefix: str) -> JobRecord:
    matches = [r for r in load_records() if r.id.startswith(prefix)]
    if not matches:
        raise ValueError(f"no job {prefix!r} in this machine's records; "
                         "`joblib-cloud jobs` lists the jobs started from here")
    if len(matches) > 1:
        raise ValueError(f"job id {prefix!r} is ambiguous: it matches "
                         f"{', '.join(r.id for r in matches)}")
    return matches[0]


# ------------------------------------------------------------------------- targets


def open_target(config: CloudConfig, progress: Progress) -> tuple[Target, JobRecord]:
    """Reach the first host of ``config``'s cluster (launching the cluster on a cloud),
    as the cluster's own connect would."""
    base = dict(id="", provider=config.provider, cluster=config.cluster, command="",
                created=time.time())
    fleet = provisioner.provider(config.provider).ensure(config, progress)
    target = fleet.hosts[0]
    python = config.python or fleet.python or "python3"
    if target.spec is None:
        return LocalTarget(python), JobRecord(host="local", python=python, **base)
    if config.image:  # config.python is the one in the image; the helper runs on the VM
        python = "python3"
    spec = target.spec
    progress.update(f"connecting to {spec.name}")
    try:
        connection = SSHConnection(spec, key_path=target.ssh_key,
                                   known_hosts=target.known_hosts,
                                   connect_timeout=fleet.connect_timeout
                                   or config.connect_timeout,
                                   retry_auth=target.retry_auth, check=target.check,
                                   timeout_advice=target.timeout_advice)
    except BaseException:
        fleet.abort()  # never leave a VM we just launched and cannot reach
        raise
    fleet.ready(target)
    record = JobRecord(host=spec.name, python=python, address=spec.address, port=spec.port,
                       user=spec.user, host_key=spec.host_key, ssh_key=target.ssh_key,
                       known_hosts=target.known_hosts, **base)
    return SSHTarget(connection, python), record


def target_for(record: JobRecord, connect_timeout: float = 20.0) -> Target:
    if record.provider == "local":
        return LocalTarget(record.python)
    spec = HostSpec(address=record.address, port=record.port, user=record.user,
                    host_key=record.host_key)
    return SSHTarget(SSHConnection(spec, key_path=record.ssh_key,
                                   known_hosts=record.known_hosts,
                                   connect_timeout=connect_timeout), record.python)


def _host_key(record: JobRecord) -> tuple:
    return (record.provider, record.address, record.port, record.user, record.python)


# ------------------------------------------------------------------------- operations


def _writer(stream: BinaryIO) -> Sink:
    def write(data: bytes) -> None:
        stream.write(data)
        stream.flush()

    return write


def shell_command(argv: list[str]) -> str:
    """One argument is a shell command line (like ssh); several are quoted words."""
    if not argv:
        raise ValueError("nothing to run: give a command after --, e.g. "
                         "`joblib-cloud run -- python train.py`")
    return argv[0] if len(argv) == 1 else shlex.join(argv)


def _check(result: Result, what: str) -> Result:
    if result.code != 0:
        detail = result.stderr.decode(errors="replace").strip() or f"exit code {result.code}"
        if result.code == 127:  # the shell found no such interpreter
            detail += (". Set python= (or JOBLIB_CLOUD_PYTHON) to the interpreter on the "
                       "host")
        raise RuntimeError(f"{what} failed: {detail}")
    return result


def job_python(config: CloudConfig, target: Target) -> str:
    """The interpreter a job's ``python`` runs: the backend's, in ``image`` if set."""
    if config.image and config.provider != "local":
        return docker_python(config.image, config.python, mount_cwd=True)
    return target.python


def start(config: CloudConfig, argv: list[str], *, root: Path | None = None,
          max_upload: int = DEFAULT_MAX_UPLOAD, progress: Progress | None = None
          ) -> tuple[Target, JobRecord]:
    """Copy ``root`` to the first host and start ``argv`` there, detached."""
    progress = progress or Progress(config.verbose)
    command = shell_command(argv)
    workspace = pack(root or Path.cwd(), max_upload)
    progress.update(f"packed {len(workspace.files)} files ({human(workspace.nbytes)})")
    target, record = open_target(config, progress)
    try:
        record.id = secrets.token_hex(4)
        record.command = command
        blob = agent_zip()
        progress.update(f"uploading {human(len(workspace.archive) + len(blob))} "
                        f"to {target.name}")
        _check(target.call(["start", record.id, job_python(config, target), command],
                           stdin=length_prefix(blob) + blob + workspace.archive),
               f"starting the job on {target.name}")
        save_record(record)
    except BaseException:
        target.close()
        raise
    progress.done(f"created new job {record.id} on {target.name}")
    return target, record


def follow(target: Target, record: JobRecord, stdout: BinaryIO | None = None,
           stderr: BinaryIO | None = None) -> int:
    """Stream the job's output until it ends; its exit code."""
    result = target.call(["logs", record.id, "1"],
                         out=_writer(stdout or sys.stdout.buffer),
                         err=_writer(stderr or sys.stderr.buffer))
    if result.code == -1:  # the SSH channel closed without an exit status
        raise RuntimeError(f"lost the connection to {record.host} while following job "
                           f"{record.id}; it keeps running there: `joblib-cloud logs -f "
                           f"{record.id}` to follow it again")
    if result.code == jobhost.ERROR_EXIT and state_of(target, record)["state"] == "lost":
        raise RuntimeError(f"job {record.id} on {record.host} was lost: its supervisor "
                           "died (the machine rebooted?) before the command ended")
    return result.code


def state_of(target: Target, record: JobRecord) -> dict[str, Any]:
    result = _check(target.call(["status", record.id]), f"asking {target.name} about jobs")
    return json.loads(result.stdout.decode().splitlines()[0])


def run(config: CloudConfig, argv: list[str], *, detach: bool = False,
        max_upload: int = DEFAULT_MAX_UPLOAD) -> int:
    """``joblib-cloud run``: the command's exit code (or 0 once started, detached)."""
    target, record = start(config, argv, max_upload=max_upload)
    try:
        if detach:
            print(record.id, flush=True)
            return 0
        try:
            return follow(target, record)
        except KeyboardInterrupt:
            cancel(record, target)
            print(f"joblib-cloud: cancelled job {record.id} (use --detach to leave jobs "
                  "running)", file=sys.stderr)
            return 130
    finally:
        target.close()


def statuses(records: list[JobRecord]) -> list[dict[str, Any]]:
    """The host-side state of each job, asking each host once."""
    groups: dict[tuple, list[JobRecord]] = {}
    for record in records:
        groups.setdefault(_host_key(record), []).append(record)
    found: dict[str, dict[str, Any]] = {}
    for group in groups.values():
        try:
            target = target_for(group[0], connect_timeout=3.0)
        except Exception as exc:  # noqa: BLE001 - one gone host must not hide the others
            for record in group:
                found[record.id] = {"state": "unreachable", "error": str(exc)}
            continue
        try:
            result = target.call(["status", *(r.id for r in group)])
            for line in result.stdout.decode().splitlines():
                info = json.loads(line)
                found[info["id"]] = info
        finally:
            target.close()
    return [{**dataclasses.asdict(r), **found.get(r.id, {"state": "unknown"})}
            for r in records]


def logs(job: str, follow_output: bool = False) -> int:
    record = find_record(job)
    target = target_for(record)
    try:
        if state_of(target, record)["state"] == "missing":
            raise ValueError(f"job {record.id} no longer exists on {record.host}")
        if follow_output:
            return follow(target, record)
        target.call(["logs", record.id, "0"], out=_writer(sys.stdout.buffer),
                    err=_writer(sys.stderr.buffer))
        return 0
    finally:
        target.close()


def cancel(record: JobRecord, target: Target | None = None) -> dict[str, Any]:
    """Stop the job's whole process group on its host; its final state."""
    own = target is None
    target = target or target_for(record)
    try:
        result = _check(target.call(["cancel", record.id]), f"cancelling job {record.id}")
        return json.loads(result.stdout.decode().splitlines()[-1])
    finally:
        if own:
            target.close()
