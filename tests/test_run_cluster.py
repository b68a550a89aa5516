"""``joblib-cloud run -n N``: inside the job, ``parallel_backend('cloud')`` spans every
machine of the cluster.  Real CLI in a subprocess, real sshd hosts; on ``ssh`` the job's
machine logs in to its siblings with the client's ssh-agent, forwarded over the job's
own connection."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from helpers import wait_until
from runjobs import SPREAD_JOB
from sshfleet import SSHD, SSHHost


@pytest.fixture
def project(tmp_path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    (root / "spread.py").write_text(textwrap.dedent(SPREAD_JOB))
    return root


@pytest.fixture
def ssh_agent(fleet):
    """An ssh-agent of this test's own, holding the fleet's client key."""
    directory = tempfile.mkdtemp(prefix="jca-", dir="/tmp")  # socket paths are short
    sock = os.path.join(directory, "agent.sock")
    proc = subprocess.Popen(["ssh-agent", "-D", "-a", sock], stdout=subprocess.DEVNULL)
    try:
        wait_until(lambda: os.path.exists(sock), 10, "the ssh-agent's socket")
        subprocess.run(["ssh-add", "-q", str(fleet.client_key)], check=True,
                       env={**os.environ, "SSH_AUTH_SOCK": sock})
        yield sock
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(directory, ignore_errors=True)


def ssh_env(fleet, hosts, tmp_path, agent: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("JOBLIB_CLOUD_") and k != "SSH_AUTH_SOCK"}
    env.update({"JOBLIB_CLOUD_HOME": str(tmp_path / "client-home"),
                "JOBLIB_CLOUD_PROVIDER": "ssh",
                "JOBLIB_CLOUD_HOSTS": ",".join(hosts),
                "JOBLIB_CLOUD_SSH_KEY": str(fleet.client_key),
                "JOBLIB_CLOUD_KNOWN_HOSTS": str(fleet.known_hosts),
                "JOBLIB_CLOUD_PYTHON": sys.executable,
                "JOBLIB_CLOUD_WORKERS_PER_HOST": "1"})
    if agent:
        env["SSH_AUTH_SOCK"] = agent
    return env


def cli(env: dict[str, str], cwd: Path, *args: str, timeout: float = 180
        ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "joblib_cloud", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_run_n2_on_ssh_uses_both_hosts_with_the_forwarded_agent(fleet, ssh_agent, project,
                                                                tmp_path):
    hosts = fleet.hosts[:2]
    env = ssh_env(fleet, [h.spec for h in hosts], tmp_path, ssh_agent)
    marks = tmp_path / "marks"
    marks.mkdir()
    done = cli(env, project, "run", "-n", "2", "--", "python", "spread.py", str(marks))
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout.strip().splitlines()[-1])
    assert info["homes"] == sorted(str(h.home) for h in hosts)
    assert info["provider"] == "ssh" and info["n_jobs"] == 2
    assert info["key"] is None  # the agent logs in: no key file on the host
    (record,) = (tmp_path / "client-home" / "job-records").iterdir()
    job_dir = hosts[0].home / "jobs" / record.stem
    # What let the job reach its siblings is gone with it.
    assert not (job_dir / "cloud").exists()
    assert not any(p.name.startswith("id_") for p in job_dir.rglob("*"))


def test_run_n2_on_ssh_without_an_agent_fails_before_starting(fleet, project, tmp_path):
    hosts = fleet.hosts[:2]
    env = ssh_env(fleet, [h.spec for h in hosts], tmp_path, agent=None)
    done = cli(env, project, "run", "-n", "2", "--", "python", "spread.py", "x")
    assert done.returncode == 2  # ConfigError: the setting cannot work
    assert "no ssh-agent holding a key" in done.stderr and "ssh-add" in done.stderr
    assert not (tmp_path / "client-home" / "job-records").exists() or \
        not list((tmp_path / "client-home" / "job-records").iterdir())


class IsolatedHost(SSHHost):
    """A host in a network namespace of its own: this computer reaches it over a veth
    pair, but from inside it the other hosts' loopback addresses lead nowhere."""

    def __init__(self, root: Path, client_pub: str) -> None:
        super().__init__(root, 7, client_pub)
        self.netns = f"jc-{secrets.token_hex(3)}"
        octet = secrets.randbelow(200) + 20
        self.address = f"10.213.{octet}.2"
        self.outside = f"10.213.{octet}.1"
        self.veth = f"v{self.netns}"
        ip = ["ip"]
        subprocess.run([*ip, "netns", "add", self.netns], check=True)
        subprocess.run([*ip, "link", "add", self.veth, "type", "veth", "peer", "name", "eth0",
                        "netns", self.netns], check=True)
        subprocess.run([*ip, "addr", "add", f"{self.outside}/30", "dev", self.veth], check=True)
        subprocess.run([*ip, "link", "set", self.veth, "up"], check=True)
        inside = [*ip, "netns", "exec", self.netns, "ip"]
        subprocess.run([*inside, "addr", "add", f"{self.address}/30", "dev", "eth0"],
                       check=True)
        subprocess.run([*inside, "link", "set", "eth0", "up"], check=True)
        subprocess.run([*inside, "link", "set", "lo", "up"], check=True)

    def start(self, port: int | None = None, wait: bool = True) -> None:
        self.port = 2222
        config = self._write_config()
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.netns, SSHD, "-D", "-f",
                                      str(config), "-E", str(self.log)],
                                     stdin=subprocess.DEVNULL)

    def remove(self) -> None:
        self.kill()
        subprocess.run(["ip", "link", "del", self.veth], check=False)
        subprocess.run(["ip", "netns", "del", self.netns], check=False)


def test_run_n2_on_hosts_that_cannot_reach_each_other_fails_early(fleet, ssh_agent,
                                                                  project, tmp_path):
    client_pub = Path(str(fleet.client_key) + ".pub").read_text().strip()
    isolated = IsolatedHost(tmp_path / "isolated", client_pub)
    try:
        isolated.start()
        known = tmp_path / "known_hosts"
        known.write_text(fleet.known_hosts.read_text()
                         + f"[{isolated.address}]:{isolated.port} {isolated.host_key_pub}\n")
        env = ssh_env(fleet, [isolated.spec, fleet.hosts[1].spec], tmp_path, ssh_agent)
        env["JOBLIB_CLOUD_KNOWN_HOSTS"] = str(known)
        wait_until(lambda: cli(env, project, "status").returncode == 0, 20,
                   "the isolated host's sshd")
        done = cli(env, project, "run", "-n", "2", "--", "python", "spread.py", "x")
        assert done.returncode == 1, done.stdout
        assert "cannot log in over SSH" in done.stderr
        assert fleet.hosts[1].spec in done.stderr and "reach each other" in done.stderr
        # Nothing was left running or recorded: the job never started.
        assert not list((isolated.home / "jobs").iterdir())
        records = tmp_path / "client-home" / "job-records"
        assert not records.exists() or not list(records.iterdir())
    finally:
        isolated.remove()


def test_run_n2_on_local_lists_two_agents(project, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBLIB_CLOUD_")}
    env.update({"JOBLIB_CLOUD_HOME": str(tmp_path / "client-home"),
                "JOBLIB_CLOUD_PROVIDER": "local", "JOBLIB_CLOUD_WORKERS_PER_HOST": "1"})
    script = ("import joblib, os, joblib_cloud; from joblib import parallel_backend\n"
              "from joblib import Parallel, delayed\n"
              "with parallel_backend('cloud'):\n"
              "    seen = Parallel()(delayed(os.environ.get)('JOBLIB_CLOUD_SHARED') "
              "for i in range(4))\n"
              "    print(joblib.effective_n_jobs(-1), os.environ['JOBLIB_CLOUD_N'],\n"
              "          len(set(seen)), seen[0] == os.environ['JOBLIB_CLOUD_SHARED'])\n")
    (project / "n.py").write_text(script)
    done = cli(env, project, "run", "-n", "2", "--", "python", "n.py")
    assert done.returncode == 0, done.stderr
    # Two agents, and their tasks see the job's shared directory.
    assert done.stdout.split() == ["2", "2", "1", "True"]


def test_run_n2_on_ssh_cannot_detach(fleet, ssh_agent, project, tmp_path):
    env = ssh_env(fleet, [h.spec for h in fleet.hosts[:2]], tmp_path, ssh_agent)
    done = cli(env, project, "run", "--detach", "-n", "2", "--", "true")
    assert done.returncode == 2  # ConfigError
    assert "cannot --detach" in done.stderr and "ssh-agent" in done.stderr


SHARED_JOB = """
import json, os, sys, time
from joblib import Parallel, delayed, parallel_backend
import joblib_cloud  # noqa: F401  (registers the backend)

def task(i, marks):
    home = os.environ["JOBLIB_CLOUD_HOME"]
    shared = os.environ["JOBLIB_CLOUD_SHARED"]  # this machine's copy
    open(os.path.join(marks, home.replace("/", "_")), "w").close()
    deadline = time.monotonic() + 60
    while len(os.listdir(marks)) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    name = "from-" + os.path.basename(os.path.dirname(home)) + ".txt"
    with open(os.path.join(shared, name), "w") as fh:
        fh.write(open(os.path.join(shared, "inputs.txt")).read())
    return shared

with parallel_backend("cloud"):
    dirs = Parallel(n_jobs=2, batch_size=1)(delayed(task)(i, sys.argv[1]) for i in range(2))
print(json.dumps(sorted(set(dirs))))
"""


def test_run_n2_every_host_sees_the_shared_directory(fleet, ssh_agent, project, tmp_path):
    hosts = fleet.hosts[:2]
    env = ssh_env(fleet, [h.spec for h in hosts], tmp_path, ssh_agent)
    env["JOBLIB_CLOUD_CLUSTER"] = "spread"
    (project / "shared_job.py").write_text(textwrap.dedent(SHARED_JOB))
    (tmp_path / "inputs.txt").write_text("seen everywhere")
    assert cli(env, project, "shared", "put", str(tmp_path / "inputs.txt")).returncode == 0
    marks = tmp_path / "marks"
    marks.mkdir()
    done = cli(env, project, "run", "-n", "2", "--", "python", "shared_job.py", str(marks))
    assert done.returncode == 0, done.stderr
    # Each machine's tasks wrote into that machine's copy...
    assert json.loads(done.stdout.strip().splitlines()[-1]) == sorted(
        str(h.home / "shared" / "spread") for h in hosts)
    # ...and what they wrote is in the cluster's directory (on the first host) afterwards.
    listing = cli(env, project, "shared", "ls")
    assert [row.split()[0] for row in listing.stdout.splitlines()[1:]] == [
        "from-host0.txt", "from-host1.txt", "inputs.txt"], listing.stdout
    first = hosts[0].home / "shared" / "spread"
    assert (first / "from-host1.txt").read_text() == "seen everywhere"


def test_following_a_job_again_forwards_the_agent_only_to_a_job_that_uses_it(
        fleet, ssh_agent, project, tmp_path):
    """``logs -f`` of a one-host job: the host gets no socket to this computer's agent
    (any process of that user there could use it while the job is followed)."""
    import psutil

    env = ssh_env(fleet, [fleet.hosts[0].spec], tmp_path, ssh_agent)
    started = cli(env, project, "run", "--detach", "--", "python", "-c",
                  "import time; time.sleep(6); print('done')")
    assert started.returncode == 0, started.stderr
    job = started.stdout.strip().splitlines()[-1]
    follower = subprocess.Popen([sys.executable, "-m", "joblib_cloud", "logs", "-f", job],
                                cwd=project, env=env, stdout=subprocess.PIPE, text=True)
    try:
        def helper():  # the host helper serving `logs -f` (ours: it names this job)
            for proc in psutil.process_iter(["cmdline"]):
                words = proc.info["cmdline"] or []
                if words[-3:] == ["logs", job, "1"]:
                    return proc
            return None

        wait_until(lambda: helper() is not None, 30, "the helper following the job")
        assert "SSH_AUTH_SOCK" not in helper().environ()
        assert follower.communicate(timeout=60)[0].strip() == "done"
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    assert follower.returncode == 0
