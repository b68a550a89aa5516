"""Providers: what turns a configuration into hosts that an agent can run on.

Every kind of machine (``local`` subprocesses, your own ``ssh`` hosts, ``aws`` VMs) is a
:class:`Provider` in :data:`PROVIDERS`, and everything else speaks only this interface:
the client's registry connects the :class:`Fleet` that :meth:`Provider.ensure` returns,
``joblib-cloud run`` starts its job on that fleet's first host, and the CLI's ``up``,
``status`` and ``down`` call the provider named in the configuration.  A new cloud is one
folder under ``providers/`` with a class that implements :class:`Provider`, and one entry
in :data:`PROVIDERS` (docs/architecture.md walks through one).

Address hook
------------
Where SSH reaches a cloud machine is decided by one function, ``fn(instance) -> (address,
port)``, given the instance as the cloud's API describes it (``DescribeInstances`` on
EC2).  The default, :func:`public_address`, uses its public IPv4 address and port 22 (an
instance without one is an error at once); :func:`private_address` uses the private
address (a client inside the VPC; then no public address is requested).  Change it with
:func:`set_address_hook`, e.g. for a bastion or port forwarding; the test-suite uses it to
map moto's instances onto loopback sshd servers and guests.

A second hook, :func:`set_sibling_hook`, decides where a ``joblib-cloud run -n N`` job's
machine reaches the cluster's other machines (same signature; default
:func:`private_address`: machines of one VPC talk over private addresses).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .client.hosts import HostSpec
    from .client.progress import Progress
    from .config import CloudConfig

Out = Callable[[str], None]


@dataclasses.dataclass
class HostTarget:
    """One host to reach: an agent subprocess on this machine (``spec`` None), or an SSH
    host with what it takes to log in and to know it is the right one."""

    name: str
    spec: HostSpec | None = None
    ssh_key: str | None = None
    known_hosts: str | None = None
    #: A booting VM refuses logins until its boot script is done: keep trying.
    retry_auth: bool = False
    #: Runs while SSH is retried, with (logins refused so far: the machine is still
    #: booting; the wait ran out); raises when the machine died or its boot is stuck.
    check: Callable[[bool, bool], None] | None = None
    #: What a connect timeout tells the user to check.
    timeout_advice: str | None = None


class Fleet:
    """What :meth:`Provider.ensure` gives the client: the hosts, the interpreter on them,
    how long to wait for them, how many workers each will have (if known before it
    answers), and what to do as each answers, or does not."""

    #: The hosts' boot installed ``packages=`` and ``requirements=`` already (aws); else,
    #: with ``sync_packages`` on, the client installs them once connected.
    boot_installs_packages = False

    def __init__(self, hosts: list[HostTarget], python: str | None = None,
                 connect_timeout: float | None = None,
                 workers_per_host: int | None = None) -> None:
        self.hosts = hosts
        self.python = python
        self.connect_timeout = connect_timeout
        self.workers_per_host = workers_per_host

    def ready(self, host: HostTarget) -> None:
        """``host`` answered, before it gets work: drop what only its boot needed."""

    def drop(self, host: HostTarget) -> None:
        """``host`` never came up while others did: release it."""

    def spent(self) -> float | None:
        """Dollars the hosts have cost so far, where the provider knows (else None)."""
        return None

    def watch(self, cluster: Any, config: CloudConfig) -> None:
        """The cluster is connected: keep an eye on what only the provider knows (aws:
        the spend against ``budget=``)."""

    def abort(self) -> None:
        """No host came up: undo what :meth:`Provider.ensure` created for this call."""

    def object_store(self) -> ObjectStoreAccess | None:
        """Where large arguments can be staged once for every host (aws: S3 in the
        cluster's region), or None: each host gets them over SSH."""
        return None


class ObjectStoreAccess(Protocol):
    """A store the client uploads objects to once and the hosts download from by URL,
    with no credentials of their own (``client/staging.py``)."""

    #: Where, for messages ("s3://bucket (eu-west-1)").
    where: str

    def ensure(self, digest: str, segments: list[bytes | memoryview], nbytes: int) -> bool:
        """The object named ``digest`` (its bytes: ``segments``) is in the store, kept
        for this cluster; True when this call uploaded it."""

    def url(self, digest: str, expires: float) -> str:
        """A GET URL for the object, good for ``expires`` seconds."""


class Provider(Protocol):
    """The interface every kind of machine implements."""

    name: str

    def ensure(self, config: CloudConfig, progress: Progress) -> Fleet:
        """Hosts for ``config``: found again, or made (launched) when missing."""

    def status(self, config: CloudConfig, args: argparse.Namespace, out: Out) -> int:
        """``joblib-cloud status``: what exists and whether it answers; an exit code."""

    def down(self, config: CloudConfig, args: argparse.Namespace, out: Out) -> int:
        """``joblib-cloud down``: remove what this provider created; an exit code."""


#: name -> "module:class", imported on first use (hosts have no boto3, for one).
PROVIDERS: dict[str, str] = {
    "aws": "joblib_cloud.providers.aws:AWSProvider",
    "ssh": "joblib_cloud.providers.ssh:SSHProvider",
    "local": "joblib_cloud.providers.local:LocalProvider",
}
_loaded: dict[str, Provider] = {}
#: Providers whose hosts' Python environment joblib-cloud made itself, so it may add to it:
#: ``sync_packages`` is on by default there (elsewhere the environment is the user's own).
MANAGED_ENVIRONMENTS = frozenset({"aws"})


def provider(name: str) -> Provider:
    if name not in _loaded:
        module, _, cls = PROVIDERS[name].partition(":")
        _loaded[name] = getattr(importlib.import_module(module), cls)()
    return _loaded[name]


# ------------------------------------------------------------------- address hook

AddressHook = Callable[[dict[str, Any]], tuple[str, int]]


def public_address(instance: dict[str, Any]) -> tuple[str, int]:
    """Default hook: the public IPv4 address, port 22."""
    address = instance.get("PublicIpAddress")
    if not address:
        from .providers.aws.ec2api import AWSError

        raise AWSError(
            f"machine {instance.get('InstanceId')} has no public IP address (subnet "
            f"{instance.get('SubnetId')}), so this computer cannot reach it: pass subnet_id= "
            "of a subnet whose VPC has an internet gateway, or, if this computer is inside "
            "the VPC, call joblib_cloud.provisioner.set_address_hook("
            "joblib_cloud.provisioner.private_address)")
    return address, 22


def private_address(instance: dict[str, Any]) -> tuple[str, int]:
    """Hook for clients inside the VPC: the private address, port 22."""
    return instance["PrivateIpAddress"], 22


_address_hook: AddressHook = public_address


def set_address_hook(fn: AddressHook | None) -> None:
    """Decide where SSH reaches each instance (``None`` restores :func:`public_address`)."""
    global _address_hook
    _address_hook = fn or public_address


def address_of(instance: dict[str, Any]) -> tuple[str, int]:
    """Where SSH reaches ``instance``, as the hook in force says."""
    address, port = _address_hook(instance)
    return address, int(port)


def wants_public_address() -> bool:
    """Whether machines need a public address for the hook in force."""
    return _address_hook is not private_address


_sibling_hook: AddressHook = private_address


def set_sibling_hook(fn: AddressHook | None) -> None:
    """Decide where a job's machine reaches its siblings (``None`` restores
    :func:`private_address`)."""
    global _sibling_hook
    _sibling_hook = fn or private_address


def sibling_address(instance: dict[str, Any]) -> tuple[str, int]:
    """Where the cluster's machines reach ``instance``, as the sibling hook says."""
    address, port = _sibling_hook(instance)
    return address, int(port)
