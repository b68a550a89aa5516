"""``joblib-cloud down`` and ``status``: found by tag only, idempotent, honest exit codes."""

from __future__ import annotations

import boto3
import pytest
from awsmock import (  # noqa: F401  (fixtures)
    REGION,
    api_calls_fixture,
    aws_fixture,
    client_error,
    cluster_instances,
    instances,
    launch,
    untagged_instance,
)

from joblib_cloud import cli
from joblib_cloud.providers.aws import ec2api, sshkeys, teardown


def _state(ec2, iid: str) -> str:
    return ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0][
        "State"]["Name"]


def _groups(ec2, cluster="test"):
    return ec2.describe_security_groups(Filters=ec2api.cluster_filter(cluster))["SecurityGroups"]


def _snapshot(ec2) -> tuple:
    states = sorted((i["InstanceId"], i["State"]["Name"])
                    for i in instances(ec2, states=("pending", "running", "stopping", "stopped",
                                                    "shutting-down", "terminated")))
    groups = sorted(g["GroupId"] for g in ec2.describe_security_groups()["SecurityGroups"])
    volumes = sorted(v["VolumeId"] for v in ec2.describe_volumes()["Volumes"])
    return states, groups, volumes


#: Requests that change nothing (EC2's Describe*, STS and S3 look-ups).
READS = ("Describe", "Get", "Head", "List")


def test_down_removes_the_cluster_and_nothing_else(aws, api_calls, capsys):
    ec2 = aws
    stranger = untagged_instance(ec2)
    other = launch(n=1, cluster="other")
    handle = launch(n=2)
    assert sshkeys.exists(REGION, "test")

    before = _snapshot(ec2)
    writes_before = len([c for c in api_calls.calls if not c.operation.startswith(READS)])
    assert cli.main(["down", "--cluster", "test", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert all(f"would terminate {iid}" in out for iid in handle.instance_ids)
    assert "would delete security group" in out and stranger not in out
    assert _snapshot(ec2) == before
    assert len([c for c in api_calls.calls if not c.operation.startswith(READS)]) \
        == writes_before  # --dry-run sent no changing request at all
    assert sshkeys.exists(REGION, "test")

    assert cli.main(["down", "--cluster", "test", "--yes"]) == 0
    out = capsys.readouterr().out
    assert "terminating 2 machines" in out and "deleted security group" in out
    assert all(_state(ec2, iid) in ("shutting-down", "terminated")
               for iid in handle.instance_ids)
    assert _groups(ec2) == []
    assert not sshkeys.exists(REGION, "test")
    # Never touched: an untagged machine and another cluster.
    assert _state(ec2, stranger) == "running"
    assert _state(ec2, other.instance_ids[0]) == "running"
    assert _groups(ec2, "other")
    terminated = {i for c in api_calls.of("TerminateInstances") for i in c.params["InstanceIds"]}
    assert terminated == set(handle.instance_ids)

    # Idempotent: a second down is a no-op that succeeds.
    calls_before = len(api_calls.of("TerminateInstances"))
    assert cli.main(["down", "--cluster", "test", "--yes"]) == 0
    assert "nothing to delete for cluster 'test'" in capsys.readouterr().out
    assert len(api_calls.of("TerminateInstances")) == calls_before


def test_down_finds_stopped_and_pending_machines_and_loose_volumes(aws, capsys):
    ec2 = aws
    handle = launch(n=2)
    ec2.stop_instances(InstanceIds=[handle.instance_ids[0]])
    assert _state(ec2, handle.instance_ids[0]) == "stopped"
    volume = ec2.create_volume(AvailabilityZone=f"{REGION}a", Size=1, TagSpecifications=[
        {"ResourceType": "volume", "Tags": [{"Key": ec2api.TAG_KEY, "Value": "test"}]}])
    untagged_volume = ec2.create_volume(AvailabilityZone=f"{REGION}a", Size=1)
    assert cli.main(["down", "--cluster", "test", "--yes"]) == 0
    assert cluster_instances(ec2) == []
    remaining = {v["VolumeId"] for v in ec2.describe_volumes()["Volumes"]}
    assert volume["VolumeId"] not in remaining
    assert untagged_volume["VolumeId"] in remaining


def test_down_all_and_every_region(aws, capsys):
    ec2 = aws
    stranger = untagged_instance(ec2)
    launch(n=1, cluster="a")
    launch(n=1, cluster="b", region="eu-west-1")
    west = boto3.client("ec2", region_name="eu-west-1")
    assert cli.main(["down", "--all", "--yes"]) == 0  # configured region only
    assert cluster_instances(ec2, "a") == []
    assert len(cluster_instances(west, "b")) == 1
    assert cli.main(["down", "--all", "--all-regions", "--yes"]) == 0
    assert cluster_instances(west, "b") == []
    assert not sshkeys.exists("eu-west-1", "b")
    assert _state(ec2, stranger) == "running"


def test_down_exits_non_zero_when_something_stays(aws, api_calls, monkeypatch, capsys):
    launch(n=1)
    monkeypatch.setattr(teardown, "WAIT_TIMEOUT", 0.2)
    api_calls.inject = lambda op, params, n: client_error(
        "DependencyViolation", op, "resource has a dependent object") \
        if op == "DeleteSecurityGroup" else None
    assert cli.main(["down", "--cluster", "test", "--yes"]) == 1
    captured = capsys.readouterr()
    assert "could not delete security group" in captured.out
    assert "could not be deleted" in captured.err
    assert len(api_calls.of("DeleteSecurityGroup")) > 1  # retried while "in use"
    assert sshkeys.exists(REGION, "test")  # keys kept until everything is gone
    api_calls.inject = None
    assert cli.main(["down", "--cluster", "test", "--yes"]) == 0
    assert _groups(aws) == [] and not sshkeys.exists(REGION, "test")


def test_status_lists_machines_with_type_age_and_price(aws, capsys):
    launch(n=2, instance="C4")
    assert cli.main(["status", "--cluster", "test"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("test ")]
    assert len(lines) == 2
    # moto has no Price List API: the built-in price, marked as an estimate.
    assert all("running" in line and "c6i.xlarge" in line and "0.170*" in line
               for line in lines)
    assert "$0.34/h on-demand" in out and "* = estimate" in out
    assert cli.main(["status", "--cluster", "nope"]) == 0
    assert "no joblib-cloud machines in cluster 'nope'" in capsys.readouterr().out


def test_instances_command_prints_the_alias_table(capsys):
    assert cli.main(["instances"]) == 0
    out = capsys.readouterr().out
    assert "C16    c6i.4xlarge" in out and "R8     r6i.2xlarge   8      64 GiB" in out


@pytest.mark.parametrize("answer, code", [("n", 1), ("y", 0)])
def test_down_asks_on_a_terminal(aws, monkeypatch, capsys, answer, code):
    launch(n=1)
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda prompt: answer)
    assert cli.main(["down", "--cluster", "test"]) == code
    assert (cluster_instances(aws) == []) == (answer == "y")


def test_every_region_skips_regions_a_policy_denies(aws, api_calls, capsys):
    launch(n=1, cluster="a")
    launch(n=1, cluster="b", region="eu-west-1")
    api_calls.denied_regions = {"ap-south-1": "UnauthorizedOperation",
                                "af-south-1": "OptInRequired", "eu-north-1": "AuthFailure"}
    assert cli.main(["status", "--all-regions"]) == 0
    out = capsys.readouterr().out
    for region, code in api_calls.denied_regions.items():
        assert f"{region}: skipped: these AWS credentials may not use this region ({code})" \
            in out
    assert len([line for line in out.splitlines() if line.startswith(("a ", "b "))]) == 2
    assert "2 machines" in out

    assert cli.main(["down", "--all", "--all-regions", "--yes"]) == 0
    out = capsys.readouterr().out
    assert "ap-south-1: skipped" in out and "af-south-1: skipped" in out
    assert cluster_instances(aws, "a") == []
    assert cluster_instances(boto3.client("ec2", region_name="eu-west-1"), "b") == []


def test_a_denied_region_asked_for_by_name_is_still_an_error(aws, api_calls, capsys):
    api_calls.denied_regions = {"ap-south-1": "UnauthorizedOperation"}
    assert cli.main(["status", "--region", "ap-south-1"]) == 1
    assert "UnauthorizedOperation" in capsys.readouterr().err
