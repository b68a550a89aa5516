"""Where the ``aws`` provider's machines live on the network: subnet, VPC, security group.

The machines need a subnet whose VPC routes to the internet (the default VPC's, or
``subnet_id``) and a security group that opens port 22 to the client only: the cluster's
own (tagged, created on first use) or ``security_group_id``, which is used as it is.
"""

from __future__ import annotations

import dataclasses
import http.client
import ipaddress
import logging
import socket
import urllib.request
from typing import Any

from ...config import CloudConfig
from . import ec2api
from .ec2api import AWSError, call, tag_spec

log = logging.getLogger("joblib_cloud")

#: Description of the port-22 rules joblib-cloud adds: rules without it are never touched.
CLIENT_RULE = "joblib-cloud client"
#: The self-referencing rule: the cluster's machines reach each other on port 22.
SIBLING_RULE = "joblib-cloud cluster machines"


@dataclasses.dataclass(frozen=True)
class Network:
    """Where to launch: the VPC, its subnets in zone order (``None``: EC2 picks) and the
    security group."""

    vpc: str
    subnets: list[str | None]
    group: str


def find_network(ec2: Any, config: CloudConfig, region: str, cidr: str | None) -> Network:
    """The subnets and security group for new machines of ``config.cluster``."""
    vpc, subnets = _subnets(ec2, config, region)
    if config.security_group_id:
        group = _user_group(ec2, config.security_group_id, vpc)
    else:
        assert cidr is not None
        group = security_group(ec2, config.cluster, vpc, cidr)
    return Network(vpc, subnets, group)


def _subnets(ec2: Any, config: CloudConfig, region: str) -> tuple[str, list[str | None]]:
    if config.subnet_id:
        found = _by_id(ec2.describe_subnets, "look up subnet_id", "Subnets", "SubnetIds",
                       config.subnet_id, "InvalidSubnetID.NotFound")
        if not found:
            raise AWSError(f"subnet {config.subnet_id} does not exist in region {region}: pass "
                           "a subnet_id= of this region (or change region=)")
        return found[0]["VpcId"], [config.subnet_id]
    vpcs = call(ec2.describe_vpcs, "find the default VPC",
                Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"]
    if not vpcs:
        raise AWSError(
            f"region {region} has no default VPC: pass subnet_id='subnet-...' (a subnet "
            "whose VPC has an internet gateway), or create a default VPC with "
            f"`aws ec2 create-default-vpc --region {region}`")
    vpc = vpcs[0]["VpcId"]
    subnets = call(ec2.describe_subnets, "list subnets",
                   Filters=[{"Name": "vpc-id", "Values": [vpc]},
                            {"Name": "default-for-az", "Values": ["true"]}])["Subnets"]
    subnets.sort(key=lambda s: s["AvailabilityZone"])
    return vpc, [s["SubnetId"] for s in subnets] or [None]


def _by_id(describe: Any, what: str, key: str, ids_param: str, resource_id: str,
           not_found: str) -> list[dict[str, Any]]:
    """The resource with this id, or [] when EC2 says there is none."""
    try:
        return call(describe, what, **{ids_param: [resource_id]})[key]
    except Exception as exc:
        ec2api.unless(exc, not_found)
        return []


def _user_group(ec2: Any, group_id: str, vpc: str) -> str:
    """``security_group_id``, checked to exist in the VPC the machines launch in."""
    groups = _by_id(ec2.describe_security_groups, "look up security_group_id",
                    "SecurityGroups", "GroupIds", group_id, "InvalidGroup.NotFound")
    if not groups:
        raise AWSError(f"security group {group_id} does not exist in this region: pass a "
                       "security_group_id= of this region, or unset it")
    if groups[0].get("VpcId") != vpc:
        raise AWSError(f"security group {group_id} belongs to VPC {groups[0].get('VpcId')}, "
                       f"but the machines launch in VPC {vpc}: pass a subnet_id= of that VPC, "
                       "or a security_group_id= of this one")
    return group_id


def security_group(ec2: Any, cluster: str, vpc: str, cidr: str) -> str:
    """The cluster's group in ``vpc`` (tagged at creation), port 22 open to ``cidr``."""
    groups = call(ec2.describe_security_groups, "list security groups",
                  Filters=ec2api.cluster_filter(cluster) + [{"Name": "vpc-id", "Values": [vpc]}]
                  )["SecurityGroups"]
    name = f"joblib-cloud-{cluster}"
    if groups:
        group = groups[0]
    else:
        try:
            gid = call(ec2.create_security_group, "create a security group", GroupName=name,
                       Description=f"joblib-cloud cluster {cluster}: SSH from the client only",
                       VpcId=vpc, TagSpecifications=[tag_spec("security-group", cluster)]
                       )["GroupId"]
        except Exception as exc:
            ec2api.unless(exc, "InvalidGroup.Duplicate")
            raise AWSError(f"a security group named {name} exists but does not carry the tag "
                           f"{ec2api.TAG_KEY}={cluster}; joblib-cloud never touches untagged "
                           "resources: delete or rename it, or use another cluster= name"
                           ) from None
        group = {"GroupId": gid, "IpPermissions": []}
    ssh_rule(ec2, group, cidr)
    sibling_rule(ec2, group)
    return group["GroupId"]


def sibling_rule(ec2: Any, group: dict[str, Any]) -> None:
    """Port 22 open to the group's own members and nothing else: a ``run -n N`` job
    reaches the cluster's other machines (with the cluster's key) over SSH."""
    gid = group["GroupId"]
    for perm in group.get("IpPermissions", []):
        if (perm.get("IpProtocol"), perm.get("FromPort"), perm.get("ToPort")) == \
                ("tcp", 22, 22) and any(pair.get("GroupId") == gid
                                        for pair in perm.get("UserIdGroupPairs") or []):
            return
    try:
        call(ec2.authorize_security_group_ingress, "let the cluster's machines reach "
             "each other on SSH", GroupId=gid,
             IpPermissions=[{"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
                             "UserIdGroupPairs": [{"GroupId": gid,
                                                   "Description": SIBLING_RULE}]}])
    except Exception as exc:
        ec2api.unless(exc, "InvalidPermission.Duplicate")


def open_ssh(ec2: Any, cluster: str, cidr: str) -> None:
    """Port 22 of every group of the cluster open to ``cidr`` (re-attaching from a new
    address), and our rules for other addresses revoked."""
    groups = call(ec2.describe_security_groups, "list security groups",
                  Filters=ec2api.cluster_filter(cluster))["SecurityGroups"]
    for group in groups:
        if ec2api.tag_value(group) == cluster:
            ssh_rule(ec2, group, cidr)
            sibling_rule(ec2, group)


_RANGES = (("IpRanges", "CidrIp"), ("Ipv6Ranges", "CidrIpv6"))


def _ranges_key(cidr: str) -> tuple[str, str]:
    return _RANGES[1] if ":" in cidr else _RANGES[0]


def ssh_rule(ec2: Any, group: dict[str, Any], cidr: str) -> None:
    """Open port 22 to ``cidr``, then revoke our rules for any other address: a computer
    whose address changed must not leave its old address (now someone else's) open."""
    opened, stale = False, []
    for perm in group.get("IpPermissions", []):
        if (perm.get("IpProtocol"), perm.get("FromPort"), perm.get("ToPort")) != ("tcp", 22, 22):
            continue
        for ranges, key in _RANGES:
            for entry in perm.get(ranges) or []:
                if entry.get(key) == cidr:
                    opened = True
                elif entry.get("Description") == CLIENT_RULE:
                    stale.append(entry[key])
    gid = group["GroupId"]
    if not opened:
        ranges, key = _ranges_key(cidr)
        try:
            call(ec2.authorize_security_group_ingress, "open SSH in the security group",
                 GroupId=gid, IpPermissions=[{"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
                                              ranges: [{key: cidr, "Description": CLIENT_RULE}]}])
        except Exception as exc:
            ec2api.unless(exc, "InvalidPermission.Duplicate")
    for old in stale:
        ranges, key = _ranges_key(old)
        log.info("closing SSH in %s to %s (this computer's address is now %s)", gid, old, cidr)
        try:
            call(ec2.revoke_security_group_ingress, "close SSH to an old address",
                 GroupId=gid, IpPermissions=[{"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
                                              ranges: [{key: old}]}])
        except Exception as exc:
            ec2api.unless(exc, "InvalidPermission.NotFound")


def interface_params(network: Network, subnet: str | None, public_ip: bool
                     ) -> dict[str, Any]:
    """``RunInstances`` parameters for the network.  A public address is asked for
    explicitly: a subnet (even a default one) may not hand them out on its own."""
    if not public_ip:
        return {"SecurityGroupIds": [network.group], **({"SubnetId": subnet} if subnet else {})}
    nic: dict[str, Any] = {"DeviceIndex": 0, "AssociatePublicIpAddress": True,
                           "Groups": [network.group], "DeleteOnTermination": True}
    if subnet:
        nic["SubnetId"] = subnet
    return {"NetworkInterfaces": [nic]}


# ---------------------------------------------------------------- the client's address

CHECKIP_URL = "https://checkip.amazonaws.com"  # AWS's own service: no third party


def client_cidr(config: CloudConfig) -> str:
    """Where SSH may come from: ``ingress_cidr``, else this computer's public address."""
    if config.ingress_cidr:
        try:
            return str(ipaddress.ip_network(config.ingress_cidr, strict=False))
        except ValueError as exc:
            raise ValueError(f"invalid ingress_cidr {config.ingress_cidr!r}: {exc}") from None
    try:
        ip = ipaddress.ip_address(lookup_public_ip(CHECKIP_URL))
    except Exception as exc:  # noqa: BLE001 - any failure gets the same advice
        raise AWSError(
            f"could not find this computer's public IP address ({CHECKIP_URL}: {exc}), "
            "which the security group needs to open SSH to you alone. Pass "
            "ingress_cidr='203.0.113.7/32' (or set JOBLIB_CLOUD_INGRESS_CIDR).") from None
    return f"{ip}/{ip.max_prefixlen}"


def lookup_public_ip(url: str, timeout: float = 10.0) -> str:
    """The address ``url`` sees this computer come from, asked over IPv4 and never
    through a proxy: SSH to the machines goes out directly over IPv4, so a proxy's or an
    IPv6 address would open the wrong door."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _IPv4HTTPHandler,
                                         _IPv4HTTPSHandler)
    with opener.open(url, timeout=timeout) as response:
        return response.read().decode().strip()


#: What http.client passes as the timeout when none was given (keep the socket's default).
_NO_TIMEOUT: object = getattr(socket, "_GLOBAL_DEFAULT_TIMEOUT", object())


def _ipv4_connection(address: tuple[str, int], timeout: Any = _NO_TIMEOUT,
                     source_address: Any = None, **_: Any) -> socket.socket:
    host, port = address
    last: OSError | None = None
    for family, kind, proto, _name, sockaddr in socket.getaddrinfo(
            host, port, socket.AF_INET, socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            if timeout is not _NO_TIMEOUT:
                sock.settimeout(timeout)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
    raise last or OSError(f"no IPv4 address for {host}")


class _IPv4HTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = _ipv4_connection


class _IPv4HTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = _ipv4_connection


class _IPv4HTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(_IPv4HTTPConnection, req)


class _IPv4HTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(_IPv4HTTPSConnection, req, context=getattr(self, "_context", None))

