"""The ``aws`` provider: EC2 machines for a cluster, found again by tag, never leaked.

Provisioning is a few plain functions keyed by cluster name and the tag
``joblib-cloud:cluster=<name>`` (no hidden local state that could disagree with the
cloud).  :func:`ensure_cluster` re-attaches to the cluster's running machines and
launches the missing ones, one ``RunInstances`` per host because each host gets its own
pre-generated SSH host key in its user-data.  Whatever fails part-way, everything this
call created is terminated before the error reaches the user: the instances it knows of,
those its launch requests' client tokens find (a response lost on the way), and for a new
cluster everything the tag finds.

Address hook
------------
Where SSH reaches an instance is decided by one function, ``fn(instance) -> (address,
port)``, given the instance as ``DescribeInstances`` returns it.  The default,
:func:`public_address`, uses its public IPv4 address and port 22 (an instance without one
is an error at once); :func:`private_address` uses the private address (a client inside
the VPC; then no public address is requested).  Change it with :func:`set_address_hook`,
e.g. for a bastion or port forwarding; the test-suite uses it to map moto's instances
onto loopback sshd servers.
"""

from __future__ import annotations

import dataclasses
import http.client
import ipaddress
import logging
import re
import socket
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

from . import ec2api, ec2network, instance_types, records, teardown, userdata
from .config import CloudConfig
from .ec2api import AWSError, BootFailedError, CapacityError, call, tag_spec
from .ec2network import Network
from .errors import GaveUpWaitingError
from .hosts import HostSpec
from .progress import Progress

log = logging.getLogger("joblib_cloud")

AddressHook = Callable[[dict[str, Any]], tuple[str, int]]

DEFAULT_USER = "ec2-user"  # Amazon Linux; pass user= for other images
SSM_IMAGE = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-{arch}"
CHECKIP_URL = "https://checkip.amazonaws.com"  # AWS's own service: no third party
ROOT_VOLUME_GIB = 16
LIVE_STATES = ("pending", "running")
DEAD_STATES = ("shutting-down", "terminated", "stopping", "stopped")
SPOT_RECLAIMED = "Server.SpotInstanceTermination"
#: Seconds between polls while waiting for instances to run (tests shorten it).
POLL = 2.0
#: While waiting for SSH, the machines' state is checked every this many polls.
BOOT_CHECK_POLLS = 2.5
#: How long a clean-up keeps looking for (and retrying) instances EC2 does not list yet.
CONSISTENCY_TIMEOUT = 30.0
#: Lines of a failed machine's console output shown in the error.
CONSOLE_LINES = 25


def public_address(instance: dict[str, Any]) -> tuple[str, int]:
    """Default hook: the public IPv4 address, port 22."""
    address = instance.get("PublicIpAddress")
    if not address:
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


@dataclasses.dataclass
class Launches:
    """What one call launched: instance ids it got back, and the client token of every
    ``RunInstances`` it sent, so a machine whose launch response was lost is found too."""

    ids: list[str] = dataclasses.field(default_factory=list)
    spot_ids: list[str] = dataclasses.field(default_factory=list)
    tokens: list[str] = dataclasses.field(default_factory=list)
    #: Tokens of requests that failed in a way that may still have started a machine.
    uncertain: list[str] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.ids or self.uncertain)


@dataclasses.dataclass
class ClusterHandle:
    """What the ``ssh`` path needs to reach the machines, plus how to undo a launch."""

    cluster: str
    region: str
    specs: list[HostSpec]
    ssh_key: str
    known_hosts: str | None
    instance_ids: list[str]
    #: Launched by this call (not re-attached): terminated by :meth:`abort`.
    launched_ids: list[str]
    #: True if the cluster did not exist before this call: abort removes all of it.
    fresh: bool
    python: str = userdata.HOST_PYTHON
    connect_timeout: float = 1200.0
    session: Any = None
    ec2: Any = None
    launches: Launches = dataclasses.field(default_factory=Launches)
    #: Where port 22 was opened (``None``: the user's own ``security_group_id``).
    cidr: str | None = None
    security_group_id: str | None = None
    #: Machines whose metadata endpoint (which serves the user-data) is still on.
    metadata_open: list[str] = dataclasses.field(default_factory=list)
    _seen: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict, repr=False)
    _seen_at: float = dataclasses.field(default=float("-inf"), repr=False)
    #: The first machine found dead: the others stop waiting too (all or nothing).
    _failed: str | None = dataclasses.field(default=None, repr=False)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def abort(self) -> None:
        """Connecting failed: terminate what this call launched (never re-attached ones)."""
        if self.launches or self.launched_ids:
            launches = self.launches if self.launches else Launches(ids=self.launched_ids)
            _cleanup(self.session, self.region, self.cluster, launches, self.fresh)

    def boot_check(self, spec: HostSpec) -> Callable[[], None]:
        """For the SSH wait on ``spec``: raises :class:`BootFailedError` once its machine
        has left pending/running, instead of retrying a dead address until the timeout."""
        instance_id = spec.label
        return lambda: self._check_alive(instance_id)

    def _check_alive(self, instance_id: str) -> None:
        with self._lock:  # one DescribeInstances per interval for all hosts
            if time.monotonic() - self._seen_at >= POLL * BOOT_CHECK_POLLS:
                try:
                    self._seen = {i["InstanceId"]: i for i in
                                  _describe_ids(self.ec2, self.instance_ids)}
                except Exception as exc:  # noqa: BLE001 - a failed look is not a failed boot
                    log.debug("could not check the machines' state: %s", exc)
                self._seen_at = time.monotonic()
            instance = self._seen.get(instance_id)
            failed = self._failed
        if failed is not None and failed != instance_id:
            raise GaveUpWaitingError(f"stopped waiting for {instance_id}: machine {failed} "
                                     "of the same cluster failed to boot (see its error)")
        if instance is not None and instance["State"]["Name"] not in LIVE_STATES:
            with self._lock:
                self._failed = self._failed or instance_id
            raise boot_failure(self.ec2, instance)

    def timeout_advice(self) -> str:
        """What to check when a machine never accepts SSH."""
        if self.cidr is None:
            where = (f"Port 22 must be open to this computer in security group "
                     f"{self.security_group_id} (security_group_id=).")
        else:
            where = (f"Port 22 of the machines is open to {self.cidr} only: if this "
                     "computer's public address is not in it (another network, a VPN or "
                     "proxy), pass ingress_cidr= with the right one, or unset it to detect "
                     "it again.")
        return (f"{where} A machine that is only slow to boot needs a longer wait: raise "
                f"boot_timeout (or connect_timeout; now {self.connect_timeout:.0f}s).")

    def close_metadata(self) -> None:
        """The machines have booted: turn off their metadata endpoint, which would serve
        the user-data (with the host's private SSH key) to any process on them."""
        for instance_id in self.metadata_open:
            try:
                call(self.ec2.modify_instance_metadata_options,
                     "turn off the metadata endpoint", InstanceId=instance_id,
                     HttpEndpoint="disabled")
            except Exception as exc:  # noqa: BLE001 - the cluster still works
                log.warning(
                    "could not turn off the metadata endpoint of %s (%s): any process on it "
                    "can read its SSH host key. Allow ec2:ModifyInstanceMetadataOptions to "
                    "these credentials.", instance_id, exc)
        self.metadata_open = []


def ensure_cluster(config: CloudConfig, progress: Progress) -> ClusterHandle:
    """Running, reachable-by-address machines for ``config.cluster``: re-attached by tag,
    the missing ones launched."""
    sess = ec2api.session(config.region)
    region = sess.region_name
    ec2 = sess.client("ec2")
    itype = instance_types.validate(
        lambda **kw: call(ec2.describe_instance_types, "look up instance types", **kw),
        config.instance)
    user = config.user or DEFAULT_USER
    key_path, client_pub = records.client_key(region, config.cluster)
    existing = _existing(ec2, config.cluster, itype, progress)
    cidr = None if config.security_group_id else client_cidr(config)
    if existing and cidr is not None:
        ec2network.open_ssh(ec2, config.cluster, cidr)
    missing = max(config.n - len(existing), 0)
    launches = Launches()
    fresh = not existing
    try:
        launcher = None
        if missing:
            _announce(config, itype, missing, region, progress)
            launcher = _Launcher(sess, ec2, config, itype, user, client_pub, cidr, progress)
            launcher.launch(missing, config.spot, launches)
        ids = [i["InstanceId"] for i in existing[:config.n]] + launches.ids
        instances = _wait_replacing_spot(ec2, ids, launcher, launches, config, progress)
        specs = _specs(region, config.cluster, instances, user)
    except BaseException as exc:
        if fresh or launches:
            _cleanup(sess, region, config.cluster, launches, fresh, error=exc)
        raise
    known = records.write_known_hosts(region, config.cluster,
                                      [(s.known_hosts_name, s.host_key or "") for s in specs])
    timeout = (config.boot_timeout if config.connect_timeout is None
               else config.connect_timeout)
    progress.update(f"{len(specs)} machines running; waiting for SSH (they boot and install "
                    f"Python {userdata.platform.python_version()} packages)")
    return ClusterHandle(
        config.cluster, region, specs, str(key_path), str(known),
        [i["InstanceId"] for i in instances], launches.ids, fresh=fresh,
        connect_timeout=timeout, session=sess, ec2=ec2, launches=launches, cidr=cidr,
        security_group_id=config.security_group_id,
        metadata_open=[i["InstanceId"] for i in instances
                       if (i.get("MetadataOptions") or {}).get("HttpEndpoint") != "disabled"])


# ---------------------------------------------------------------- re-attaching


def _existing(ec2: Any, cluster: str, itype: instance_types.InstanceType, progress: Progress
              ) -> list[dict[str, Any]]:
    """The cluster's live machines, oldest first; a clear error if they don't fit."""
    found = ec2api.describe_instances(ec2, cluster, LIVE_STATES)
    found.sort(key=lambda i: (i.get("LaunchTime") or 0, i["InstanceId"]))
    other = sorted({i["InstanceType"] for i in found} - {itype.name})
    if other:
        raise AWSError(
            f"cluster {cluster!r} already runs {', '.join(other)} machines, not {itype.name}: "
            f"use another cluster= name, or remove it first with "
            f"`joblib-cloud down --cluster {cluster}`")
    if found:
        progress.update(f"re-attaching to {len(found)} running machines of cluster {cluster!r}")
    return found


def _specs(region: str, cluster: str, instances: list[dict[str, Any]], user: str
           ) -> list[HostSpec]:
    keys = records.host_keys(region, cluster)
    specs = []
    for inst in instances:
        iid = inst["InstanceId"]
        if iid not in keys:
            raise AWSError(
                f"machine {iid} of cluster {cluster!r} was launched from another computer (or "
                f"{records.cluster_dir(region, cluster)} was deleted), so its SSH keys are "
                f"unknown here. Remove the cluster with `joblib-cloud down --cluster "
                f"{cluster}`, or use another cluster= name.")
        address, port = _address_hook(inst)
        specs.append(HostSpec(address=address, port=int(port), user=user,
                              label=f"{iid}", host_key=keys[iid]))
    return specs


def idle_seconds(region: str, cluster: str, instance: dict[str, Any], user: str | None,
                 timeout: float = 5.0) -> float | None:
    """Seconds since the host's agent last reported activity (its kill-switch clock), read
    over a verified SSH connection; None when it cannot be reached or never ran."""
    from .transport import SSHConnection

    host_key = records.host_keys(region, cluster).get(instance["InstanceId"])
    if host_key is None or instance["State"]["Name"] != "running":
        return None
    key_path, _ = records.client_key(region, cluster)
    try:
        address, port = _address_hook(instance)
    except Exception:  # noqa: BLE001 - no usable address: shown as "?"
        return None
    spec = HostSpec(address=address, port=int(port), user=user or DEFAULT_USER,
                    label=instance["InstanceId"], host_key=host_key)
    try:
        connection = SSHConnection(spec, key_path=str(key_path), known_hosts=str(
            records.cluster_dir(region, cluster) / "known_hosts"), connect_timeout=timeout)
    except Exception:  # noqa: BLE001 - unreachable or still booting: shown as "?"
        return None
    try:
        channel = connection.exec('h="${JOBLIB_CLOUD_HOME:-$HOME/.joblib-cloud}"; '
                                  'echo $(( $(date +%s) - $(stat -c %Y "$h/activity") ))')
        channel.settimeout(timeout)
        output = b""
        while chunk := channel.recv(1024):
            output += chunk
        return float(output.decode().strip())
    except Exception:  # noqa: BLE001 - no activity file yet, or the read timed out
        return None
    finally:
        connection.close()


# ---------------------------------------------------------------- launching


def _announce(config: CloudConfig, itype: instance_types.InstanceType, count: int,
              region: str, progress: Progress) -> None:
    price = itype.hourly_usd
    cost = f"est. ${price * count:.2f}/h on-demand" if price is not None else "price unknown"
    alias = f"{itype.alias} = " if itype.alias else ""
    progress.done(
        f"launching {count} x {alias}{itype.name} ({itype.vcpus} vCPU, "
        f"{itype.memory_gib:g} GiB) in {region}{' as spot' if config.spot else ''}: {cost}. "
        f"They stop after {config.idle_timeout:.0f}s idle and {config.max_lifetime / 3600:g}h "
        f"at most; `joblib-cloud down --cluster {config.cluster}` removes them now.")


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


def _ipv4_connection(address: tuple[str, int], timeout: Any = socket._GLOBAL_DEFAULT_TIMEOUT,
                     source_address: Any = None, **_: Any) -> socket.socket:
    host, port = address
    last: OSError | None = None
    for family, kind, proto, _, sockaddr in socket.getaddrinfo(host, port, socket.AF_INET,
                                                               socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
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
        return self.do_open(_IPv4HTTPSConnection, req, context=self._context)


def _image(sess: Any, ec2: Any, config: CloudConfig, itype: instance_types.InstanceType
           ) -> tuple[str, str, int]:
    """(AMI id, root device name, size of its root snapshot in GiB): ``image_id`` or the
    current Amazon Linux 2023."""
    image_id = config.image_id
    if image_id is None:
        name = SSM_IMAGE.format(arch=itype.arch)
        ssm = sess.client("ssm")
        try:
            image_id = call(ssm.get_parameter, "look up the Amazon Linux image",
                            Name=name)["Parameter"]["Value"]
        except Exception as exc:
            if ec2api.error_code(exc) != "ParameterNotFound":
                raise
            raise AWSError(f"no Amazon Linux image parameter {name} in this region: pass "
                           "image_id='ami-...'") from None
    images = call(ec2.describe_images, "look up the machine image",
                  ImageIds=[image_id])["Images"]
    if not images:
        raise AWSError(f"image {image_id} does not exist in this region: unset image_id= "
                       "or pass an AMI id from this region")
    root = images[0].get("RootDeviceName", "/dev/xvda")
    sizes = [int(m["Ebs"].get("VolumeSize") or 0) for m in images[0].get("BlockDeviceMappings")
             or () if m.get("DeviceName") == root and "Ebs" in m]
    return image_id, root, max(sizes, default=0)


class _Launcher:
    """Launches machines for one ``ensure_cluster`` call, one ``RunInstances`` each."""

    def __init__(self, sess: Any, ec2: Any, config: CloudConfig,
                 itype: instance_types.InstanceType, user: str, client_pub: str,
                 cidr: str | None, progress: Progress) -> None:
        image_id, root_device, snapshot_gib = _image(sess, ec2, config, itype)
        self.network: Network = ec2network.find_network(ec2, config, sess.region_name, cidr)
        self.public_ip = _address_hook is not private_address
        self.sess, self.ec2, self.config, self.itype = sess, ec2, config, itype
        self.user, self.client_pub, self.progress = user, client_pub, progress
        self.base = {
            "ImageId": image_id, "InstanceType": itype.name, "MinCount": 1, "MaxCount": 1,
            "InstanceInitiatedShutdownBehavior": "terminate",
            "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled",
                                "HttpPutResponseHopLimit": 1},
            "BlockDeviceMappings": [{"DeviceName": root_device, "Ebs": {
                "DeleteOnTermination": True, "VolumeType": "gp3",
                "VolumeSize": max(ROOT_VOLUME_GIB, snapshot_gib)}}],
            "TagSpecifications": [tag_spec("instance", config.cluster),
                                  tag_spec("volume", config.cluster)],
        }

    def launch(self, count: int, spot: bool, launches: Launches) -> None:
        """Launch ``count`` machines, recording each in ``launches`` as soon as it exists
        (so a failure later can clean it up)."""
        config = self.config
        for index in range(count):
            host_private, host_public = records.generate_ed25519()
            params = dict(self.base, UserData=userdata.build(
                user=self.user, host_private_key=host_private, host_public_key=host_public,
                client_public_key=self.client_pub, idle_timeout=config.idle_timeout,
                max_lifetime=config.max_lifetime, boot_timeout=config.boot_timeout,
                shutdown_command=config.shutdown_command,
                packages=config.packages, requirements_path=config.requirements))
            instance, used_spot = self._run_one(params, spot, launches)
            spot = spot and used_spot
            iid = instance["InstanceId"]
            launches.ids.append(iid)
            if used_spot:
                launches.spot_ids.append(iid)
            records.save_host_key(self.sess.region_name, config.cluster, iid, host_public)
            self.progress.update(f"launched {index + 1}/{count} machines ({iid})")

    def _run_one(self, params: dict[str, Any], spot: bool, launches: Launches
                 ) -> tuple[dict[str, Any], bool]:
        """One instance: spot then on-demand if asked, each zone in turn on capacity
        errors.  Returns it and whether it is a spot instance."""
        type_name = self.itype.name
        last: CapacityError | None = None
        for use_spot in ([True, False] if spot else [False]):
            for subnet in self.network.subnets:
                attempt = dict(params, **ec2network.interface_params(self.network, subnet,
                                                                     self.public_ip))
                if use_spot:
                    attempt["InstanceMarketOptions"] = {
                        "MarketType": "spot", "SpotOptions": {
                            "SpotInstanceType": "one-time",
                            "InstanceInterruptionBehavior": "terminate"}}
                try:
                    return _run_instance(self.ec2, attempt, type_name, launches), use_spot
                except CapacityError as exc:
                    last = exc
                    self.progress.update(f"{exc}; trying the next zone")
                except Exception as exc:
                    if not (use_spot and ec2api.cause_code(exc) == ec2api.SPOT_ROLE_CODE):
                        raise
                    log.warning(
                        "this AWS account cannot use spot yet (%s): launching on-demand "
                        "instead. To enable spot, run once: %s", ec2api.SPOT_ROLE_CODE,
                        ec2api.SPOT_ROLE_FIX)
                    break
            if use_spot:
                self.progress.update(f"no spot machine for {type_name}; trying on-demand")
        raise AWSError(f"{last}. No zone of this region has capacity for {type_name} right now: "
                       "try another instance= type or region=, or try again later.")


def _run_instance(ec2: Any, params: dict[str, Any], type_name: str, launches: Launches
                  ) -> dict[str, Any]:
    """``RunInstances`` with a fresh client token, recorded before the request goes out."""
    token = f"jc-{uuid.uuid4().hex}"
    launches.tokens.append(token)
    try:
        response = call(ec2.run_instances, f"launch a {type_name} machine", ClientToken=token,
                        **params)
    except BaseException as exc:
        if _maybe_launched(exc):
            launches.uncertain.append(token)
        raise
    return response["Instances"][0]


def _maybe_launched(exc: BaseException) -> bool:
    """Whether a failed ``RunInstances`` may still have started a machine: not when EC2
    refused it (a 4xx answer, or an error classified as a refusal)."""
    if isinstance(exc, AWSError):
        return False
    response = getattr(exc, "response", None)
    if response is None:
        return True  # no answer at all (network, Ctrl-C): EC2 may have acted
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 500
    return status >= 500


def _describe_ids(ec2: Any, ids: list[str]) -> list[dict[str, Any]]:
    if not ids:
        return []
    pages = call(lambda: list(ec2.get_paginator("describe_instances").paginate(
        Filters=[{"Name": "instance-id", "Values": ids}])), "check the machines")
    return [i for page in pages for r in page["Reservations"] for i in r["Instances"]]


def _wait_running(ec2: Any, ids: list[str], timeout: float, progress: Progress,
                  replaceable: set[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """Poll until every instance runs: (the instances, []); or ([], ids) of spot instances
    in ``replaceable`` that EC2 took back before they ran.  Any other that stops is an
    error that says why."""
    deadline = time.monotonic() + timeout
    while True:
        found = {i["InstanceId"]: i for i in _describe_ids(ec2, ids)}
        dead = [i for i in found.values() if i["State"]["Name"] in DEAD_STATES]
        reclaimed = [i["InstanceId"] for i in dead if i["InstanceId"] in replaceable
                     and (i.get("StateReason") or {}).get("Code") == SPOT_RECLAIMED]
        if reclaimed:
            return [], reclaimed
        if dead:
            raise boot_failure(ec2, dead[0], others=dead[1:])
        running = [found[i] for i in ids if i in found
                   and found[i]["State"]["Name"] == "running"]
        if len(running) == len(ids):
            return running, []
        if time.monotonic() > deadline:
            raise AWSError(f"only {len(running)}/{len(ids)} machines were running after "
                           f"{timeout:.0f}s: try again, or another region= or instance=")
        progress.update(f"{len(running)}/{len(ids)} machines running")
        time.sleep(POLL)


def _wait_replacing_spot(ec2: Any, ids: list[str], launcher: _Launcher | None,
                         launches: Launches, config: CloudConfig, progress: Progress
                         ) -> list[dict[str, Any]]:
    """:func:`_wait_running`, replacing spot machines taken back while pending by
    on-demand ones."""
    ids = list(ids)
    while True:
        instances, reclaimed = _wait_running(ec2, ids, config.boot_timeout, progress,
                                             set(launches.spot_ids))
        if not reclaimed:
            return instances
        assert launcher is not None
        log.warning("EC2 took back spot machine(s) %s before they ran (%s): launching "
                    "on-demand ones instead", ", ".join(reclaimed), SPOT_RECLAIMED)
        ids = [i for i in ids if i not in reclaimed]
        before = len(launches.ids)
        launcher.launch(len(reclaimed), False, launches)
        ids += launches.ids[before:]


def console_tail(ec2: Any, instance_id: str, lines: int = CONSOLE_LINES) -> str:
    """The last ``lines`` of the machine's console output (where the boot script writes)."""
    try:
        try:
            response = ec2.get_console_output(InstanceId=instance_id, Latest=True)
        except Exception as exc:
            if not ec2api.error_code(exc).startswith(("Unsupported", "InvalidParameter")):
                raise
            response = ec2.get_console_output(InstanceId=instance_id)  # not on Xen types
    except Exception as exc:  # noqa: BLE001 - the error is still worth showing without it
        return f"(console output unavailable: {ec2api.error_code(exc) or exc})"
    tail = boot_lines(response.get("Output") or "")[-lines:]
    return "\n".join(tail) if tail else "(no console output yet)"


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def boot_lines(console: str) -> list[str]:
    """The console lines that tell how the boot went: what cloud-init and joblib-cloud
    printed (the boot script, the kill switch), without the rest of the system's start
    and stop messages; all lines if there are none of those.  (botocore has already
    decoded EC2's base64.)"""
    rows = [_ANSI.sub("", row).rstrip() for row in console.splitlines()]
    rows = [row for row in rows if row.strip()]
    ours = [row for row in rows if "cloud-init[" in row or "joblib-cloud" in row]
    return ours or rows


def boot_failure(ec2: Any, instance: dict[str, Any],
                 others: list[dict[str, Any]] | None = None) -> BootFailedError:
    """The error for a machine that stopped before it accepted SSH."""
    iid, state = instance["InstanceId"], instance["State"]["Name"]
    reason = instance.get("StateReason") or {}
    why = reason.get("Message") or instance.get("StateTransitionReason") or "no reason given"
    if reason.get("Code") == SPOT_RECLAIMED:
        advice = "EC2 took the spot capacity back: run again, or use spot=False."
    else:
        advice = ("Fix what the console output shows (e.g. a package in packages= or "
                  "requirements= that does not install, or an image_id= without the "
                  "expected user or Python), then run again.")
    also = "".join(f" Also {o['InstanceId']}: {o['State']['Name']}." for o in others or ())
    return BootFailedError(
        f"machine {iid} stopped while booting: it is {state} ({why}).{also} {advice}\n"
        f"Last lines of its console output:\n{console_tail(ec2, iid)}")


def _find_by_tokens(ec2: Any, launches: Launches) -> tuple[set[str], list[str]]:
    """Instances the launch requests' client tokens find, waiting a bounded time for the
    requests of unknown outcome to show up.  Returns (ids, tokens never found)."""
    deadline = time.monotonic() + CONSISTENCY_TIMEOUT
    found: dict[str, str] = {}
    delay = POLL
    while True:
        for start in range(0, len(launches.tokens), 100):
            batch = launches.tokens[start:start + 100]
            pages = call(lambda b=batch: list(ec2.get_paginator("describe_instances").paginate(
                Filters=[{"Name": "client-token", "Values": b}])), "find launched machines")
            found.update({i["ClientToken"]: i["InstanceId"] for page in pages
                          for r in page["Reservations"] for i in r["Instances"]
                          if i.get("ClientToken")})
        missing = [t for t in launches.uncertain if t not in found]
        if not missing or time.monotonic() > deadline:
            return set(found.values()), missing
        time.sleep(delay)
        delay = min(delay * 2, 5.0)


def _cleanup(sess: Any, region: str, cluster: str, launches: Launches, fresh: bool,
             error: BaseException | None = None) -> None:
    """Undo a failed launch: terminate what this call launched (found by id, by client
    token, and for a fresh cluster by tag), then for a fresh cluster remove the rest."""
    lines: list[str] = []
    try:
        ec2 = sess.client("ec2")
        ids = set(launches.ids)
        if launches.tokens:
            by_token, lost = _find_by_tokens(ec2, launches)
            ids |= by_token
            if lost:
                lines.append(f"launch requests {', '.join(lost)} may still start machines")
        if fresh:
            ids |= {i["InstanceId"] for i in
                    ec2api.describe_instances(ec2, cluster, teardown.ALL_STATES)}
        ok = not lines
        ok &= teardown.terminate_ids(ec2, sorted(ids), out=lines.append,
                                     not_found_timeout=CONSISTENCY_TIMEOUT)
        if fresh:
            ok &= teardown.down_region(sess, region, cluster, dry_run=False, out=lines.append)
    except Exception as exc:  # noqa: BLE001 - reported with the original error
        ok, lines = False, [*lines, f"{type(exc).__name__}: {exc}"]
    if not ok:
        note = (f"joblib-cloud could not fully clean up after this error: {'; '.join(lines)}. "
                f"Run `joblib-cloud down --cluster {cluster} --region {region}`.")
        log.error(note)
        if error is not None and hasattr(error, "add_note"):  # Python 3.11+
            error.add_note(note)
