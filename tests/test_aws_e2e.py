"""End to end: ``provider='aws'`` under moto, each "EC2 instance" played by a loopback sshd
started with the host key and client key from the user-data moto stored, so the host-key
verification and login are the real ones.  Nothing ever connects to a moto address."""

from __future__ import annotations

import getpass
import re
import sys

from awsmock import (  # noqa: F401  (fixtures)
    CIDR,
    REGION,
    aws_fixture,
    cluster_instances,
    instances,
    loopback_ec2_fixture,
)
from helpers import assert_grid_search_matches_sequential

from joblib_cloud import cli
from joblib_cloud.client import registry
from joblib_cloud.config import resolve_config
from joblib_cloud.providers.aws import sshkeys


def test_grid_search_on_aws_then_down_leaves_nothing_running(aws, loopback_ec2):
    ec2, hosts = aws, loopback_ec2
    settings = {"provider": "aws", "n": 2, "instance": "C2", "cluster": "e2e",
                "region": REGION, "ingress_cidr": CIDR, "user": getpass.getuser(),
                "python": sys.executable, "workers_per_host": 2}
    try:
        assert_grid_search_matches_sequential(settings)
        assert len(hosts) == 2 and all(h.accepted_logins() >= 1 for h in hosts.values())
        assert len(cluster_instances(ec2, "e2e", states=("running",))) == 2
        registry.get_cluster(resolve_config(**settings)).close()

        assert cli.main(["down", "--cluster", "e2e", "--region", REGION, "--yes"]) == 0
        assert instances(ec2, states=("pending", "running", "stopping", "stopped")) == []
        assert not sshkeys.exists(REGION, "e2e")
    finally:
        registry.close_all()


def test_up_status_down_configured_by_environment(aws, loopback_ec2, monkeypatch, capsys):
    for name, value in {"INSTANCE": "M2", "N": "1", "CLUSTER": "envup", "REGION": REGION,
                        "INGRESS_CIDR": CIDR, "USER": getpass.getuser(),
                        "PYTHON": sys.executable, "WORKERS_PER_HOST": "1"}.items():
        monkeypatch.setenv(f"JOBLIB_CLOUD_{name}", value)
    assert cli.main(["up"]) == 0
    out = capsys.readouterr().out
    assert "1 workers" in out and "cluster 'envup' is up" in out
    (inst,) = cluster_instances(aws, "envup", states=("running",))
    assert inst["InstanceType"] == "m6i.large"
    assert list(loopback_ec2) == [inst["InstanceId"]]
    assert cli.main(["status", "--idle"]) == 0  # asks the host itself, over verified SSH
    (row,) = [line.split() for line in capsys.readouterr().out.splitlines()
              if line.startswith("envup ")]
    assert row[3] == "running" and row[4] == "m6i.large"
    assert re.fullmatch(r"\d+s", row[-1]), row  # seconds since the agent was last active
    assert cli.main(["down", "--yes"]) == 0  # the configured cluster
    assert cluster_instances(aws, "envup") == []
