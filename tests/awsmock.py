"""Helpers for the aws tests: moto in-process, a recorder/injector for EC2 calls.

Errors are injected by wrapping botocore's ``BaseClient._make_api_call`` (the one place
every client call goes through), never by editing product code for tests.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Callable
from typing import Any

import boto3
import botocore.client
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws

from joblib_cloud import ec2api, provisioner, teardown, userdata
from joblib_cloud.config import resolve_config
from joblib_cloud.progress import Progress

CIDR = "198.51.100.7/32"
REGION = "us-east-1"


def client_error(code: str, operation: str, message: str = "injected") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": message}}, operation)


@dataclasses.dataclass
class Call:
    operation: str
    params: dict[str, Any]


class ApiCalls:
    """Every EC2/SSM call made (operation, params); optional per-call failure injection."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        #: fn(operation, params, n-th call of that operation) -> exception or None; may
        #: also call ``self.real`` first to let AWS act before failing.
        self.inject: Callable[[str, dict[str, Any], int], BaseException | None] | None = None
        self.real: Callable[..., Any] | None = None

    def of(self, operation: str) -> list[Call]:
        return [c for c in self.calls if c.operation == operation]


@pytest.fixture(name="aws")
def aws_fixture(monkeypatch, tmp_path):
    """moto for EC2 and SSM, a private JOBLIB_CLOUD_HOME, fast polling."""
    monkeypatch.setenv("JOBLIB_CLOUD_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(provisioner, "POLL", 0.01)
    monkeypatch.setattr(teardown, "POLL", 0.01)
    monkeypatch.setattr(ec2api, "THROTTLE_DELAY", 0.01)
    with mock_aws():
        yield boto3.client("ec2", region_name=REGION)
    provisioner.set_address_hook(None)


@pytest.fixture(name="api_calls")
def api_calls_fixture(monkeypatch) -> ApiCalls:
    recorder = ApiCalls()
    real = botocore.client.BaseClient._make_api_call
    counts: dict[str, int] = {}

    def wrapped(self, operation_name, api_params):
        recorder.calls.append(Call(operation_name, dict(api_params)))
        counts[operation_name] = counts.get(operation_name, 0) + 1
        if recorder.inject is not None:
            recorder.real = lambda: real(self, operation_name, api_params)
            exc = recorder.inject(operation_name, api_params, counts[operation_name])
            if exc is not None:
                raise exc
        return real(self, operation_name, api_params)

    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", wrapped)
    return recorder


def aws_config(**overrides: Any):
    settings = {"provider": "aws", "n": 2, "instance": "C2", "ingress_cidr": CIDR,
                "cluster": "test", "region": REGION, **overrides}
    return resolve_config(**settings)


def launch(**overrides: Any) -> provisioner.ClusterHandle:
    return provisioner.ensure_cluster(aws_config(**overrides), Progress())


def instances(ec2, states=("pending", "running", "stopping", "stopped", "shutting-down"),
              **filters: str) -> list[dict[str, Any]]:
    flt = [{"Name": "instance-state-name", "Values": list(states)}]
    flt += [{"Name": k, "Values": [v]} for k, v in filters.items()]
    return [i for r in ec2.describe_instances(Filters=flt)["Reservations"]
            for i in r["Instances"]]


def cluster_instances(ec2, cluster: str = "test", **kw) -> list[dict[str, Any]]:
    return instances(ec2, **{f"tag:{ec2api.TAG_KEY}": cluster}, **kw)


def stored_user_data(ec2, instance_id: str) -> dict[str, Any]:
    """The user-data document exactly as EC2 (moto) stored it."""
    value = ec2.describe_instance_attribute(InstanceId=instance_id,
                                            Attribute="userData")["UserData"]["Value"]
    return userdata.parse(base64.b64decode(value).decode())


def written_file(document: dict[str, Any], path: str) -> str:
    return next(f["content"] for f in document["write_files"] if f["path"] == path)


def untagged_instance(ec2) -> str:
    image = boto3.client("ssm", region_name=REGION).get_parameter(
        Name=provisioner.SSM_IMAGE.format(arch="x86_64"))["Parameter"]["Value"]
    return ec2.run_instances(ImageId=image, InstanceType="t3.micro", MinCount=1,
                             MaxCount=1)["Instances"][0]["InstanceId"]
