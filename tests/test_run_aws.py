"""``joblib-cloud run -n 2`` on ``aws`` under moto: each "instance" is a loopback sshd
started with the keys from its stored user-data (its sshd trusting the cluster's key as a
user CA, as the user-data says); the job's machine reaches its siblings with a key of the
job's own that the cluster's key certified, at the addresses the sibling hook gives (this
test's own hosts, never an address moto hands out)."""

from __future__ import annotations

import getpass
import json
import sys
import textwrap

import pytest
from awsmock import (  # noqa: F401  (fixtures)
    CIDR,
    REGION,
    aws_fixture,
    cluster_instances,
    loopback_ec2_fixture,
)
from runjobs import SPREAD_JOB

from joblib_cloud import cli, provisioner
from joblib_cloud.config import resolve_config
from joblib_cloud.providers.aws import network

KEY_CHECK = """
import json, os, stat, time
import paramiko
key = os.environ["JOBLIB_CLOUD_SSH_KEY"]
cert = paramiko.PKey.from_path(key).public_blob  # loaded from key + "-cert.pub"
msg = paramiko.Message(cert.key_blob)
msg.get_text(); msg.get_binary(); msg.get_binary(); msg.get_int64(); msg.get_int()
msg.get_text()
raw, names = msg.get_binary(), []
while raw:
    size = int.from_bytes(raw[:4], "big")
    names.append(raw[4:4 + size].decode())
    raw = raw[4 + size:]
msg.get_int64()
left = msg.get_int64() - time.time()
print(json.dumps({"key": key, "mode": stat.S_IMODE(os.stat(key).st_mode),
                  "text": open(key).read(), "cert": {"principals": names, "left": left}}))
"""


@pytest.fixture
def project(loopback_ec2, tmp_path, monkeypatch):
    """A project directory to run from; siblings reached at this test's own hosts."""
    hosts = loopback_ec2
    provisioner.set_sibling_hook(lambda inst: (hosts[inst["InstanceId"]].address,
                                               hosts[inst["InstanceId"]].port))
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    yield project
    provisioner.set_sibling_hook(None)
    from joblib_cloud.client import registry

    registry.close_all()


def test_run_n2_on_aws_spans_both_machines_with_a_key_of_the_jobs_own(
        aws, loopback_ec2, project, tmp_path, monkeypatch, capfd):
    hosts = loopback_ec2
    (project / "spread.py").write_text(textwrap.dedent(SPREAD_JOB))
    (project / "keycheck.py").write_text(textwrap.dedent(KEY_CHECK))
    marks = tmp_path / "marks"
    marks.mkdir()
    for name, value in {"REGION": REGION, "INGRESS_CIDR": CIDR,
                        "USER": getpass.getuser(), "PYTHON": sys.executable,
                        "WORKERS_PER_HOST": "1"}.items():
        monkeypatch.setenv(f"JOBLIB_CLOUD_{name}", value)
    args = ["run", "--provider", "aws", "-i", "C2", "-n", "2", "--cluster", "sib", "--"]
    code = cli.main([*args, "python", "spread.py", str(marks)])
    out, err = capfd.readouterr()
    assert code == 0, err
    info = json.loads(out.strip().splitlines()[-1])
    assert info["homes"] == sorted(str(h.home) for h in hosts.values())
    assert info["provider"] == "ssh" and info["n_jobs"] == 2
    # A key of the job's own (never the user's, nor the cluster's long-lived one), with a
    # certificate for the machines' user that ends with their lifetime at the latest;
    # private, only while the job runs, another for the next job.
    keys = []
    for _ in range(2):
        assert cli.main([*args, "python", "keycheck.py"]) == 0
        out, err = capfd.readouterr()
        keys.append(json.loads(out.strip().splitlines()[-1]))
    cluster_key = (tmp_path / "home" / "aws" / REGION / "sib" / "id_ed25519").read_text()
    assert all(k["text"] != cluster_key and k["mode"] == 0o600 for k in keys)
    assert keys[0]["text"] != keys[1]["text"]
    assert all(k["cert"]["principals"] == [getpass.getuser()] for k in keys)
    assert all(0 < k["cert"]["left"] <= 12 * 3600 for k in keys)  # max_lifetime's default
    first = next(h for h in hosts.values() if keys[0]["key"].startswith(str(h.home)))
    assert not list((first.home / "jobs").glob("*/cloud"))
    assert cluster_key not in "".join(p.read_text(errors="replace") for p in
                                      first.home.rglob("*") if p.is_file())
    # The security group: port 22 from its own members, and the client's address.
    (group,) = aws.describe_security_groups(
        Filters=[{"Name": "group-name", "Values": ["joblib-cloud-sib"]}])["SecurityGroups"]
    rules = [(p["FromPort"], p["ToPort"], [g["GroupId"] for g in p["UserIdGroupPairs"]],
              [r["CidrIp"] for r in p["IpRanges"]]) for p in group["IpPermissions"]]
    assert sorted(rules) == sorted([(22, 22, [], [CIDR]),
                                    (22, 22, [group["GroupId"]], [])]) or \
        rules == [(22, 22, [group["GroupId"]], [CIDR])]
    assert all(g.get("Description") == network.SIBLING_RULE
               for p in group["IpPermissions"] for g in p["UserIdGroupPairs"])


def test_run_n2_on_aws_keeps_the_other_machine_awake_while_the_job_runs(
        aws, loopback_ec2, project, monkeypatch, capfd):
    """The other machine's kill switch knows nothing of a job on the first: its idle
    timer is started again while the job runs (every idle_timeout / 3)."""
    hosts = loopback_ec2
    for name, value in {"REGION": REGION, "INGRESS_CIDR": CIDR, "IDLE_TIMEOUT": "15",
                        "USER": getpass.getuser(), "PYTHON": sys.executable}.items():
        monkeypatch.setenv(f"JOBLIB_CLOUD_{name}", value)
    code = cli.main(["run", "--provider", "aws", "-i", "C2", "-n", "2", "--cluster",
                     "awake", "--", "python", "-c", "import time; time.sleep(12)"])
    assert code == 0, capfd.readouterr().err
    (job_host,) = [h for h in hosts.values() if (h.home / "jobs").exists()]
    (other,) = [h for h in hosts.values() if h is not job_host]
    (job,) = (job_host.home / "jobs").iterdir()
    started = json.loads((job / "command.json").read_text())["started"]
    # Touched while the job ran, not only when the client first reached it.
    assert (other.home / "activity").stat().st_mtime >= started + 4


def test_a_machine_that_answered_first_is_kept_awake_while_the_others_boot(fresh_fleet):
    """run -n N waits for every machine: the one that answers first has its idle timer
    started again while a slower one boots, not only once."""
    import threading
    import time

    from joblib_cloud.client.hosts import parse_host
    from joblib_cloud.jobs import siblings

    early, late = fresh_fleet.hosts[1], fresh_fleet.hosts[2]
    late.kill()
    targets = [provisioner.HostTarget(h.spec, parse_host(h.spec),
                                      str(fresh_fleet.client_key),
                                      str(fresh_fleet.known_hosts))
               for h in fresh_fleet.hosts]
    fleet = provisioner.Fleet(targets, connect_timeout=30)
    boot = threading.Timer(4.0, late.start)  # the slow machine's sshd comes up at 4 s
    began = time.time()
    boot.start()
    try:
        siblings.wait_for_siblings(fleet, resolve_config(provider="local"), every=1.0)
    finally:
        boot.join()
    touched = (early.home / "activity").stat().st_mtime
    assert touched >= began + 3  # touched again while the late one booted
    assert (late.home / "activity").exists()
