"""Client side of ``joblib-cloud run``: start a job on a host, follow it, list, cancel.

A job's state lives on its host (see :mod:`jobhost`, which each call ships and runs with
the backend's ``python``); the client keeps only a small record per job
(:mod:`records`).  The host is reached the way the backend reaches it (:mod:`targets`).

An attached ``run`` is one helper call: ``start`` unpacks and starts the job, prints one
line saying so, then streams the job's output until it ends and exits with its code, all
on one channel, which is also the one the client's ssh-agent is forwarded on when the
job's backend logs in to the cluster's other machines (:mod:`siblings`).  Ports are
forwarded over the same connection (:mod:`ports`); outputs come back at the end
(:mod:`outputs`).
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import shlex
import sys
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO

from .. import provisioner
from ..client.progress import Progress
from ..client.streams import agent_zip
from ..config import CloudConfig
from ..errors import ConfigError, JobError
from ..host import jobhost
from ..wire.contract import length_prefix
from . import outputs, ports, siblings
from .docker import docker_python
from .records import (
    JobRecord,
    find_record,
    host_key,
    load_records,
    records_dir,
    save_record,
    target_for,
)
from .targets import LocalTarget, Result, Sink, SSHTarget, Target, helper_command
from .workspace import DEFAULT_MAX_UPLOAD, human, pack

__all__ = ["JobRecord", "RunOptions", "Target", "cancel", "find_record", "helper_command",
           "load_records", "logs", "run", "start", "statuses", "target_for"]


@dataclasses.dataclass
class RunOptions:
    """What ``run`` does besides running the command."""

    detach: bool = False
    max_upload: int = DEFAULT_MAX_UPLOAD
    #: Outputs are looked for only under this directory of the workspace ("" = all).
    output: str = ""
    #: Where outputs are copied (default ./joblib-cloud-runs/<job>/).
    into: Path | None = None
    max_output: int = outputs.DEFAULT_MAX_OUTPUT
    ports: list[ports.PortSpec] = dataclasses.field(default_factory=list)


def open_target(config: CloudConfig, progress: Progress
                ) -> tuple[Target, JobRecord, provisioner.Fleet]:
    """Reach the first host of ``config``'s cluster (launching the cluster on a cloud),
    as the cluster's own connect would."""
    def record(**where: Any) -> JobRecord:
        return JobRecord(id="", provider=config.provider, cluster=config.cluster, command="",
                         created=time.time(), region=config.region, **where)

    fleet = provisioner.provider(config.provider).ensure(config, progress)
    target = fleet.hosts[0]
    python = config.python or fleet.python or "python3"
    if target.spec is None:
        return (LocalTarget(python, target.name),
                record(host=target.name, python=python), fleet)
    if config.image:  # config.python is the one in the image; the helper runs on the VM
        python = "python3"
    spec = target.spec
    progress.update(f"connecting to {spec.name}")
    # The other machines may still boot: they are waited for meanwhile (siblings.py).
    others = (siblings.start_waiting(fleet, config, siblings.keepalive(config))
              if fleet.siblings_boot and len(fleet.hosts) > 1 else None)
    try:
        connection = fleet.connect(target, config)
        try:
            if others is not None:
                others(lambda: siblings.touch(connection))
        except BaseException:
            connection.close()
            raise
    except BaseException:
        fleet.abort()  # never leave a VM we just launched and cannot reach
        raise
    fleet.ready(target)
    return SSHTarget(connection, python), record(
        host=spec.name, python=python, address=spec.address, port=spec.port, user=spec.user,
        host_key=spec.host_key, ssh_key=target.ssh_key, known_hosts=target.known_hosts), fleet


def _writer(stream: BinaryIO) -> Sink:
    def write(data: bytes) -> None:
        stream.write(data)
        stream.flush()

    return write


def shell_command(argv: list[str]) -> str:
    """One argument is a shell command line (like ssh); several are quoted words."""
    if not argv:
        raise ConfigError("nothing to run: give a command after --, e.g. "
                         "`joblib-cloud run -- python train.py`")
    return argv[0] if len(argv) == 1 else shlex.join(argv)


def _check(result: Result, what: str) -> Result:
    if result.code != 0:
        detail = result.stderr.decode(errors="replace").strip() or f"exit code {result.code}"
        detail = detail.replace("joblib-cloud (on host): ", "")
        if result.code == 127:  # the shell found no such interpreter
            detail += (". Set python= (or JOBLIB_CLOUD_PYTHON) to the interpreter on the "
                       "host")
        raise JobError(f"{what} failed: {detail}")
    return result


def job_python(config: CloudConfig, target: Target) -> str:
    """The interpreter a job's ``python`` runs: the backend's, in ``image`` if set."""
    if config.image and provisioner.provider(config.provider).runs_images:
        return docker_python(config.image, config.python, mount_cwd=True)
    return target.python


@dataclasses.dataclass
class _Pending:
    target: Target
    record: JobRecord
    args: list[str]
    stdin: bytes
    agent: bool


def _prepare(config: CloudConfig, argv: list[str], root: Path | None, opts: RunOptions,
             progress: Progress) -> _Pending:
    """Pack the directory, reach the host and say how the job sees its cluster."""
    command = shell_command(argv)
    workspace = pack(root or Path.cwd(), opts.max_upload)
    progress.update(f"packed {len(workspace.files)} files ({human(workspace.nbytes)})")
    config = provisioner.provider(config.provider).job_config(config)
    target, record, fleet = open_target(config, progress)
    try:
        cluster = siblings.for_job(config, fleet, target.python, opts.detach)
        record.id = secrets.token_hex(4)
        record.command = command
        record.agent = cluster.agent
        options = {**cluster.options(), "output": opts.output, "shared": config.cluster,
                   "follow": not opts.detach}
        options.update(fleet.job_storage(config, record, opts.max_output))
        blob = agent_zip()
        progress.update(f"uploading {human(len(workspace.archive) + len(blob))} "
                        f"to {target.name}")
        args = ["start", record.id, job_python(config, target), command,
                json.dumps(options)]
        return _Pending(target, record, args, length_prefix(blob) + blob + workspace.archive,
                        cluster.agent)
    except BaseException:
        target.close()
        raise


def start(config: CloudConfig, argv: list[str], *, root: Path | None = None,
          max_upload: int = DEFAULT_MAX_UPLOAD, progress: Progress | None = None
          ) -> tuple[Target, JobRecord]:
    """Copy ``root`` to the first host and start ``argv`` there, detached."""
    progress = progress or Progress(config.verbose)
    pending = _prepare(config, argv, root, RunOptions(detach=True, max_upload=max_upload),
                       progress)
    target, record = pending.target, pending.record
    try:
        _check(target.call(pending.args, stdin=pending.stdin,
                           forward_agent=pending.agent),
               f"starting the job on {target.name}")
        save_record(record)
    except BaseException:
        target.close()
        raise
    progress.done(f"created new job {record.id} on {target.name}")
    return target, record


class _Follower:
    """Sinks for an attached start: the helper's first stdout line says the job started
    (until then its stderr is kept, to become the error if it did not), the rest is the
    job's own output."""

    def __init__(self, stdout: Sink, stderr: Sink, on_start: Any) -> None:
        self.started = False
        self._stdout, self._stderr, self._on_start = stdout, stderr, on_start
        self._line = b""
        self.kept_err: list[bytes] = []
        self._lock = threading.Lock()

    def out(self, data: bytes) -> None:
        if not self.started:
            self._line += data
            if b"\n" not in self._line:
                return
            _, _, data = self._line.partition(b"\n")
            with self._lock:
                self.started = True
                self._on_start()
                for chunk in self.kept_err:
                    self._stderr(chunk)
            if not data:
                return
        self._stdout(data)

    def err(self, data: bytes) -> None:
        with self._lock:
            if not self.started:
                self.kept_err.append(data)
                return
        self._stderr(data)


def _announce(job_id: str) -> Any:
    def announce(url: str) -> None:
        print(f"joblib-cloud: job {job_id}: {url}", file=sys.stderr, flush=True)

    return announce


def run(config: CloudConfig, argv: list[str], *, detach: bool = False,
        max_upload: int = DEFAULT_MAX_UPLOAD, options: RunOptions | None = None) -> int:
    """``joblib-cloud run``: the command's exit code (or 0 once started, detached)."""
    opts = options or RunOptions(detach=detach, max_upload=max_upload)
    if detach:
        opts.detach = True
    if opts.detach:
        if opts.ports:
            raise ConfigError("--port needs an attached run; for a detached job use "
                             "`joblib-cloud forward JOB PORT`")
        target, record = start(config, argv, max_upload=opts.max_upload)
        target.close()
        print(record.id, flush=True)
        return 0
    progress = Progress(config.verbose)
    pending = _prepare(config, argv, None, opts, progress)
    target, record = pending.target, pending.record
    forwards: list[ports.Forward] = []
    try:
        save_record(record)  # first: Ctrl-C at any moment can cancel it
        forwards = ports.forward_all(target.connection, opts.ports, _announce(record.id))
        follower = _Follower(_writer(sys.stdout.buffer), _writer(sys.stderr.buffer),
                             lambda: progress.done(f"created new job {record.id} on "
                                                   f"{target.name}"))
        try:
            result = target.call(pending.args, stdin=pending.stdin, out=follower.out,
                                 err=follower.err, forward_agent=pending.agent)
        except KeyboardInterrupt:
            if not follower.started and state_of(target, record)["state"] == "missing":
                (records_dir() / f"{record.id}.json").unlink(missing_ok=True)
            else:
                cancel(record, target)
            print(f"joblib-cloud: cancelled job {record.id} (use --detach to leave jobs "
                  "running)", file=sys.stderr)
            return 130
        if not follower.started:
            (records_dir() / f"{record.id}.json").unlink(missing_ok=True)
            _check(Result(result.code or 1, b"", b"".join(follower.kept_err)),
                   f"starting the job on {target.name}")
        code = _exit_code(target, record, result.code)
        _bring_outputs(target, record, opts)
        return code
    finally:
        for forward in forwards:
            forward.close()
        target.close()


def _bring_outputs(target: Target, record: JobRecord, opts: RunOptions) -> None:
    try:
        into, names, nbytes = outputs.fetch(target, record.id, opts.into,
                                            max_bytes=opts.max_output)
    except RuntimeError as exc:  # the job's own exit code still stands
        print(f"joblib-cloud: error: {exc}", file=sys.stderr, flush=True)
        return
    outputs.report(record.id, into, names, nbytes, say_none=False)


def _exit_code(target: Target, record: JobRecord, code: int) -> int:
    if code == -1:  # the SSH channel closed without an exit status
        raise JobError(f"lost the connection to {record.host} while following job "
                           f"{record.id}; it keeps running there: `joblib-cloud logs -f "
                           f"{record.id}` to follow it again")
    if code == jobhost.ERROR_EXIT and state_of(target, record)["state"] == "lost":
        raise JobError(f"job {record.id} on {record.host} was lost: its supervisor "
                           "died (the machine rebooted?) before the command ended")
    return code


def follow(target: Target, record: JobRecord, stdout: BinaryIO | None = None,
           stderr: BinaryIO | None = None) -> int:
    """Stream the job's output until it ends; its exit code."""
    result = target.call(["logs", record.id, "1"],
                         out=_writer(stdout or sys.stdout.buffer),
                         err=_writer(stderr or sys.stderr.buffer),
                         forward_agent=record.agent)
    return _exit_code(target, record, result.code)


def state_of(target: Target, record: JobRecord) -> dict[str, Any]:
    result = _check(target.call(["status", record.id]), f"asking {target.name} about jobs")
    return json.loads(result.stdout.decode().splitlines()[0])


def statuses(records: list[JobRecord]) -> list[dict[str, Any]]:
    """The host-side state of each job, asking each host once."""
    groups: dict[tuple, list[JobRecord]] = {}
    for record in records:
        groups.setdefault(host_key(record), []).append(record)
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
            raise JobError(f"job {record.id} no longer exists on {record.host}")
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
