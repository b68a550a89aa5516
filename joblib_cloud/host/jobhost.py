"""Host side of ``joblib-cloud run``: job directories and process control.

Sent as source with ``jobfiles.py`` (workspace files, the shared directory) and
``jobstore.py`` (aws: S3), loaded as modules by a small ``python -c`` program
(``jobs/targets.py``) over an SSH exec channel, or in a local subprocess for ``local``,
so it needs nothing but the standard library.  A job's state lives on the host, where it
cannot disagree with the process it describes::

    $JOBLIB_CLOUD_HOME/jobs/<id>/
        workspace/            the copy of the client's directory; the command's cwd
        bin/python, python3   run the interpreter the backend uses (``python`` setting)
        command.json          what to run, when it started
        stdout.log stderr.log its output
        pid                   the command's process (and process group) id
        supervisor_pid        the process that waits for it, records the exit code and
                              keeps $JOBLIB_CLOUD_HOME/activity fresh (the VM's watchdog
                              does not stop a machine that runs a job)
        exit_code             written once it ended (128+N when killed by signal N)
        cancelled             present when ``cancel`` stopped it
        manifest.json         each workspace file's size and mtime at the start: what
                              differs at the end is the job's output (``jobfiles.py``)
        cloud/                what the job's own backend needs to reach the cluster's
                              other machines (known hosts; aws: the cluster's key); removed
                              as soon as the command ends
        agent.sock            -> the forwarded ssh-agent of the client that follows the job
                              (``ssh`` clusters of several hosts: the key stays on the client)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator

ERROR_EXIT = 254  # the helper itself failed (not the job)
#: Copies of ``wire/contract.py`` (this script runs without the package).
HOME_ENV = "JOBLIB_CLOUD_HOME"
HOME_DEFAULT = "~/.joblib-cloud"
ACTIVITY_FILE = "activity"
LENGTH_PREFIX = 8
ACTIVITY_INTERVAL = 5.0  # seconds between touches of the activity file while a job runs


def jobs_root() -> str:
    home = os.environ.get(HOME_ENV) or os.path.expanduser(HOME_DEFAULT)
    return os.path.join(home, "jobs")


def job_dir(job_id: str) -> str:
    if not job_id or not all(c.isalnum() for c in job_id):
        fail(f"malformed job id {job_id!r}")
    return os.path.join(jobs_root(), job_id)


def files() -> types.ModuleType:  # jobfiles, shipped beside this script
    return sys.modules["jobfiles"]


def store() -> types.ModuleType:  # jobstore (aws: S3), shipped beside this script
    return sys.modules["jobstore"]


def shared_dir(cluster: str) -> str:
    """The cluster's shared directory on this (its first) host."""
    if not cluster or not all(c.isalnum() or c in "._-" for c in cluster) or \
            cluster.startswith("."):
        fail(f"malformed cluster name {cluster!r}")
    path = os.path.join(os.path.dirname(jobs_root()), "shared", cluster)
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def fail(message: str) -> None:
    sys.stderr.write(f"joblib-cloud (on host): {message}\n")
    sys.exit(ERROR_EXIT)


def read(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return None


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def alive(pid_text: str | None) -> bool:
    if not pid_text:
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie has exited: its parent just has not collected it yet.
    stat = read(f"/proc/{int(pid_text)}/stat")
    return not (stat and stat.rsplit(")", 1)[-1].split()[0] == "Z")


def read_exact(fd: int, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = os.read(fd, n - len(out))
        if not chunk:
            fail("the upload ended early")
        out += chunk
    return bytes(out)


# ------------------------------------------------------------------------- start


def op_start(job_id: str, python: str, command: str, options_json: str = "{}") -> None:
    """stdin: 8-byte length + joblib-cloud zip, then the workspace tar.gz.  ``options``:
    see ``jobs/control.py`` (``_prepare``) and ``jobs/siblings.py``; with ``follow``, the
    job's output follows this call's first line on the same channel."""
    options = json.loads(options_json)
    directory = job_dir(job_id)
    os.makedirs(jobs_root(), mode=0o700, exist_ok=True)
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        fail(f"job {job_id} already exists on this host")
    # The job imports the client's exact joblib-cloud, like the agent does.
    blob = read_exact(0, int.from_bytes(read_exact(0, LENGTH_PREFIX), "big"))
    agent_zip = files().save_agent_zip(os.path.dirname(jobs_root()), blob)
    files().read_tar(os.path.join(directory, "workspace"))
    files().save_manifest(directory)
    files().write_shims(os.path.join(directory, "bin"), python)
    if options.get("files"):
        files().write_cloud_files(directory, options["files"])
    if options.get("shared"):
        options["shared_dir"] = shared_dir(options["shared"])
    write_atomic(os.path.join(directory, "command.json"), json.dumps(
        {"command": command, "python": python, "agent_zip": agent_zip,
         "started": time.time(), **{k: v for k, v in options.items() if k != "files"}}))
    link_agent(directory)
    why = in_job(directory, "start") if options.get("probe") else None
    if why:  # the siblings cannot be reached: nothing starts
        shutil.rmtree(directory, ignore_errors=True)
        fail(why)
    try:
        store().on_start(directory, options)
    except Exception as exc:  # noqa: BLE001 - the job cannot start without its files
        shutil.rmtree(directory, ignore_errors=True)
        fail(f"bringing the shared directory up to date from S3 failed: {exc}")
    if os.fork() == 0:  # the supervisor: outlives this SSH channel
        os.setsid()
        try:
            write_atomic(os.path.join(directory, "supervisor_pid"), str(os.getpid()))
            supervise(directory)
        finally:
            os._exit(0)
    deadline = time.monotonic() + 30
    while read(os.path.join(directory, "pid")) is None and \
            read(os.path.join(directory, "exit_code")) is None:
        if time.monotonic() > deadline:
            fail(f"job {job_id} did not start: see {directory}/supervisor.log")
        time.sleep(0.01)
    print(json.dumps({"id": job_id, "dir": directory,
                      "pid": read(os.path.join(directory, "pid"))}), flush=True)
    if options.get("follow"):  # the first line says it started; then its output
        op_logs(job_id, "1")


def touch_activity() -> None:
    """What the on-VM watchdog reads (its mtime) to tell a busy machine from an idle one."""
    path = os.path.join(os.path.dirname(jobs_root()), ACTIVITY_FILE)
    with contextlib.suppress(OSError), open(path, "a"):
        os.utime(path)


@contextlib.contextmanager
def keeping_active() -> Iterator[None]:
    """The machine is busy in this block: a thread touches the activity file."""
    stop = threading.Event()

    def touch() -> None:
        while not stop.is_set():
            touch_activity()
            stop.wait(ACTIVITY_INTERVAL)

    toucher = threading.Thread(target=touch)
    toucher.start()
    try:
        yield
    finally:
        stop.set()
        toucher.join()


def finish(directory: str, spec: dict) -> list[str]:
    """After the command, before it counts as ended, still busy: problems, as messages."""
    with keeping_active():
        problems = [p for p in [in_job(directory, "end") if spec.get("probe") else None] if p]
        return problems + store().on_end(directory, spec)


def link_agent(directory: str) -> None:
    """``agent.sock`` -> this session's forwarded ssh-agent, for a job that uses it."""
    spec = json.loads(read(os.path.join(directory, "command.json")) or "{}")
    sock = os.environ.get("SSH_AUTH_SOCK")
    if spec.get("agent") and sock:
        link = os.path.join(directory, "agent.sock")
        tmp = f"{link}.{os.getpid()}"
        os.symlink(sock, tmp)
        os.replace(tmp, link)


def job_env(directory: str) -> dict:
    """The command's environment: the backend's python first on PATH, the client's
    joblib-cloud importable, and ``parallel_backend('cloud')`` set to the job's cluster
    (by default this machine's own cores)."""
    spec = json.loads(read(os.path.join(directory, "command.json")) or "{}")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("JOBLIB_CLOUD_") or k == HOME_ENV}
    cloud = os.path.join(directory, "cloud")
    env.update({k: v.replace("{cloud}", cloud)
                for k, v in (spec.get("env") or {"JOBLIB_CLOUD_PROVIDER": "local"}).items()})
    if spec.get("agent"):
        env["SSH_AUTH_SOCK"] = os.path.join(directory, "agent.sock")
    if spec.get("shared_dir"):
        env["JOBLIB_CLOUD_SHARED"] = spec["shared_dir"]
    env.update({
        "JOBLIB_CLOUD_JOB_ID": os.path.basename(directory),
        "PATH": os.path.join(directory, "bin") + os.pathsep + env.get("PATH", ""),
        "PYTHONPATH": os.pathsep.join(p for p in (spec["agent_zip"], env.get("PYTHONPATH"))
                                      if p),
        "PYTHONUNBUFFERED": "1",
    })
    return env


def in_job(directory: str, *args: str) -> str | None:
    """``jobs/probe.py ARGS`` in the job's environment: None, or why it failed."""
    return files().run_probe(job_env(directory), *args)


def supervise(directory: str) -> None:
    """Run the command in its own process group; record its pid and exit code."""
    null = os.open(os.devnull, os.O_RDWR)
    log = os.open(os.path.join(directory, "supervisor.log"),
                  os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    spec = json.loads(read(os.path.join(directory, "command.json")) or "{}")
    env, code = job_env(directory), 0
    try:
        with open(os.path.join(directory, "stdout.log"), "ab") as out, \
                open(os.path.join(directory, "stderr.log"), "ab") as err:
            command = files().after_boot_install(spec["command"], os.path.dirname(jobs_root()))
            proc = subprocess.Popen(["/bin/sh", "-c", command],
                                    cwd=os.path.join(directory, "workspace"), env=env,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True)
            write_atomic(os.path.join(directory, "pid"), str(proc.pid))
            keep, keeper = spec.get("keepalive"), None
            last = time.monotonic()
            while True:  # a running job is work: the VM's idle kill switch must wait
                touch_activity()
                if keep and time.monotonic() - last >= keep and \
                        (keeper is None or keeper.poll() is not None):
                    keeper, last = files().run_probe(env, "keep", wait=False), time.monotonic()
                try:
                    code = proc.wait(timeout=ACTIVITY_INTERVAL)
                    break
                except subprocess.TimeoutExpired:
                    continue
    except Exception as exc:  # noqa: BLE001 - recorded as the job's failure
        with open(os.path.join(directory, "stderr.log"), "a") as err:
            err.write(f"joblib-cloud: could not start the command: {exc}\n")
        code = 127
    problems = finish(directory, spec)  # aws: outputs saved before the machine may stop
    if problems:
        with open(os.path.join(directory, "stderr.log"), "a") as err:
            err.write("".join(f"joblib-cloud: {p}\n" for p in problems))
    files().remove_cloud_files(directory)
    write_atomic(os.path.join(directory, "exit_code"), str(128 - code if code < 0 else code))


# ------------------------------------------------------------------------- status


def state(job_id: str) -> dict:
    directory = job_dir(job_id)
    if not os.path.isdir(directory):
        return {"id": job_id, "state": "missing"}
    spec = json.loads(read(os.path.join(directory, "command.json")) or "{}")
    code = read(os.path.join(directory, "exit_code"))
    info = {"id": job_id, "command": spec.get("command"), "started": spec.get("started"),
            "pid": read(os.path.join(directory, "pid")), "exit_code": None}
    if code is not None:
        info["exit_code"] = int(code)
        if os.path.exists(os.path.join(directory, "cancelled")):
            info["state"] = "cancelled"
        else:
            info["state"] = "succeeded" if int(code) == 0 else "failed"
        info["finished"] = os.stat(os.path.join(directory, "exit_code")).st_mtime
    elif alive(read(os.path.join(directory, "supervisor_pid"))) or \
            alive(info["pid"]):
        info["state"] = "running"
    else:  # the supervisor died without a word: the machine rebooted, or a kill -9
        info["state"] = "lost"
        files().remove_cloud_files(directory)  # its key must not outlive it either
    return info


def op_status(*job_ids: str) -> None:
    for job_id in job_ids:
        print(json.dumps(state(job_id)), flush=True)


# ------------------------------------------------------------------------- output


def op_logs(job_id: str, follow: str = "0") -> None:
    """Copy stdout.log to stdout and stderr.log to stderr; with follow, until the job
    ends, then exit with its exit code."""
    directory = job_dir(job_id)
    if not os.path.isdir(directory):
        fail(f"no job {job_id} on this host")
    if follow == "1":
        link_agent(directory)  # a job that reaches its siblings uses this client's agent
    offsets = {1: 0, 2: 0}  # what was copied of stdout.log and stderr.log
    while True:
        finished = state(job_id)["state"] != "running"
        moved = False
        for fd, offset in offsets.items():
            path = os.path.join(directory, "stdout.log" if fd == 1 else "stderr.log")
            try:
                with open(path, "rb") as fh:
                    fh.seek(offset)
                    data = fh.read(1 << 20)
            except FileNotFoundError:
                continue
            if data:
                moved = True
                offsets[fd] += len(data)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
        if follow != "1" or (finished and not moved):
            break
        if not moved:
            time.sleep(0.05)
    if follow == "1":
        info = state(job_id)
        sys.exit(info["exit_code"] if info["exit_code"] is not None else ERROR_EXIT)


def op_cancel(job_id: str) -> None:
    """Stop the job's whole process group: SIGTERM, then SIGKILL after a grace period."""
    directory = job_dir(job_id)
    info = state(job_id)
    if info["state"] == "missing":
        fail(f"no job {job_id} on this host")
    if info["state"] != "running":
        print(json.dumps(info), flush=True)
        return
    write_atomic(os.path.join(directory, "cancelled"), str(time.time()))
    pid = int(info["pid"])
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + grace
        while state(job_id)["state"] == "running" and time.monotonic() < deadline:
            time.sleep(0.02)
        if state(job_id)["state"] != "running":
            break
    print(json.dumps(state(job_id)), flush=True)


def op_outputs(job_id: str, max_bytes: str, path: str = "") -> None:
    directory = job_dir(job_id)
    if not os.path.isdir(directory):
        fail(f"no job {job_id} on this host")
    files().op_outputs(directory, max_bytes, path)


OPS: dict[str, Callable[..., None]] = {
    "start": op_start, "status": op_status, "logs": op_logs, "cancel": op_cancel,
    "outputs": op_outputs}


def main(argv: list[str]) -> None:
    """``OP ARGS``; ``shared-* CLUSTER ARGS`` act on the cluster's shared directory."""
    shared = argv[0] if argv and argv[0].startswith("shared-") else None
    if not argv or argv[0] not in OPS and shared not in files().SHARED_OPS:
        fail(f"unknown operation {argv[:1]!r}; expected one of "
             f"{', '.join((*OPS, *files().SHARED_OPS))}")
    os.umask(0o077)  # job output and code are the user's alone
    try:
        if shared:
            files().SHARED_OPS[shared](shared_dir(argv[1]), *argv[2:])
        else:
            OPS[argv[0]](*argv[1:])
    except ValueError as exc:  # jobfiles' errors are messages for the user
        fail(str(exc))


if __name__ == "__main__":
    main(sys.argv[1:])
