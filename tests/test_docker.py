"""``image=`` on a real Docker engine: loopback sshd hosts whose logins reach a private
``dockerd`` (``DOCKER_HOST`` set by sshd, as a VM user's shell would have Docker), the
image pulled from a registry on loopback (tests/support/dockerengine.py).

The image is a Debian 12 root with a venv (``/opt/venv``) holding the client's packages
and one module the hosts' own Python lacks, so a task that imports it ran in the image.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import psutil
import pytest
from dockerengine import (
    MARKER_MODULE,
    MARKER_VALUE,
    VENV,
    Engine,
    engine_fixture,  # noqa: F401  (fixture)
    where_am_i,
)
from helpers import wait_until
from joblib import Parallel, delayed, parallel_backend
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sshfleet import SSHFleet

from joblib_cloud import DistributedPool
from joblib_cloud.client import registry
from joblib_cloud.config import resolve_config
from joblib_cloud.errors import HostConnectError

pytestmark = pytest.mark.slow  # the engine's first start builds the image (minutes)

MB = 2**20


@pytest.fixture(scope="module")
def docker_fleet(engine, tmp_path_factory):
    """Two hosts whose logins reach the engine; none has pulled the image yet."""
    fleet = SSHFleet(tmp_path_factory.mktemp("docker-fleet"), n=2,
                     env={"DOCKER_HOST": engine.host}).start()
    yield fleet
    registry.close_all()
    fleet.stop()


def _kwargs(fleet: SSHFleet, engine: Engine, **extra) -> dict:
    """The image's own python3 (its PATH has the venv first), not the test's."""
    return fleet.kwargs(image=engine.image, python=None, workers_per_host=2, **extra)


def test_the_agent_runs_inside_the_image_pulled_from_the_registry(engine, docker_fleet):
    host_python = subprocess.run([sys.executable, "-c", f"import {MARKER_MODULE}"],
                                 capture_output=True, text=True)
    assert host_python.returncode != 0 and "ModuleNotFoundError" in host_python.stderr
    assert not engine.has_image(engine.image)  # the hosts' engine must pull it

    kwargs = _kwargs(docker_fleet, engine, cluster="docker-where")
    with parallel_backend("cloud", **kwargs):
        out = Parallel(batch_size=1)(delayed(where_am_i)(i) for i in range(16))

    assert [o["i"] for o in out] == list(range(16))
    assert {o["prefix"] for o in out} == {VENV}
    assert {o["marker"] for o in out} == {MARKER_VALUE}
    assert {o["dockerenv"] for o in out} == {True}
    assert {o["uid"] for o in out} == {os.getuid()}  # --user: the login's own id
    assert {o["python"] for o in out} == {"3.11"}
    # Both hosts ran tasks, each with its own home mounted at the same path.
    assert {o["home"] for o in out} == {str(h.home) for h in docker_fleet.hosts}
    assert engine.has_image(engine.image)
    registry.get_cluster(resolve_config(**kwargs)).close()


def test_grid_search_and_pool_in_the_image_equal_the_sequential_run(engine, docker_fleet):
    X, y = make_classification(n_samples=300, n_features=8, n_informative=5,
                               random_state=0)

    def fit(n_jobs):
        return GridSearchCV(LogisticRegression(max_iter=500),
                            {"C": [0.01, 0.1, 1.0, 10.0]}, cv=3, n_jobs=n_jobs).fit(X, y)

    expected = fit(1)
    kwargs = _kwargs(docker_fleet, engine, cluster="docker-grid")
    with parallel_backend("cloud", **kwargs):
        actual = fit(-1)
    assert actual.best_params_ == expected.best_params_
    np.testing.assert_allclose(actual.cv_results_["mean_test_score"],
                               expected.cv_results_["mean_test_score"])

    with DistributedPool(**kwargs) as pool:
        assert pool.map(abs, range(-50, 50), chunksize=7) == [abs(i) for i in range(-50, 50)]
    registry.get_cluster(resolve_config(**kwargs)).close()


def mapped_cache_files(x: np.ndarray, i: int) -> tuple[float, list[str]]:
    with open("/proc/self/maps") as maps:
        files = {line.split()[5] for line in maps
                 if len(line.split()) >= 6 and "/cache/" in line.split()[5]}
    return float(x.sum()) + i, sorted(files)


def test_a_large_argument_is_cached_in_the_mounted_home(engine, docker_fleet):
    x = np.random.default_rng(7).random(4 * MB // 8)
    kwargs = _kwargs(docker_fleet, engine, cluster="docker-cache")
    with parallel_backend("cloud", **kwargs):
        out = Parallel(batch_size=1)(delayed(mapped_cache_files)(x, i) for i in range(12))
        cluster = registry.get_cluster(resolve_config(**kwargs))
        sent = {h.name: h.uploads.bytes_sent for h in cluster.hosts}
    assert [total for total, _ in out] == [float(x.sum()) + i for i in range(12)]
    files = {f for _, mapped in out for f in mapped}
    homes = [str(h.home) for h in docker_fleet.hosts]
    # Workers memory-map the argument from the cache under the VM's own home ...
    assert files and all(any(f.startswith(h + "/cache/") for h in homes) for f in files)
    # ... which the VM sees too: the files outlive the container's view of them.
    assert all(Path(f).exists() for f in files)
    assert all(n <= x.nbytes + MB for n in sent.values()), sent  # once per host
    cluster.close()


RUN_SCRIPT = """
import json, os, sys
from joblib import Parallel, delayed, parallel_backend
import joblib_cloud
import joblib_cloud_image_marker
with open("made-in-image.txt", "w") as fh:
    fh.write(joblib_cloud_image_marker.VALUE)
with parallel_backend("cloud"):  # one machine: its own cores, in this container
    prefixes = Parallel()(delayed(lambda: sys.prefix)() for i in range(4))
print(json.dumps({"prefix": sys.prefix, "cwd": os.getcwd(), "prefixes": prefixes,
                  "provider": os.environ.get("JOBLIB_CLOUD_PROVIDER"),
                  "agent": os.path.dirname(os.path.dirname(joblib_cloud.__file__))}))
"""


def test_run_executes_the_jobs_python_in_the_image(engine, docker_fleet, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "script.py").write_text(textwrap.dedent(RUN_SCRIPT))
    settings = _kwargs(docker_fleet, engine)
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBLIB_CLOUD_")}
    env.update({"JOBLIB_CLOUD_HOME": str(tmp_path / "client-home"),
                "JOBLIB_CLOUD_PROVIDER": "ssh",
                "JOBLIB_CLOUD_HOSTS": settings["hosts"][0],
                "JOBLIB_CLOUD_SSH_KEY": settings["ssh_key"],
                "JOBLIB_CLOUD_KNOWN_HOSTS": settings["known_hosts"],
                "JOBLIB_CLOUD_IMAGE": engine.image})
    proc = subprocess.run([sys.executable, "-m", "joblib_cloud", "run", "--", "python",
                           "script.py"], cwd=project, env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["prefix"] == VENV and seen["prefixes"] == [VENV] * 4
    assert seen["provider"] == "local"  # one machine: the job's backend is its cores
    home = docker_fleet.hosts[0].home
    workspace = Path(seen["cwd"])
    assert workspace.is_relative_to(home / "jobs")
    assert Path(seen["agent"]).is_relative_to(home)  # the client's code, shipped
    assert (workspace / "made-in-image.txt").read_text() == MARKER_VALUE


def total(x: np.ndarray, i: int) -> float:
    return float(x.sum()) + i


def test_two_clusters_on_one_host_keep_their_own_cached_arguments(engine, docker_fleet):
    """Each agent's cache directory is named by its process id, and an agent removes the
    directories of agents that are gone: ids must be the VM's, not each container's."""
    x = np.random.default_rng(11).random(4 * MB // 8)
    expected = [float(x.sum()) + i for i in range(6)]
    one = docker_fleet.hosts[:1]
    first = _kwargs(docker_fleet, engine, hosts=one, cluster="docker-first")
    second = _kwargs(docker_fleet, engine, hosts=one, cluster="docker-second")
    with parallel_backend("cloud", **first):
        assert Parallel(batch_size=1)(delayed(total)(x, i) for i in range(6)) == expected
    with parallel_backend("cloud", **second):
        assert Parallel()(delayed(abs)(-i) for i in range(6)) == list(range(6))
    registry.get_cluster(resolve_config(**second)).close()
    with parallel_backend("cloud", **first):  # x is still cached on the host: by reference
        assert Parallel(batch_size=1)(delayed(total)(x, i) for i in range(6)) == expected
    registry.get_cluster(resolve_config(**first)).close()


SPREAD_JOB = """
import json, os, sys, time
from joblib import Parallel, delayed, parallel_backend
import joblib_cloud  # noqa: F401  (registers the backend)

def where(i):
    import joblib_cloud_image_marker  # the image's packages on every machine
    time.sleep(1)  # one worker per host, two tasks at once: both hosts work
    return os.environ["JOBLIB_CLOUD_HOME"], sys.prefix

with parallel_backend("cloud"):
    seen = Parallel(n_jobs=2, batch_size=1)(delayed(where)(i) for i in range(4))
print(json.dumps({"homes": sorted({h for h, _ in seen}),
                  "prefixes": sorted({p for _, p in seen}),
                  "provider": os.environ["JOBLIB_CLOUD_PROVIDER"]}))
"""


@pytest.fixture
def ssh_agent(docker_fleet):
    """An ssh-agent of this test's own, holding the fleet's client key."""
    directory = tempfile.mkdtemp(prefix="jca-", dir="/tmp")  # socket paths are short
    sock = os.path.join(directory, "agent.sock")
    proc = subprocess.Popen(["ssh-agent", "-D", "-a", sock], stdout=subprocess.DEVNULL)
    try:
        wait_until(lambda: os.path.exists(sock), 10, "the ssh-agent's socket")
        subprocess.run(["ssh-add", "-q", str(docker_fleet.client_key)], check=True,
                       env={**os.environ, "SSH_AUTH_SOCK": sock})
        yield sock
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(directory, ignore_errors=True)


def test_run_n2_spreads_the_jobs_tasks_over_both_hosts_in_the_image(
        engine, docker_fleet, ssh_agent, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "spread.py").write_text(textwrap.dedent(SPREAD_JOB))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("JOBLIB_CLOUD_") and k != "SSH_AUTH_SOCK"}
    env.update({"JOBLIB_CLOUD_HOME": str(tmp_path / "client-home"),
                "JOBLIB_CLOUD_PROVIDER": "ssh",
                "JOBLIB_CLOUD_HOSTS": ",".join(h.spec for h in docker_fleet.hosts),
                "JOBLIB_CLOUD_SSH_KEY": str(docker_fleet.client_key),
                "JOBLIB_CLOUD_KNOWN_HOSTS": str(docker_fleet.known_hosts),
                "JOBLIB_CLOUD_WORKERS_PER_HOST": "1",
                "JOBLIB_CLOUD_IMAGE": engine.image, "SSH_AUTH_SOCK": ssh_agent})
    done = subprocess.run([sys.executable, "-m", "joblib_cloud", "run", "-n", "2", "--",
                           "python", "spread.py"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout.strip().splitlines()[-1])
    assert info["homes"] == sorted(str(h.home) for h in docker_fleet.hosts)
    assert info["prefixes"] == [VENV] and info["provider"] == "ssh"


HOLDING_CLIENT = """
import json, os, sys, time
from joblib import Parallel, delayed, parallel_backend
import joblib_cloud  # noqa: F401

def hold(i):
    held = os.path.join(os.environ["JOBLIB_CLOUD_HOME"], "held")
    os.makedirs(held, exist_ok=True)
    open(os.path.join(held, str(os.getpid())), "w").close()  # the VM's process id
    time.sleep(300)

with parallel_backend("cloud", **json.loads(sys.argv[1])):
    Parallel(batch_size=1)(delayed(hold)(i) for i in range(8))
"""


def test_a_killed_client_leaves_no_container_and_no_task_running(engine, docker_fleet,
                                                                  tmp_path):
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent(HOLDING_CLIENT))
    kwargs = _kwargs(docker_fleet, engine, cluster="docker-killed")
    proc = subprocess.Popen([sys.executable, str(script), json.dumps(kwargs)],
                            cwd=tmp_path, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    helds = [h.home / "held" for h in docker_fleet.hosts]
    try:
        wait_until(lambda: sum(len(list(d.glob("*"))) for d in helds if d.exists()) >= 4,
                   120, "tasks running in containers on both hosts")
        pids = [int(p.name) for d in helds for p in d.iterdir()]
        assert all(psutil.pid_exists(pid) for pid in pids)
        assert len(engine.docker("ps", "-q").stdout.split()) == 2  # one agent per host
        proc.kill()
        proc.wait(timeout=10)
        wait_until(lambda: not any(_alive(pid) for pid in pids), 60,
                   "the tasks to stop after the client was killed")
        wait_until(lambda: not engine.docker("ps", "-q").stdout.split(), 60,
                   "the agents' containers to go")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("problem", ["an image the registry lacks", "no such python in it"])
def test_an_agent_that_cannot_start_in_the_image_says_why_and_what_to_check(
        engine, docker_fleet, problem):
    if problem == "an image the registry lacks":
        settings = _kwargs(docker_fleet, engine, cluster="docker-missing")
        settings["image"] = engine.image.rsplit("/", 1)[0] + "/missing:1"
        docker_says = "manifest unknown"
    else:
        settings = _kwargs(docker_fleet, engine, cluster="docker-nopython")
        settings["python"] = "python9"
        docker_says = 'exec: "python9": executable file not found'
    try:
        with pytest.raises(HostConnectError) as info, parallel_backend("cloud", **settings):
            Parallel()(delayed(abs)(i) for i in range(2))
    finally:
        registry.close_all()
    message = str(info.value)
    assert f"did not start in image={settings['image']!r}" in message
    assert docker_says in message  # Docker's own words
    assert "Docker usable by the SSH user" in message and "inside the image" in message


LONG_JOB = """
import os, subprocess, time
child = subprocess.Popen(["sleep", "300"])
with open("pids.txt", "w") as fh:
    fh.write(f"{os.getpid()} {child.pid}")  # the VM's process ids
time.sleep(300)
"""


def test_cancel_stops_a_detached_job_and_its_container(engine, docker_fleet, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "long_job.py").write_text(textwrap.dedent(LONG_JOB))
    settings = _kwargs(docker_fleet, engine)
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBLIB_CLOUD_")}
    env.update({"JOBLIB_CLOUD_HOME": str(tmp_path / "client-home"),
                "JOBLIB_CLOUD_PROVIDER": "ssh",
                "JOBLIB_CLOUD_HOSTS": settings["hosts"][0],
                "JOBLIB_CLOUD_SSH_KEY": settings["ssh_key"],
                "JOBLIB_CLOUD_KNOWN_HOSTS": settings["known_hosts"],
                "JOBLIB_CLOUD_IMAGE": engine.image})

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "joblib_cloud", *args], cwd=project,
                              env=env, capture_output=True, text=True, timeout=120)

    started = cli("run", "--detach", "--", "python", "long_job.py")
    assert started.returncode == 0, started.stderr
    job_id = started.stdout.strip()
    pids_file = docker_fleet.hosts[0].home / "jobs" / job_id / "workspace" / "pids.txt"
    wait_until(lambda: pids_file.exists() and len(pids_file.read_text().split()) == 2, 60,
               "the job to start in its container")
    pids = [int(p) for p in pids_file.read_text().split()]
    assert all(_alive(pid) for pid in pids)
    assert len(engine.docker("ps", "-q").stdout.split()) == 1
    cancelled = cli("cancel", job_id)
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout, cancelled
    wait_until(lambda: not any(_alive(pid) for pid in pids), 30,
               "the job's processes to stop")
    wait_until(lambda: not engine.docker("ps", "-q").stdout.split(), 30,
               "the job's container to go")
