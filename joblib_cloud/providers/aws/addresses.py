"""Where SSH reaches an EC2 machine, from the instance as ``DescribeInstances`` gives it.

What applies unless a hook is set with ``provisioner.set_address_hook`` (this computer to
a machine) or ``provisioner.set_sibling_hook`` (a machine to the cluster's others):
:func:`public_address` and :func:`private_address`.
"""

from __future__ import annotations

from typing import Any

from ... import provisioner
from .ec2api import AWSError

NAME = "aws"


def public_address(instance: dict[str, Any]) -> tuple[str, int]:
    """Default hook: the public IPv4 address, port 22."""
    address = instance.get("PublicIpAddress")
    if not address:
        raise AWSError(
            f"machine {instance.get('InstanceId')} has no public IP address (subnet "
            f"{instance.get('SubnetId')}), so this computer cannot reach it: pass subnet_id= "
            "of a subnet whose VPC has an internet gateway, or, if this computer is inside "
            "the VPC, call joblib_cloud.provisioner.set_address_hook("
            "joblib_cloud.providers.aws.addresses.private_address)")
    return address, 22


def private_address(instance: dict[str, Any]) -> tuple[str, int]:
    """Hook for clients inside the VPC, and between machines: the private address, 22."""
    return instance["PrivateIpAddress"], 22


def address_of(instance: dict[str, Any]) -> tuple[str, int]:
    """Where SSH reaches ``instance`` from this computer, as the hook in force says."""
    address, port = (provisioner.hook(NAME, "address") or public_address)(instance)
    return address, int(port)


def wants_public_address() -> bool:
    """Whether machines need a public address for the hook in force."""
    return provisioner.hook(NAME, "address") is not private_address


def sibling_address(instance: dict[str, Any]) -> tuple[str, int]:
    """Where the cluster's machines reach ``instance``, as the sibling hook says."""
    address, port = (provisioner.hook(NAME, "sibling") or private_address)(instance)
    return address, int(port)
