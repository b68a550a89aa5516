"""A provider defined only here, registered with ``provisioner.register_provider``, works
everywhere a built-in one does: the backend, DistributedPool, ``run`` and ``run -n 2``,
outputs, the shared directory, ``status`` and ``down``.  No line of product code names it
(the last test checks).

Its machines are loopback sshd hosts (``tests/support/sshfleet.py``) that ``ensure`` starts when
they are not running and ``down`` stops, as a cloud launches and terminates VMs; a job's
machine reaches its siblings with a key file the fleet hands the job (as aws does), not
with a forwarded ssh-agent.  docs/architecture.md walks through this file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import psutil
import pytest
from joblib import Parallel, delayed, parallel_backend
from sshfleet import SSHFleet

import joblib_cloud
from joblib_cloud import DistributedPool, cli, provisioner
from joblib_cloud.client import registry
from joblib_cloud.client.hosts import parse_host
from joblib_cloud.client.progress import Progress
from joblib_cloud.config import CloudConfig
from joblib_cloud.jobs.siblings import JobCluster
from joblib_cloud.providers.ssh import host_names, job_env, known_hosts_lines
from joblib_cloud.provisioner import Fleet, HostTarget, Out, Provider

NAME = "testbed"


class TestbedFleet(Fleet):
    """The machines of one ``ensure``.  ``run -n N``: the job's backend logs in to its
    siblings with the fleet's key, given to the job as a file of its own (removed when it
    ends)."""

    __test__ = False  # not a test class, despite its name
    key: Path

    def job_cluster(self, config: CloudConfig, python: str, detach: bool,
                    common: dict[str, str]) -> JobCluster:
        hosts = host_names(self)
        env = {**job_env(hosts, python, config, common),
               "JOBLIB_CLOUD_SSH_KEY": "{cloud}/id_job"}
        return JobCluster(env, {"known_hosts": known_hosts_lines(self),
                                "id_job": self.key.read_text()},
                          probe=True, hosts=hosts)


class TestbedProvider(Provider):
    """Machines = the loopback sshd hosts of :attr:`machines`, started on demand."""

    __test__ = False
    machines: SSHFleet

    def ensure(self, config: CloudConfig, progress: Progress) -> Fleet:
        chosen = self.machines.hosts[:config.n]
        for host in chosen:
            if host.proc is None:
                progress.update(f"starting {host.address}")
                host.start()
        self.machines.write_known_hosts()
        key, known = str(self.machines.client_key), str(self.machines.known_hosts)
        fleet = TestbedFleet([HostTarget(h.spec, parse_host(h.spec), key, known)
                              for h in chosen],
                             python=sys.executable, workers_per_host=config.workers_per_host)
        fleet.key = self.machines.client_key
        return fleet

    def status(self, config: CloudConfig, args: argparse.Namespace, out: Out) -> int:
        for host in self.machines.hosts:
            out(f"{host.address}: {'running' if host.proc is not None else 'stopped'}")
        return 0

    def down(self, config: CloudConfig, args: argparse.Namespace, out: Out) -> int:
        running = [h for h in self.machines.hosts if h.proc is not None]
        for host in running:
            host.kill()
        out(f"stopped {len(running)} machine(s)")
        return 0


@pytest.fixture(scope="module")
def machines(tmp_path_factory):
    fleet = SSHFleet(tmp_path_factory.mktemp("testbed"), n=2)  # not started: ensure does
    TestbedProvider.machines = fleet
    provisioner.register_provider(NAME, TestbedProvider)
    yield fleet
    registry.close_all()
    fleet.stop()
    del provisioner.PROVIDERS[NAME]


@pytest.fixture
def settings(machines, monkeypatch, tmp_path) -> dict[str, str]:
    """The provider as a user would pick it: settings in the environment."""
    env = {"JOBLIB_CLOUD_PROVIDER": NAME, "JOBLIB_CLOUD_N": "2",
           "JOBLIB_CLOUD_PYTHON": sys.executable, "JOBLIB_CLOUD_WORKERS_PER_HOST": "1",
           "JOBLIB_CLOUD_CLUSTER": "tb", "JOBLIB_CLOUD_HOME": str(tmp_path / "client-home")}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    return env


def test_the_backend_and_the_pool_run_on_its_machines(settings, machines):
    with parallel_backend("cloud"):
        got = Parallel(batch_size=1)(delayed(pow)(i, 3, 1000) for i in range(40))
        # Each host's sshd sets its own JOBLIB_CLOUD_HOME.
        homes = Parallel(batch_size=1)(delayed(os.getenv)("JOBLIB_CLOUD_HOME")
                                       for _ in range(40))
    assert got == [pow(i, 3, 1000) for i in range(40)]
    assert set(homes) <= {str(h.home) for h in machines.hosts}
    assert all(h.proc is not None for h in machines.hosts)  # ensure started both
    with DistributedPool() as pool:
        assert pool.map(abs, range(-10, 10)) == [abs(i) for i in range(-10, 10)]


SPREAD = """
import json, os, sys, time
from joblib import Parallel, delayed, parallel_backend
import joblib_cloud  # noqa: F401

def where(i, marks):
    home = os.environ["JOBLIB_CLOUD_HOME"]
    open(os.path.join(marks, home.replace("/", "_")), "w").close()
    deadline = time.monotonic() + 60
    while len(os.listdir(marks)) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    return home

with parallel_backend("cloud"):
    homes = Parallel(n_jobs=2, batch_size=1)(delayed(where)(i, sys.argv[1]) for i in range(4))
os.makedirs("out", exist_ok=True)
with open(os.path.join(os.environ["JOBLIB_CLOUD_SHARED"], "note.txt")) as f:
    note = f.read()
with open("out/result.json", "w") as f:
    json.dump({"homes": sorted(set(homes)), "note": note}, f)
"""


def test_run_n2_reaches_its_siblings_with_outputs_and_the_shared_directory(
        settings, machines, tmp_path, capfd):
    (tmp_path / "spread.py").write_text(SPREAD)
    (tmp_path / "note.txt").write_text("from the client")
    marks = tmp_path / "marks"
    marks.mkdir()
    assert cli.main(["shared", "put", str(tmp_path / "note.txt")]) == 0
    assert cli.main(["shared", "ls"]) == 0
    assert "note.txt" in capfd.readouterr().out
    into = tmp_path / "got"
    code = cli.main(["run", "-n", "2", "--output", "out", "--into", str(into), "--",
                     "python", "spread.py", str(marks)])
    err = capfd.readouterr().err
    assert code == 0, err
    result = json.loads((into / "out" / "result.json").read_text())
    # Tasks ran on both machines, each only able to finish once the other had one.
    assert result == {"homes": sorted(str(h.home) for h in machines.hosts),
                      "note": "from the client"}
    (record,) = (Path(settings["JOBLIB_CLOUD_HOME"]) / "job-records").iterdir()
    assert json.loads(record.read_text())["provider"] == NAME
    job_dir = machines.hosts[0].home / "jobs" / record.stem
    assert not any(p.name == "id_job" for p in job_dir.rglob("*"))  # the key went with it


def test_run_on_one_machine_passes_the_exit_code_through(settings, machines, tmp_path,
                                                         capfd):
    (tmp_path / "job.py").write_text(
        "import os, sys\nprint('on', os.environ['JOBLIB_CLOUD_HOME'],\n"
        "      os.environ['JOBLIB_CLOUD_PROVIDER'])\nsys.exit(7)\n")
    assert cli.main(["run", "-n", "1", "--", "python", "job.py"]) == 7
    out = capfd.readouterr().out
    # The job's own backend uses its machine's cores.
    assert f"on {machines.hosts[0].home} local" in out


def test_status_and_down_act_on_its_machines(settings, machines, capfd):
    with parallel_backend("cloud"):
        assert Parallel()(delayed(abs)(-i) for i in range(4)) == [0, 1, 2, 3]
    registry.close_all()
    assert cli.main(["status"]) == 0
    assert capfd.readouterr().out.count(": running") == 2
    pids = [h.proc.pid for h in machines.hosts]
    assert cli.main(["down", "--yes"]) == 0
    assert "stopped 2 machine(s)" in capfd.readouterr().out
    assert not [pid for pid in pids if psutil.pid_exists(pid)
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert cli.main(["status"]) == 0
    assert capfd.readouterr().out.count(": stopped") == 2
    # The cluster's handle describes it through the same interface.
    assert joblib_cloud.status().text().startswith(f"cluster 'tb' ({NAME})")


def test_no_product_code_names_it(machines):
    package = Path(joblib_cloud.__file__).parent
    assert not [p for p in package.rglob("*.py") if NAME in p.read_text()]
    assert type(provisioner.provider(NAME)) is TestbedProvider
