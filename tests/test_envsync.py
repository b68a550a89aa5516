"""Environment sync: mismatched hosts are refused before any task runs, and
modules that exist only in the client's working directory still work in tasks."""

from __future__ import annotations

import importlib
import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import cloudpickle
import pytest
from joblib import Parallel, delayed, parallel_backend

from joblib_cloud import DistributedPool, EnvironmentMismatchError


def fake_python(tmp_path: Path, patch: str) -> str:
    """A wrapper that runs this interpreter with a ``sitecustomize`` applying ``patch``:
    a host whose Python reports other versions, with no special case in product code."""
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / "sitecustomize.py").write_text(textwrap.dedent(patch))
    wrapper = tmp_path / "python-wrapper"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={site_dir} exec {sys.executable} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return str(wrapper)


OTHER_CLOUDPICKLE = """
    import importlib.metadata as md
    _real = md.version
    def version(name):
        return "0.0.1" if name == "cloudpickle" else _real(name)
    md.version = version
"""
OTHER_PYTHON = """
    import platform
    platform.python_version = lambda: "3.1.0"
"""
OTHER_JOBLIB = """
    import importlib.metadata as md
    _real = md.version
    def version(name):
        return "0.9.9" if name == "joblib" else _real(name)
    md.version = version
"""


def write_marker(path: str) -> str:
    Path(path).write_text("ran")
    return path


@pytest.mark.parametrize("patch, words", [
    (OTHER_CLOUDPICKLE, ["cloudpickle 0.0.1", f"cloudpickle=={cloudpickle.__version__}"]),
    (OTHER_PYTHON, ["Python 3.1.0", "python="]),
])
@pytest.mark.parametrize("provider", ["local", "ssh"])
def test_version_mismatch_is_refused_before_any_task_runs(fleet, tmp_path, patch, words,
                                                           provider):
    python = fake_python(tmp_path, patch)
    settings = (fleet.kwargs(python=python, hosts=fleet.hosts[:1]) if provider == "ssh"
                else {"provider": "local", "python": python})
    marker = tmp_path / "marker"
    with pytest.raises(EnvironmentMismatchError) as info, \
            parallel_backend("cloud", **settings):
        Parallel()(delayed(write_marker)(str(marker)) for _ in range(2))
    for word in words:
        assert word in str(info.value)
    with pytest.raises(EnvironmentMismatchError):
        DistributedPool(**settings).map(write_marker, [str(marker)])
    assert not marker.exists(), "a task ran on a host that should have been refused"


def test_other_package_version_warns_and_runs(fleet, tmp_path):
    python = fake_python(tmp_path, OTHER_JOBLIB)
    marker = tmp_path / "marker"
    with pytest.warns(RuntimeWarning, match="joblib 0.9.9"):
        with DistributedPool(**fleet.kwargs(python=python, hosts=fleet.hosts[:1])) as pool:
            assert pool.map(write_marker, [str(marker)]) == [str(marker)]
    assert marker.read_text() == "ran"


def host_can_import(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def uses_module(module):
    """A task that refers to the module object (as ``import mymod_xyz`` at the top of a
    user's script makes every function do)."""
    return lambda x: (module.triple(x), os.getcwd())


@pytest.fixture
def cwd_module(tmp_path, monkeypatch):
    """``mymod_xyz.py`` exists only in the client's working directory."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "mymod_xyz.py").write_text("def triple(x):\n    return 3 * x\n")
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(work))
    monkeypatch.delitem(sys.modules, "mymod_xyz", raising=False)
    yield work, importlib.import_module("mymod_xyz")
    sys.modules.pop("mymod_xyz", None)


def test_module_only_in_client_cwd_is_usable_in_tasks(fleet, cwd_module):
    work, module = cwd_module
    settings = fleet.kwargs()
    with DistributedPool(**settings) as pool:
        # The hosts really cannot import it: it has to travel with the task.
        assert pool.map(host_can_import, ["mymod_xyz", "json"]) == [False, True]
        assert pool.map(module.triple, range(4)) == [0, 3, 6, 9]
        results = pool.map(uses_module(module), range(6))
    assert [r for r, _ in results] == [0, 3, 6, 9, 12, 15]
    assert all(cwd != str(work) for _, cwd in results)
    with parallel_backend("cloud", **settings):
        out = Parallel()(delayed(module.triple)(i) for i in range(4))
    assert out == [0, 3, 6, 9]


# ----------------------------------------------------------------- image= (Docker)

FAKE_DOCKER = """\
import json, os, sys
# Stands in for `docker run` (no Docker engine in tests): records its arguments, applies
# -e/-w/-v as Docker would, then runs the command that follows the image.
args = sys.argv[1:]
with open(os.environ["FAKE_DOCKER_LOG"], "a") as fh:
    fh.write(json.dumps(args) + "\\n")
assert args[0] == "run", args
env, cwd, i = dict(os.environ), None, 1
while args[i].startswith("-"):
    if args[i] in ("--network", "--ipc", "--pid", "--user", "-v", "-e", "-w"):
        opt, value = args[i], args[i + 1]
        i += 2
        if opt == "-e" and "=" in value:
            env[value.split("=", 1)[0]] = value.split("=", 1)[1]
        elif opt == "-w":
            cwd = value
        elif opt == "-v":
            src, dst = value.split(":")
            assert src == dst and os.path.isdir(src), value
    else:
        i += 1
env["FAKE_DOCKER_IMAGE"] = args[i]
if cwd:
    os.chdir(cwd)
os.execvpe(args[i + 1], args[i + 1:], env)
"""


@pytest.fixture
def fake_docker(tmp_path) -> dict:
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    docker = bin_dir / "docker"
    docker.write_text(f"#!{sys.executable}\n{FAKE_DOCKER}")
    docker.chmod(0o755)
    log = tmp_path / "docker.log"
    return {"log": log, "env": {"PATH": f"{bin_dir}:{os.environ['PATH']}",
                                "FAKE_DOCKER_LOG": str(log),
                                "JOBLIB_CLOUD_HOME": str(tmp_path / "vm-home")}}


def where_am_i() -> tuple[str | None, str]:
    return os.environ.get("FAKE_DOCKER_IMAGE"), os.environ["JOBLIB_CLOUD_HOME"]


def test_docker_command_line():
    from joblib_cloud.jobs.docker import check_image, docker_python

    command = docker_python("ghcr.io/me/model:1.2", "/opt/py/bin/python3")
    assert command.startswith("sh -c ") and command.endswith(" joblib-cloud-docker")
    assert "docker run --rm -i --network host --ipc host --pid host" in command
    assert "ghcr.io/me/model:1.2 /opt/py/bin/python3 \"$@\"" in command
    assert '-v "$H:$H"' in command and "-w" not in command
    assert '-w "$PWD"' in docker_python("img", mount_cwd=True)
    assert "img python3" in docker_python("img")
    for bad in ("img; rm -rf ~", "$(reboot)", "a b", ""):
        with pytest.raises(ValueError, match="invalid Docker image"):
            check_image(bad)


def test_agent_starts_inside_the_image(fake_docker):
    """The exact command the ssh provider sends, run by a shell with `docker` on PATH."""
    from joblib_cloud.client.batch import Batch
    from joblib_cloud.client.cluster import Cluster
    from joblib_cloud.client.session import HostSession
    from joblib_cloud.client.streams import LocalAgent
    from joblib_cloud.config import resolve_config
    from joblib_cloud.jobs.docker import docker_python
    from joblib_cloud.wire.serialization import dumps_batch, register_local_modules

    config = resolve_config(provider="local", workers_per_host=1)
    python = docker_python("python:3.11-slim", sys.executable)
    cluster = Cluster(config)
    session = HostSession(cluster, "vm", lambda on_stderr: LocalAgent(
        "vm", python, on_stderr, env=fake_docker["env"]))
    try:
        session.handshake(config)
        cluster.attach([session])
        register_local_modules()
        payload, refs = dumps_batch(where_am_i, cluster.store)
        future = cluster.submit(Batch(payload, frozenset(refs), "probe", owner=object()))
        image, home = future.result(timeout=60)
    finally:
        cluster.close()
    assert image == "python:3.11-slim"
    assert home == fake_docker["env"]["JOBLIB_CLOUD_HOME"]
    args = json.loads(fake_docker["log"].read_text().splitlines()[0])
    assert args[:3] == ["run", "--rm", "-i"]
    assert f"{os.getuid()}:{os.getgid()}" in args
    assert args[-3:-1] == ["-u", "-c"]  # the bootstrap reached python intact


def test_job_python_runs_inside_the_image(fake_docker, tmp_path):
    from joblib_cloud.host import jobfiles
    from joblib_cloud.jobs.docker import docker_python

    bin_dir, workspace = tmp_path / "bin", tmp_path / "ws"
    workspace.mkdir()
    jobfiles.write_shims(str(bin_dir), docker_python("img:2", sys.executable, mount_cwd=True))
    env = {**fake_docker["env"], "JOBLIB_CLOUD_PROVIDER": "local"}
    out = subprocess.run([str(bin_dir / "python"), "-c",
                          "import json, os; print(json.dumps([os.getcwd(), "
                          "os.environ.get('FAKE_DOCKER_IMAGE')]))"],
                         cwd=workspace, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [str(workspace), "img:2"]
    args = json.loads(fake_docker["log"].read_text().splitlines()[0])
    assert ["-w", str(workspace)] == args[args.index("-w"):args.index("-w") + 2]
    assert ["-e", "JOBLIB_CLOUD_PROVIDER"] == args[args.index("JOBLIB_CLOUD_PROVIDER") - 1:
                                                   args.index("JOBLIB_CLOUD_PROVIDER") + 1]
