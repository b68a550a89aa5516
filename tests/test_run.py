"""``joblib-cloud run`` / ``jobs`` / ``logs`` / ``cancel``, as a user runs them: the real
command line in a subprocess, against ``local`` and the loopback sshd fleet."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import signal
import socket
import subprocess
import sys
import tarfile
import textwrap
import threading
from pathlib import Path

import psutil
import pytest
from awsmock import aws_fixture  # noqa: F401  (fixture)
from runjobs import cli, wait_for
from s3double import s3_fixture  # noqa: F401  (fixture: moto's S3 on loopback)

from joblib_cloud.jobs.workspace import WorkspaceTooLargeError, list_files, pack, walk_files

STREAMING_SCRIPT = """
import json, os, sys, time
print("first line", flush=True)
print("to stderr", file=sys.stderr, flush=True)
go = sys.argv[1]
deadline = time.monotonic() + 60
while not os.path.exists(go) and time.monotonic() < deadline:
    time.sleep(0.02)
files = sorted(os.path.relpath(os.path.join(d, f)) for d, _, fs in os.walk(".") for f in fs)
print(json.dumps(files))
sys.exit(int(sys.argv[2]))
"""

ENV_SCRIPT = """
import json, os, sys
from joblib import Parallel, delayed, parallel_backend
import joblib_cloud
from joblib_cloud.providers.aws import launch
with parallel_backend("cloud"):
    squares = Parallel()(delayed(pow)(i, 2) for i in range(4))
print(json.dumps({"executable": os.path.realpath(sys.executable),
                  "provider": os.environ.get("JOBLIB_CLOUD_PROVIDER"),
                  "squares": squares, "cwd": os.getcwd(),
                  "agent": os.path.dirname(os.path.dirname(joblib_cloud.__file__))}))
"""

LONG_JOB = """
import os, subprocess, sys, time
child = subprocess.Popen(["sleep", "300"])
with open("pids.txt", "w") as fh:
    fh.write(f"{os.getpid()} {child.pid}")
print("working", flush=True)
time.sleep(300)
"""


@pytest.fixture
def project(tmp_path) -> Path:
    """A git work tree with tracked, untracked and ignored files."""
    root = tmp_path / "project"
    (root / "pkg").mkdir(parents=True)
    (root / "data").mkdir()
    (root / "script.py").write_text(textwrap.dedent(STREAMING_SCRIPT))
    (root / "envcheck.py").write_text(textwrap.dedent(ENV_SCRIPT))
    (root / "long_job.py").write_text(textwrap.dedent(LONG_JOB))
    (root / "pkg" / "helper.py").write_text("X = 1\n")
    (root / "notes.txt").write_text("untracked but not ignored\n")
    (root / "data" / "big.csv").write_text("a,b\n1,2\n")
    (root / "secret.env").write_text("TOKEN=x\n")
    (root / ".gitignore").write_text("data/\n*.env\n")
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    subprocess.run(["git", "-C", str(root), "add", "script.py", "pkg/helper.py"], check=True)
    return root


def test_run_streams_output_copies_directory_and_passes_exit_code(target, project, tmp_path):
    go = tmp_path / "go"
    proc = subprocess.Popen(
        [sys.executable, "-m", "joblib_cloud", "run", "--", "python", "script.py", str(go),
         "3"], cwd=project, env=target["env"], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    guard = threading.Timer(120, proc.kill)  # a hung CLI fails the test, never hangs it
    guard.start()
    try:
        # Streamed live: the first line arrives while the command is still waiting.
        assert proc.stdout.readline() == "first line\n"
        assert proc.poll() is None
        go.touch()
        rest, err = proc.communicate(timeout=60)
    finally:
        guard.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 3, err
    assert err == "to stderr\n"  # not a terminal, not verbose: nothing of ours
    files = json.loads(rest.strip().splitlines()[-1])
    assert files == sorted([".gitignore", "envcheck.py", "long_job.py", "notes.txt",
                            "pkg/helper.py", "script.py"])
    # The copy really is on the host, without the ignored files.
    (record,) = (Path(target["env"]["JOBLIB_CLOUD_HOME"]) / "job-records").iterdir()
    workspace = target["host_jobs"] / record.stem / "workspace"
    assert (workspace / "pkg" / "helper.py").read_text() == "X = 1\n"
    assert not (workspace / "data").exists()
    assert not (workspace / "secret.env").exists()

    go.unlink()
    go.touch()
    done = cli(target, project, "run", "--", "python", "script.py", str(go), "0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("first line\n")


def test_job_uses_backend_python_and_local_cores(target, project):
    done = cli(target, project, "run", "--", "python envcheck.py")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout.strip().splitlines()[-1])
    assert info["executable"] == os.path.realpath(sys.executable)
    assert info["provider"] == "local"
    assert info["squares"] == [0, 1, 4, 9]
    assert info["cwd"].startswith(str(target["host_jobs"]))
    # The job imports the client's joblib-cloud (shipped with it), not whatever is there.
    assert Path(info["agent"]).parent == target["host_jobs"].parent / "agent"


def test_detach_jobs_logs_cancel(target, project):
    started = cli(target, project, "run", "--detach", "--", "python", "long_job.py")
    assert started.returncode == 0, started.stderr
    job_id = started.stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{8}", job_id), started.stdout

    pids_file = target["host_jobs"] / job_id / "workspace" / "pids.txt"
    pids = [int(p) for p in wait_for(lambda: pids_file.exists() and pids_file.read_text(),
                                     what="the job to start").split()]
    assert all(psutil.pid_exists(pid) for pid in pids)

    listing = cli(target, project, "jobs")
    assert listing.returncode == 0, listing.stderr
    line = next(row for row in listing.stdout.splitlines() if row.startswith(job_id))
    assert "running" in line.split() and "long_job.py" in line

    logs = wait_for(lambda: "working" in (out := cli(target, project, "logs", job_id[:5]))
                    .stdout and out, what="the job's output")
    assert logs.returncode == 0

    # A running job keeps the host's activity file fresh, so the VM's idle watchdog waits.
    activity = target["host_jobs"].parent / "activity"
    first = wait_for(lambda: activity.exists() and activity.stat().st_mtime,
                     what="the activity file")
    wait_for(lambda: activity.stat().st_mtime > first, timeout=20,
             what="the activity file to be touched again")

    cancelled = cli(target, project, "cancel", job_id)
    assert cancelled.returncode == 0, cancelled.stderr
    assert "cancelled" in cancelled.stdout
    # The whole process group is gone: the script and the child it started.
    wait_for(lambda: not any(psutil.pid_exists(pid) and
                             psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                             for pid in pids), what="the job's processes to die")

    line = next(row for row in cli(target, project, "jobs").stdout.splitlines()
                if row.startswith(job_id))
    assert line.split()[1:3] == ["cancelled", "143"]
    # Following a finished job prints its output and exits with its code.
    followed = cli(target, project, "logs", "--follow", job_id)
    assert followed.returncode == 143
    assert "working" in followed.stdout


def test_ctrl_c_on_an_attached_run_cancels_the_job(target, project):
    proc = subprocess.Popen([sys.executable, "-m", "joblib_cloud", "run", "--", "python",
                             "long_job.py"], cwd=project, env=target["env"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    guard = threading.Timer(120, proc.kill)  # a hung CLI fails the test, never hangs it
    guard.start()
    try:
        assert proc.stdout.readline() == "working\n"
        (record,) = (Path(target["env"]["JOBLIB_CLOUD_HOME"]) / "job-records").iterdir()
        pids_file = target["host_jobs"] / record.stem / "workspace" / "pids.txt"
        pids = [int(p) for p in pids_file.read_text().split()]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        guard.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    assert f"cancelled job {record.stem}" in err
    wait_for(lambda: not any(psutil.pid_exists(pid) and
                             psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                             for pid in pids), what="the job's processes to die")


def test_jobs_lists_an_unreachable_host_without_failing(target, project, tmp_path):
    started = cli(target, project, "run", "--detach", "--", "true")
    assert started.returncode == 0, started.stderr
    records = Path(target["env"]["JOBLIB_CLOUD_HOME"]) / "job-records"
    gone = json.loads((records / f"{started.stdout.strip()}.json").read_text())
    with socket.socket() as s:  # a loopback port nobody listens on: a terminated VM
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gone.update(id="0badc0de", provider="ssh", address="127.0.0.1", port=port,
                user="nobody", host=f"nobody@127.0.0.1:{port}")
    (records / "0badc0de.json").write_text(json.dumps(gone))
    listing = cli(target, project, "jobs")
    assert listing.returncode == 0, listing.stderr
    rows = {row.split()[0]: row.split() for row in listing.stdout.splitlines()[1:]}
    assert rows["0badc0de"][1] == "unreachable"
    assert rows[started.stdout.strip()][1:3] == ["succeeded", "0"]


def test_local_records_are_private(target, project):
    started = cli(target, project, "run", "--detach", "--", "true")
    assert started.returncode == 0, started.stderr
    record = Path(target["env"]["JOBLIB_CLOUD_HOME"]) / "job-records" / \
        f"{started.stdout.strip()}.json"
    assert record.stat().st_mode & 0o777 == 0o600
    unknown = cli(target, project, "logs", "ffffffff")
    assert unknown.returncode == 1
    assert "no job 'ffffffff'" in unknown.stderr and "joblib-cloud jobs" in unknown.stderr


def test_size_cap_refuses_with_advice(target, project):
    (project / "model.bin").write_bytes(os.urandom(300_000))
    jobs_before = set(target["host_jobs"].glob("*"))
    done = cli(target, project, "run", "--max-upload", "200k", "--", "true")
    assert done.returncode == 1
    assert "over the 204.8 kB cap" in done.stderr
    assert "model.bin" in done.stderr and ".gitignore" in done.stderr
    assert set(target["host_jobs"].glob("*")) == jobs_before
    assert not (Path(target["env"]["JOBLIB_CLOUD_HOME"]) / "job-records").exists()


def test_no_command_is_a_clear_error(target, project):
    done = cli(target, project, "run")
    assert done.returncode == 2  # ConfigError
    assert "nothing to run" in done.stderr


def test_missing_host_python_is_a_clear_error(target, project):
    env = {**target["env"], "JOBLIB_CLOUD_PYTHON": "/nonexistent/python3"}
    done = cli({**target, "env": env}, project, "run", "--", "true")
    assert done.returncode == 1
    assert "/nonexistent/python3" in done.stderr and "Set python=" in done.stderr


def test_progress_stage_lines_on_a_terminal_or_when_verbose(target, project):
    verbose = cli({**target, "env": {**target["env"], "JOBLIB_CLOUD_VERBOSE": "1"}},
                  project, "run", "--", "true")
    assert verbose.returncode == 0, verbose.stderr
    assert re.search(r"joblib-cloud: packed 6 files \(.* kB\)", verbose.stderr)
    assert re.search(r"joblib-cloud: created new job [0-9a-f]{8} on ", verbose.stderr)

    primary, secondary = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "joblib_cloud", "run", "--", "true"],
                                cwd=project, env=target["env"], stdout=subprocess.PIPE,
                                stderr=secondary)
        guard = threading.Timer(120, proc.kill)  # a hung CLI fails the test, never hangs it
        guard.start()
        os.close(secondary)
        seen = b""
        while True:  # the terminal's output, until the command closes it
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # EIO: every writer is gone
                break
            if not chunk:
                break
            seen += chunk
        assert proc.wait(timeout=60) == 0
        guard.cancel()
    finally:
        os.close(primary)
    text = seen.decode()
    assert "\rpacked 6 files" in text  # a live line, rewritten in place
    assert re.search(r"\rcreated new job [0-9a-f]{8} on .*\n", text)


# ----------------------------------------------------------------- workspace selection


def test_fallback_walk_honours_gitignore_without_git(tmp_path):
    root = tmp_path / "plain"
    (root / "src" / "__pycache__").mkdir(parents=True)
    (root / "out").mkdir()
    (root / "src" / "a.py").write_text("")
    (root / "src" / "__pycache__" / "a.cpython-311.pyc").write_text("")
    (root / "src" / "local.log").write_text("")
    (root / "src" / ".gitignore").write_text("/local.log\n")
    (root / "out" / "result.txt").write_text("")
    (root / "keep.log").write_text("")
    (root / "x.tmp").write_text("")
    (root / ".gitignore").write_text("# comment\nout/\n*.tmp\n")
    assert walk_files(root) == [".gitignore", "keep.log", "src/.gitignore", "src/a.py"]
    assert list_files(root) == walk_files(root)  # not a git work tree


def test_symlinks_inside_are_kept_outside_are_skipped(tmp_path, caplog):
    root = tmp_path / "ws"
    root.mkdir()
    (root / "real.txt").write_text("x")
    (root / "inner").symlink_to("real.txt")
    (root / "outer").symlink_to(tmp_path)
    (root / "passwd").symlink_to("/etc/passwd")
    workspace = pack(root)
    assert workspace.files == ("inner", "real.txt")
    assert "not copying 2 symlink(s)" in caplog.text and "passwd" in caplog.text
    with tarfile.open(fileobj=io.BytesIO(workspace.archive)) as tar:
        assert tar.getmember("inner").issym()
        tar.extractall(tmp_path / "out", filter="data")  # what the host does
    assert (tmp_path / "out" / "inner").read_text() == "x"


def test_pack_lists_largest_files_when_over_cap(tmp_path):
    (tmp_path / "small.txt").write_text("x")
    (tmp_path / "huge.npy").write_bytes(b"\0" * 5000)
    with pytest.raises(WorkspaceTooLargeError, match=r"huge\.npy \(5\.0 kB\)"):
        pack(tmp_path, max_bytes=4000)
    assert pack(tmp_path, max_bytes=6000).files == ("huge.npy", "small.txt")


# ----------------------------------------------------------------- aws path


class FleetHandle:
    """What ``launch.ensure_cluster`` returns, for machines that are the sshd fleet:
    the aws provider is EC2 provisioning + the ssh path, and this tests the ssh part."""

    def __init__(self, fleet, port: int | None = None) -> None:
        from joblib_cloud.client.hosts import parse_host

        host = fleet.hosts[2]
        spec = parse_host(f"{host.user}@{host.address}:{port or host.port}")
        self.specs = [spec]
        self.ssh_key = str(fleet.client_key)
        self.known_hosts = str(fleet.known_hosts)
        self.python = sys.executable
        self.connect_timeout = 2.0
        self.vcpus = 2
        self.aborted = False
        self.region = "us-east-1"  # where the job's outputs are saved (S3: moto)

    def abort(self) -> None:
        self.aborted = True

    def boot_check(self, spec) -> None:
        return None  # these hosts are up already

    def timeout_advice(self) -> str:
        return ""

    def close_metadata(self, instance_ids=None) -> None:
        pass


def test_run_on_aws_goes_through_the_provisioned_machine(fleet, project, tmp_path, s3,
                                                         monkeypatch, capfd):
    from joblib_cloud import cli
    from joblib_cloud.providers.aws import launch

    handle = FleetHandle(fleet)
    seen: list = []
    monkeypatch.setattr(launch, "ensure_cluster",
                        lambda config, progress: seen.append(config) or handle)
    monkeypatch.setenv("JOBLIB_CLOUD_HOME", str(tmp_path / "client-home"))
    monkeypatch.chdir(project)
    go = tmp_path / "go"
    go.touch()
    code = cli.main(["run", "--provider", "aws", "-i", "C2", "--cluster", "exp1", "--",
                     "python", "script.py", str(go), "5"])
    out, err = capfd.readouterr()
    assert code == 5, err
    assert out.startswith("first line\n") and "to stderr" in err
    assert (seen[0].provider, seen[0].instance, seen[0].cluster) == ("aws", "C2", "exp1")
    assert not handle.aborted
    (record,) = (tmp_path / "client-home" / "job-records").iterdir()
    assert (fleet.hosts[2].home / "jobs" / record.stem / "workspace" / "script.py").exists()
    assert json.loads(record.read_text())["python"] == sys.executable  # the VM's venv


def test_run_on_aws_terminates_a_machine_it_cannot_reach(fleet, project, tmp_path,
                                                          monkeypatch):
    from joblib_cloud import HostConnectError
    from joblib_cloud.config import resolve_config
    from joblib_cloud.jobs import control
    from joblib_cloud.providers.aws import launch

    with socket.socket() as s:
        s.bind(("127.0.0.4", 0))
        dead_port = s.getsockname()[1]
    handle = FleetHandle(fleet, port=dead_port)
    monkeypatch.setattr(launch, "ensure_cluster", lambda config, progress: handle)
    monkeypatch.setenv("JOBLIB_CLOUD_HOME", str(tmp_path / "client-home"))
    with pytest.raises(HostConnectError, match="unreachable"):
        control.start(resolve_config(provider="aws"), ["true"], root=project)
    assert handle.aborted
