"""Helpers for the aws tests: moto in-process, a recorder/injector for EC2 calls.

Errors are injected by wrapping botocore's ``BaseClient._make_api_call`` (the one place
every client call goes through), never by editing product code for tests.  The same
wrapping makes moto answer as EC2 does where it differs (:class:`Ec2Fidelity`).
"""

from __future__ import annotations

import base64
import dataclasses
import re
from collections.abc import Callable
from typing import Any

import boto3
import botocore.client
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws
from moto.core import DEFAULT_ACCOUNT_ID
from moto.ec2.models import ec2_backends
from moto.ec2.models.instances import StateReason
from sshfleet import SSHHost

from joblib_cloud import provisioner
from joblib_cloud.client.progress import Progress
from joblib_cloud.config import resolve_config
from joblib_cloud.providers.aws import bucket as aws_bucket
from joblib_cloud.providers.aws import ec2api, machines, teardown, userdata
from joblib_cloud.providers.aws import launch as aws_launch

CIDR = "198.51.100.7/32"
REGION = "us-east-1"


def client_error(code: str, operation: str, message: str = "injected") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": message}}, operation)


@dataclasses.dataclass
class Call:
    operation: str
    params: dict[str, Any]
    region: str = REGION


class ApiCalls:
    """Every EC2/SSM call made (operation, params); optional per-call failure injection."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        #: fn(operation, params, n-th call of that operation) -> exception or None; may
        #: also call ``self.real`` first to let AWS act before failing.
        self.inject: Callable[[str, dict[str, Any], int], BaseException | None] | None = None
        self.real: Callable[..., Any] | None = None
        #: fn(operation, params, response) -> response: change what a call answers.
        self.after: Callable[[str, dict[str, Any], Any], Any] | None = None
        #: fn(operation, params) -> a response, or None to let moto answer (services moto
        #: does not implement, such as the Price List API).
        self.respond: Callable[[str, dict[str, Any]], Any] | None = None
        #: region -> error code every call made in that region fails with (a policy).
        self.denied_regions: dict[str, str] = {}

    def of(self, operation: str) -> list[Call]:
        return [c for c in self.calls if c.operation == operation]


class Ec2Fidelity:
    """Where moto answers differently from EC2, answer as EC2 does:

    - ``DescribeInstances`` filter ``client-token`` (moto has not implemented it);
    - an instance launched with ``NetworkInterfaces`` lists the primary interface's
      security groups as its own ``SecurityGroups`` (moto lists none);
    - terminating an instance that is already terminated succeeds (moto fails deleting
      its network interface a second time).
    """

    def __call__(self, real: Callable[..., Any], client: Any, operation: str,
                 params: dict[str, Any]) -> Any:
        if operation == "TerminateInstances":
            return self._terminate(real, client, params)
        if operation == "DescribeInstances":
            filters = params.get("Filters") or []
            tokens = [f["Values"] for f in filters if f["Name"] == "client-token"]
            if tokens:
                rest = [f for f in filters if f["Name"] != "client-token"]
                response = real(client, operation, {**params, "Filters": rest})
                wanted = set(tokens[0])
                for reservation in response["Reservations"]:
                    reservation["Instances"] = [i for i in reservation["Instances"]
                                                if i.get("ClientToken") in wanted]
                response["Reservations"] = [r for r in response["Reservations"]
                                            if r["Instances"]]
                return self._groups(response)
        response = real(client, operation, params)
        if operation in ("DescribeInstances", "RunInstances"):
            return self._groups(response)
        return response

    @staticmethod
    def _terminate(real: Callable[..., Any], client: Any, params: dict[str, Any]) -> Any:
        backend = ec2_backends[DEFAULT_ACCOUNT_ID][client.meta.region_name]
        known = {i.id: i for i in backend.all_instances()}
        gone = {i for i in params["InstanceIds"] if i in known
                and known[i].state == "terminated"}
        live = [i for i in params["InstanceIds"] if i not in gone]
        response = real(client, "TerminateInstances", {**params, "InstanceIds": live}) \
            if live else {"TerminatingInstances": []}
        terminated = {"Code": 48, "Name": "terminated"}
        response["TerminatingInstances"] += [
            {"InstanceId": i, "CurrentState": terminated, "PreviousState": terminated}
            for i in sorted(gone)]
        return response

    @staticmethod
    def _groups(response: dict[str, Any]) -> dict[str, Any]:
        reservations = response.get("Reservations") or [response]
        for reservation in reservations:
            for instance in reservation.get("Instances", []):
                primary = [n for n in instance.get("NetworkInterfaces", [])
                           if (n.get("Attachment") or {}).get("DeviceIndex") == 0]
                if not instance.get("SecurityGroups") and primary:
                    instance["SecurityGroups"] = primary[0].get("Groups", [])
        return response


@pytest.fixture(name="aws")
def aws_fixture(monkeypatch, tmp_path):
    """moto for EC2 and SSM (answering as EC2 where they differ), a private
    JOBLIB_CLOUD_HOME, fast polling."""
    monkeypatch.setenv("JOBLIB_CLOUD_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(machines, "POLL", 0.01)
    monkeypatch.setattr(machines, "CONSISTENCY_TIMEOUT", 5.0)
    monkeypatch.setattr(teardown, "POLL", 0.01)
    monkeypatch.setattr(ec2api, "THROTTLE_DELAY", 0.01)
    real = botocore.client.BaseClient._make_api_call
    fidelity = Ec2Fidelity()
    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call",
                        lambda client, operation, params: fidelity(real, client, operation,
                                                                   params))
    aws_bucket.forget_buckets()
    with mock_aws():
        yield boto3.client("ec2", region_name=REGION)
    provisioner.set_address_hook(None)
    aws_bucket.forget_buckets()


@pytest.fixture(name="api_calls")
def api_calls_fixture(aws, monkeypatch) -> ApiCalls:
    recorder = ApiCalls()
    real = botocore.client.BaseClient._make_api_call
    counts: dict[str, int] = {}

    def wrapped(self, operation_name, api_params):
        region = self.meta.region_name
        recorder.calls.append(Call(operation_name, dict(api_params), region))
        counts[operation_name] = counts.get(operation_name, 0) + 1
        if region in recorder.denied_regions:
            raise client_error(recorder.denied_regions[region], operation_name,
                               f"denied in {region} by a policy")
        if recorder.inject is not None:
            recorder.real = lambda: real(self, operation_name, api_params)
            exc = recorder.inject(operation_name, api_params, counts[operation_name])
            if exc is not None:
                raise exc
        response = None if recorder.respond is None else recorder.respond(operation_name,
                                                                            api_params)
        if response is None:
            response = real(self, operation_name, api_params)
        if recorder.after is not None:
            response = recorder.after(operation_name, api_params, response)
        return response

    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", wrapped)
    return recorder


class EventualConsistency:
    """``api_calls.after`` hook: each new instance is missing from its first ``hidden``
    ``DescribeInstances`` answers, as EC2 may leave a just-launched instance out."""

    def __init__(self, hidden: int) -> None:
        self.hidden = hidden
        self.seen: dict[str, int] = {}

    def __call__(self, operation: str, params: dict[str, Any], response: Any) -> Any:
        if operation != "DescribeInstances":
            return response
        for reservation in response["Reservations"]:
            shown = []
            for instance in reservation["Instances"]:
                count = self.seen[instance["InstanceId"]] = \
                    self.seen.get(instance["InstanceId"], 0) + 1
                if count > self.hidden:
                    shown.append(instance)
            reservation["Instances"] = shown
        response["Reservations"] = [r for r in response["Reservations"] if r["Instances"]]
        return response


def moto_instance(instance_id: str, region: str = REGION) -> Any:
    """moto's own record of an instance, to change what EC2 alone could change."""
    return ec2_backends[DEFAULT_ACCOUNT_ID][region].get_instance(instance_id)


def end_instance(instance_id: str, code: str, message: str, region: str = REGION) -> None:
    """The instance terminates on its own, with EC2's state reason ``code``."""
    instance = moto_instance(instance_id, region)
    instance.terminate()
    instance.state_reason = StateReason(message, code)
    instance._reason = message


def subnet_of(params: dict[str, Any]) -> str | None:
    """The subnet a ``RunInstances`` request asks for (top level or in its interface)."""
    nics = params.get("NetworkInterfaces") or [{}]
    return params.get("SubnetId") or nics[0].get("SubnetId")


def dead_port() -> int:
    """A loopback port nobody listens on."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sshd_per_instance(ec2, make_host: Callable[..., SSHHost]) -> Any:
    """Address hook: each launched instance becomes an sshd host, made by
    ``make_host(index, client_pub, host_key=...)`` with the host key and authorised client
    key read back from its stored user-data, and started.  ``hook.hosts``: by id."""
    hosts: dict[str, SSHHost] = {}

    def hook(instance: dict) -> tuple[str, int]:
        iid = instance["InstanceId"]
        if iid not in hosts:
            doc = stored_user_data(ec2, iid)
            trusted = re.search(r"^TrustedUserCAKeys (\S+)$",
                                written_file(doc, userdata.SSHD_CONFIG), re.M)
            host = make_host(len(hosts), written_file(doc, userdata.CLIENT_KEY_PATH).strip(),
                             host_key=(doc["ssh_keys"]["ed25519_private"],
                                       doc["ssh_keys"]["ed25519_public"]),
                             user_ca=written_file(doc, trusted[1]) if trusted else None)
            host.start()
            hosts[iid] = host
        return hosts[iid].address, hosts[iid].port

    hook.hosts = hosts  # type: ignore[attr-defined]
    return hook


@pytest.fixture(name="loopback_ec2")
def loopback_ec2_fixture(aws, tmp_path):
    """Address hook: each launched instance becomes a loopback sshd (``sshd_per_instance``)."""
    hook = sshd_per_instance(aws, lambda index, *args, **kw: SSHHost(tmp_path, 40 + index,
                                                                     *args, **kw))
    provisioner.set_address_hook(hook)
    yield hook.hosts
    for host in hook.hosts.values():
        host.kill()


def aws_config(**overrides: Any):
    settings = {"provider": "aws", "n": 2, "instance": "C2", "ingress_cidr": CIDR,
                "cluster": "test", "region": REGION, **overrides}
    return resolve_config(**settings)


def launch(**overrides: Any) -> machines.ClusterHandle:
    return aws_launch.ensure_cluster(aws_config(**overrides), Progress())


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
        Name=aws_launch.SSM_IMAGE.format(arch="x86_64"))["Parameter"]["Value"]
    return ec2.run_instances(ImageId=image, InstanceType="t3.micro", MinCount=1,
                             MaxCount=1)["Instances"][0]["InstanceId"]
