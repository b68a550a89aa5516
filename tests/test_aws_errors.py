"""EC2 errors: capacity falls back, quota/credentials/image fail at once with the fix,
throttling is retried, and a failure part-way never leaves a machine behind."""

from __future__ import annotations

import socket

import pytest
from awsmock import (  # noqa: F401  (fixtures)
    REGION,
    api_calls_fixture,
    aws_config,
    aws_fixture,
    client_error,
    cluster_instances,
    launch,
    subnet_of,
)

from joblib_cloud import ec2api, providers, provisioner, records
from joblib_cloud.ec2api import AWSError
from joblib_cloud.errors import HostConnectError


def _nothing_left(ec2, cluster: str = "test") -> None:
    assert cluster_instances(ec2, cluster) == []  # none pending/running/stopped
    assert ec2.describe_security_groups(
        Filters=ec2api.cluster_filter(cluster))["SecurityGroups"] == []
    assert not records.exists(REGION, cluster)


def _subnets(ec2) -> int:
    return len(ec2.describe_subnets(
        Filters=[{"Name": "default-for-az", "Values": ["true"]}])["Subnets"])


def test_spot_capacity_error_falls_back_to_on_demand(aws, api_calls):
    api_calls.inject = lambda op, params, n: client_error(
        "InsufficientInstanceCapacity", op, "no spot capacity") \
        if op == "RunInstances" and "InstanceMarketOptions" in params else None
    handle = launch(n=2, spot=True)
    runs = api_calls.of("RunInstances")
    spot_tries = [r for r in runs if "InstanceMarketOptions" in r.params]
    assert len(spot_tries) == _subnets(aws)  # every zone tried for spot, once
    assert len({subnet_of(r.params) for r in spot_tries}) == _subnets(aws)
    assert len(runs) == len(spot_tries) + 2  # then on-demand, also for the second host
    assert len({r.params["ClientToken"] for r in runs}) == len(runs)
    found = cluster_instances(aws)
    assert sorted(i["InstanceId"] for i in found) == sorted(handle.instance_ids)
    assert all(i.get("InstanceLifecycle") != "spot" for i in found)


def test_capacity_error_in_one_zone_tries_the_next(aws, api_calls):
    api_calls.inject = lambda op, params, n: client_error(
        "InsufficientInstanceCapacity", op) if op == "RunInstances" and n == 1 else None
    handle = launch(n=1)
    first, second = api_calls.of("RunInstances")
    assert subnet_of(first.params) != subnet_of(second.params)
    assert cluster_instances(aws)[0]["SubnetId"] == subnet_of(second.params)
    assert len(handle.specs) == 1


def test_quota_error_fails_at_once_with_the_fix(aws, api_calls):
    api_calls.inject = lambda op, params, n: client_error(
        "VcpuLimitExceeded", op, "You have requested more vCPU capacity than your current "
        "vCPU limit of 32 allows") if op == "RunInstances" else None
    with pytest.raises(AWSError, match=r"quota.*VcpuLimitExceeded.*fewer or smaller "
                                       r"machines.*servicequotas"):
        launch(n=5, instance="C16")
    assert len(api_calls.of("RunInstances")) == 1  # no retry, no other zone
    _nothing_left(aws)


def test_credential_and_image_errors_fail_at_once(aws, api_calls):
    api_calls.inject = lambda op, params, n: client_error(
        "UnauthorizedOperation", op, "You are not authorized") if op == "RunInstances" else None
    with pytest.raises(AWSError, match=r"UnauthorizedOperation.*aws configure"):
        launch(n=2)
    assert len(api_calls.of("RunInstances")) == 1
    _nothing_left(aws)
    api_calls.inject = None
    with pytest.raises(AWSError, match=r"InvalidAMIID.NotFound.*Unset image_id="):
        launch(n=2, image_id="ami-12345678")
    assert len(api_calls.of("RunInstances")) == 1
    _nothing_left(aws)


def test_throttling_is_retried_with_backoff(aws, api_calls):
    api_calls.inject = lambda op, params, n: client_error(
        "RequestLimitExceeded", op, "Request limit exceeded.") \
        if op == "RunInstances" and n <= 2 else None
    handle = launch(n=2)
    runs = api_calls.of("RunInstances")
    assert len(runs) == 4  # two throttled tries, then one call per host
    assert runs[0].params["ClientToken"] == runs[2].params["ClientToken"]  # same request
    assert len(cluster_instances(aws)) == 2 == len(handle.instance_ids)


def test_failure_after_three_of_five_cleans_up_all_five(aws, api_calls):
    def fourth_fails_after_aws_acted(op, params, n):
        if op == "RunInstances" and n == 4:
            api_calls.real()  # EC2 launched it, but the response never reached us
            return client_error("InternalError", op, "An internal error has occurred")
        if op == "RunInstances" and n == 5:
            return client_error("Unavailable", op)  # not reached
        return None

    api_calls.inject = fourth_fails_after_aws_acted
    with pytest.raises(Exception, match="InternalError"):
        launch(n=5)
    assert len(api_calls.of("RunInstances")) == 4
    terminated = {i for c in api_calls.of("TerminateInstances") for i in c.params["InstanceIds"]}
    assert len(terminated) == 4  # the 3 we knew of and the one whose answer was lost
    _nothing_left(aws)


def test_failure_to_connect_terminates_what_was_launched(aws, monkeypatch):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    provisioner.set_address_hook(lambda instance: ("127.0.0.1", port))
    with pytest.raises(HostConnectError, match="unreachable"):
        providers.connect(aws_config(n=2, connect_timeout=1))
    _nothing_left(aws)


def test_failure_to_connect_spares_machines_that_were_already_there(aws):
    first = launch(n=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    provisioner.set_address_hook(lambda instance: ("127.0.0.1", port))
    with pytest.raises(HostConnectError):
        providers.connect(aws_config(n=2, connect_timeout=1))
    assert [i["InstanceId"] for i in cluster_instances(aws)] == first.instance_ids
