"""EC2 errors: capacity falls back, quota/credentials/image fail at once with the fix,
throttling is retried, and a failure part-way never leaves a machine behind."""

from __future__ import annotations

import socket

import pytest
from awsmock import (  # noqa: F401  (fixtures)
    REGION,
    EventualConsistency,
    api_calls_fixture,
    aws_config,
    aws_fixture,
    client_error,
    cluster_instances,
    end_instance,
    instances,
    launch,
    subnet_of,
)
from botocore.exceptions import UnauthorizedSSOTokenError

from joblib_cloud import provisioner
from joblib_cloud.client import registry
from joblib_cloud.errors import HostConnectError
from joblib_cloud.providers.aws import ec2api, machines, sshkeys, teardown
from joblib_cloud.providers.aws.ec2api import AWSError


def _nothing_left(ec2, cluster: str = "test") -> None:
    assert cluster_instances(ec2, cluster) == []  # none pending/running/stopped
    assert ec2.describe_security_groups(
        Filters=ec2api.cluster_filter(cluster))["SecurityGroups"] == []
    assert not sshkeys.exists(REGION, cluster)


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
        registry.connect(aws_config(n=2, connect_timeout=1))
    _nothing_left(aws)


def test_failure_to_connect_spares_machines_that_were_already_there(aws):
    first = launch(n=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    provisioner.set_address_hook(lambda instance: ("127.0.0.1", port))
    with pytest.raises(HostConnectError):
        registry.connect(aws_config(n=2, connect_timeout=1))
    assert [i["InstanceId"] for i in cluster_instances(aws)] == first.instance_ids


# ------------------------------------------------------------------ spot fallbacks


def test_account_without_spot_role_falls_back_to_on_demand_with_the_fix(aws, api_calls,
                                                                        caplog):
    caplog.set_level("WARNING", logger="joblib_cloud")
    api_calls.inject = lambda op, params, n: client_error(
        ec2api.SPOT_ROLE_CODE, op, "The provided credentials do not have permission to create "
        "the service-linked role for EC2 Spot Instances.") \
        if op == "RunInstances" and "InstanceMarketOptions" in params else None
    handle = launch(n=2, spot=True)
    runs = api_calls.of("RunInstances")
    assert ["InstanceMarketOptions" in r.params for r in runs] == [True, False, False]
    found = cluster_instances(aws)
    assert sorted(i["InstanceId"] for i in found) == sorted(handle.instance_ids)
    assert all(i.get("InstanceLifecycle") != "spot" for i in found)
    warning = "\n".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "aws iam create-service-linked-role --aws-service-name spot.amazonaws.com" in warning


def test_spot_machine_taken_back_while_pending_is_replaced_on_demand(aws, api_calls, caplog):
    caplog.set_level("WARNING", logger="joblib_cloud")
    reclaimed: list[str] = []

    def take_back_first_spot(operation, params, response):
        if operation == "RunInstances" and "InstanceMarketOptions" in params and not reclaimed:
            reclaimed.append(response["Instances"][0]["InstanceId"])
            end_instance(reclaimed[0], machines.SPOT_RECLAIMED,
                         "Server.SpotInstanceTermination: Spot instance termination")
        return response

    api_calls.after = take_back_first_spot
    handle = launch(n=2, spot=True)
    assert reclaimed and reclaimed[0] not in handle.instance_ids
    running = cluster_instances(aws, states=("running",))
    assert sorted(i["InstanceId"] for i in running) == sorted(handle.instance_ids)
    assert sorted(i.get("InstanceLifecycle", "on-demand") for i in running) == \
        ["on-demand", "spot"]
    assert "InstanceMarketOptions" not in api_calls.of("RunInstances")[-1].params
    assert any("on-demand" in r.getMessage() for r in caplog.records
               if r.levelname == "WARNING")
    assert [s.label for s in handle.specs] == handle.instance_ids


# ------------------------------------------------------------ eventual consistency


def _lost_answer_and_unknown_ids(api_calls, lost_call: int):
    """RunInstances number ``lost_call`` launches but its answer is lost; the first
    TerminateInstances finds an id EC2 does not know yet."""
    def inject(op, params, n):
        if op == "RunInstances" and n == lost_call:
            api_calls.real()
            return client_error("InternalError", op, "An internal error has occurred")
        if op == "TerminateInstances" and n == 1:
            return client_error("InvalidInstanceID.NotFound", op,
                                f"The instance ID '{params['InstanceIds'][0]}' does not exist")
        return None

    return inject


def test_cleanup_finds_what_ec2_does_not_list_yet(aws, api_calls, monkeypatch):
    monkeypatch.setattr(teardown, "WAIT_TIMEOUT", 5.0)
    api_calls.after = EventualConsistency(hidden=3)
    api_calls.inject = _lost_answer_and_unknown_ids(api_calls, lost_call=2)
    with pytest.raises(Exception, match="InternalError"):
        launch(n=3)
    api_calls.after = None
    assert len(api_calls.of("RunInstances")) == 2
    terminate_calls = api_calls.of("TerminateInstances")
    assert len(terminate_calls) >= 2  # NotFound was retried
    assert any(f["Name"] == "client-token" for c in api_calls.of("DescribeInstances")
               for f in c.params.get("Filters", []))
    _nothing_left(aws)
    assert len(instances(aws, states=("shutting-down", "terminated"))) == 2


def test_growing_cluster_finds_a_lost_launch_by_its_client_token(aws, api_calls, monkeypatch):
    monkeypatch.setattr(teardown, "WAIT_TIMEOUT", 5.0)
    first = launch(n=1)
    api_calls.after = EventualConsistency(hidden=3)
    api_calls.inject = _lost_answer_and_unknown_ids(api_calls, lost_call=2)
    with pytest.raises(Exception, match="InternalError"):
        launch(n=2)
    api_calls.after = None
    live = cluster_instances(aws)
    assert [i["InstanceId"] for i in live] == first.instance_ids  # the lost one is gone
    lost_token = api_calls.of("RunInstances")[-1].params["ClientToken"]
    (lost,) = [i for i in instances(aws, states=("shutting-down", "terminated"))]
    assert lost["ClientToken"] == lost_token


# -------------------------------------------------------- errors that say what to do


@pytest.mark.parametrize("code, message, expected", [
    ("OptInRequired", "You are not subscribed to this service.",
     r"not enabled for your account.*Enable the region in the AWS console.*region="),
    ("PendingVerification", "Your request for accessing resources in this region is being "
     "validated", r"still verifying this new account.*Wait .* then retry"),
])
def test_account_and_region_errors_say_what_to_do(aws, api_calls, code, message, expected):
    api_calls.inject = lambda op, params, n: client_error(code, op, message) \
        if op == "RunInstances" else None
    with pytest.raises(AWSError, match=expected):
        launch(n=1)
    assert len(api_calls.of("RunInstances")) == 1
    _nothing_left(aws)


def test_expired_sso_session_says_to_log_in_again(aws, api_calls, monkeypatch):
    from botocore.exceptions import SSOTokenLoadError, TokenRetrievalError

    api_calls.inject = lambda op, params, n: TokenRetrievalError(
        provider="sso", error_msg="Token has expired and refresh failed") \
        if op == "DescribeInstanceTypes" else None
    with pytest.raises(AWSError, match=r"SSO session has expired.*aws sso login --profile"):
        launch(n=1)
    assert api_calls.of("RunInstances") == []
    monkeypatch.setenv("AWS_PROFILE", "research")
    for exc in (SSOTokenLoadError(error_msg="expired"), UnauthorizedSSOTokenError()):
        explained = ec2api.explain(exc, "list instances")
        assert isinstance(explained, AWSError)
        assert "`aws sso login --profile research`" in str(explained)


def test_unless_lets_only_the_expected_codes_through():
    from botocore.exceptions import ClientError

    from joblib_cloud.providers.aws.ec2api import unless

    def error(code: str) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": "m"}}, "Op")

    assert unless(error("InvalidGroup.Duplicate"), "InvalidGroup.Duplicate") == \
        "InvalidGroup.Duplicate"
    assert unless(error("UnsupportedOperation"), "Unsupported*") == "UnsupportedOperation"
    other = error("AccessDenied")
    with pytest.raises(ClientError) as raised:
        unless(other, "InvalidGroup.Duplicate", "Unsupported*")
    assert raised.value is other
    explained = AWSError("explained")  # call() explains a ClientError as its cause
    explained.__cause__ = error("InvalidPermission.NotFound")
    assert unless(explained, "InvalidPermission.NotFound") == "InvalidPermission.NotFound"
