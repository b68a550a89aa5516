"""Networking on aws: subnet_id and security_group_id, an explicit public address, a clear
error without a default VPC or without a usable address, the client's address found over
IPv4 without a proxy, and port 22 following the client when its address changes."""

from __future__ import annotations

import http.server
import socket
import threading
from typing import Any

import pytest
from awsmock import (  # noqa: F401  (fixtures)
    CIDR,
    REGION,
    api_calls_fixture,
    aws_config,
    aws_fixture,
    cluster_instances,
    dead_port,
    launch,
    subnet_of,
)

from joblib_cloud import provisioner
from joblib_cloud.client import registry
from joblib_cloud.config import resolve_config
from joblib_cloud.providers.aws import addresses, ec2api, network, sshkeys
from joblib_cloud.providers.aws.ec2api import AWSError


def _private_subnet(ec2) -> tuple[str, str]:
    """A VPC and subnet that give no public address on their own."""
    vpc = ec2.create_vpc(CidrBlock="10.77.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.77.1.0/24",
                               AvailabilityZone=f"{REGION}b")["Subnet"]
    assert not subnet["MapPublicIpOnLaunch"]
    return vpc, subnet["SubnetId"]


def _rules(ec2, group_id: str) -> list[tuple[str, str | None]]:
    group = ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"][0]
    return sorted((r["CidrIp"], r.get("Description")) for p in group["IpPermissions"]
                  if p.get("FromPort") == 22 for r in p["IpRanges"])


def test_settings_are_read_and_checked():
    config = resolve_config(_environ={"JOBLIB_CLOUD_SUBNET_ID": "subnet-0123456789abcdef0",
                                      "JOBLIB_CLOUD_SECURITY_GROUP_ID": "sg-12345678"},
                            _file={})
    assert config.subnet_id == "subnet-0123456789abcdef0"
    assert config.security_group_id == "sg-12345678"
    assert "subnet_id" in registry.FLEET_FIELDS and "security_group_id" in registry.FLEET_FIELDS
    with pytest.raises(ValueError, match=r"keyword subnet_id=.*'subnet-0123456789abcdef0'"):
        resolve_config(subnet_id="vpc-1234", _environ={}, _file={})


def test_subnet_without_public_addresses_still_gets_one(aws, api_calls):
    vpc, subnet = _private_subnet(aws)
    handle = launch(n=2, subnet_id=subnet)
    for run in api_calls.of("RunInstances"):
        (nic,) = run.params["NetworkInterfaces"]
        assert nic["AssociatePublicIpAddress"] is True and nic["DeviceIndex"] == 0
        assert nic["SubnetId"] == subnet and len(nic["Groups"]) == 1
        assert "SubnetId" not in run.params and "SecurityGroupIds" not in run.params
    found = cluster_instances(aws)
    assert len(found) == 2 and all(i["SubnetId"] == subnet and i["VpcId"] == vpc
                                   and i.get("PublicIpAddress") for i in found)
    assert [s.address for s in handle.specs] == [i["PublicIpAddress"] for i in
                                                 sorted(found, key=lambda i: handle.instance_ids
                                                        .index(i["InstanceId"]))]
    (group,) = {g["GroupId"] for i in found for g in i["SecurityGroups"]}
    assert aws.describe_security_groups(GroupIds=[group])["SecurityGroups"][0]["VpcId"] == vpc


def test_private_address_hook_asks_for_no_public_address(aws, api_calls):
    vpc, subnet = _private_subnet(aws)
    provisioner.set_address_hook(addresses.private_address)
    handle = launch(n=1, subnet_id=subnet)
    (run,) = api_calls.of("RunInstances")
    assert "NetworkInterfaces" not in run.params and run.params["SubnetId"] == subnet
    (inst,) = cluster_instances(aws)
    assert not inst.get("PublicIpAddress")
    assert handle.specs[0].address == inst["PrivateIpAddress"]


def test_security_group_id_is_used_as_it_is(aws, api_calls):
    vpc, subnet = _private_subnet(aws)
    mine = aws.create_security_group(GroupName="mine", Description="mine", VpcId=vpc)["GroupId"]
    launch(n=1, subnet_id=subnet, security_group_id=mine, ingress_cidr=None)
    (run,) = api_calls.of("RunInstances")
    assert run.params["NetworkInterfaces"][0]["Groups"] == [mine]
    assert len(api_calls.of("CreateSecurityGroup")) == 1  # the test's own
    assert api_calls.of("AuthorizeSecurityGroupIngress") == []  # never changed
    default_vpc_group = aws.create_security_group(GroupName="elsewhere", Description="x")
    with pytest.raises(AWSError, match=r"belongs to VPC .* subnet_id= of that VPC"):
        launch(n=2, subnet_id=subnet, security_group_id=default_vpc_group["GroupId"])


def test_no_default_vpc_asks_for_subnet_id(aws, api_calls):
    def no_default_vpc(operation: str, params: dict, response: Any) -> Any:
        if operation == "DescribeVpcs":
            response["Vpcs"] = []
        return response

    api_calls.after = no_default_vpc
    with pytest.raises(AWSError, match=r"no default VPC: pass subnet_id='subnet-.*"
                                       r"create-default-vpc"):
        launch(n=1)
    assert api_calls.of("RunInstances") == []
    assert not sshkeys.exists(REGION, "test")


def test_machine_without_a_public_address_fails_at_once(aws, api_calls):
    def no_public_ip(operation: str, params: dict, response: Any) -> Any:
        for reservation in response.get("Reservations", []):
            for instance in reservation["Instances"]:
                instance.pop("PublicIpAddress", None)
        return response

    api_calls.after = no_public_ip
    with pytest.raises(AWSError, match=r"no public IP address.*subnet_id=.*private_address"):
        launch(n=2)
    assert len(api_calls.of("RunInstances")) == 2
    assert cluster_instances(aws) == []  # both terminated
    assert len(api_calls.of("DescribeInstances")) < 10  # no waiting on an address


class _CheckIp(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = b"203.0.113.9\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_client_address_is_asked_over_ipv4_without_a_proxy(monkeypatch):
    server = http.server.HTTPServer(("127.0.0.1", 0), _CheckIp)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        proxy = f"http://127.0.0.1:{dead_port()}"
        for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy"):
            monkeypatch.setenv(name, proxy)
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.delenv("NO_PROXY", raising=False)
        families = []
        real = socket.getaddrinfo

        def recording(host, port, family=0, *args, **kwargs):
            families.append((host, family))
            return real(host, port, family, *args, **kwargs)

        monkeypatch.setattr(socket, "getaddrinfo", recording)
        monkeypatch.setattr(network, "CHECKIP_URL",
                            f"http://localhost:{server.server_address[1]}/")
        config = resolve_config(provider="aws", _environ={}, _file={})
        assert network.client_cidr(config) == "203.0.113.9/32"
        assert families and all(f == socket.AF_INET for host, f in families
                                if host == "localhost")
    finally:
        server.shutdown()
        server.server_close()


def test_reattaching_from_a_new_address_moves_the_ssh_rule(aws, api_calls):
    first = launch(n=1)
    (group,) = {g["GroupId"] for i in cluster_instances(aws) for g in i["SecurityGroups"]}
    aws.authorize_security_group_ingress(GroupId=group, IpPermissions=[{
        "IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
        "IpRanges": [{"CidrIp": "192.0.2.0/24", "Description": "office, added by hand"}]}])
    assert _rules(aws, group) == [("192.0.2.0/24", "office, added by hand"),
                                  (CIDR, network.CLIENT_RULE)]
    again = launch(n=1, ingress_cidr="203.0.113.50/32")
    assert again.instance_ids == first.instance_ids and again.launched_ids == []
    assert _rules(aws, group) == [("192.0.2.0/24", "office, added by hand"),
                                  ("203.0.113.50/32", network.CLIENT_RULE)]
    assert again.cidr == "203.0.113.50/32"
    assert len(api_calls.of("RevokeSecurityGroupIngress")) == 1


def test_subnets_are_in_zone_order_with_one_try_each(aws, api_calls):
    api_calls.inject = lambda op, params, n: ec2api_capacity(op) \
        if op == "RunInstances" and n <= 2 else None
    launch(n=1)
    zones = [subnet_of(c.params) for c in api_calls.of("RunInstances")]
    assert len(set(zones)) == 3


def ec2api_capacity(operation: str) -> Exception:
    from awsmock import client_error

    return client_error("InsufficientInstanceCapacity", operation)


def test_unknown_subnet_says_so(aws):
    with pytest.raises(AWSError, match=r"subnet subnet-0123456789abcdef0 does not exist.*"
                                       r"subnet_id="):
        launch(n=1, subnet_id="subnet-0123456789abcdef0")
    assert ec2api.describe_instances(aws, "test", ("pending", "running")) == []

