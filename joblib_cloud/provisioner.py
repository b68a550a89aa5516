"""The ``aws`` provider: EC2 machines for a cluster, found again by tag, never leaked.

Provisioning is a few plain functions keyed by cluster name and the tag
``joblib-cloud:cluster=<name>`` (no hidden local state that could disagree with the
cloud).  :func:`ensure_cluster` re-attaches to the cluster's running machines and
launches the missing ones, one ``RunInstances`` per host because each host gets its own
pre-generated SSH host key in its user-data.  Whatever fails part-way, everything this
call created is terminated before the error reaches the user.

Address hook
------------
Where SSH reaches an instance is decided by one function, ``fn(instance) -> (address,
port)``, given the instance as ``DescribeInstances`` returns it.  The default,
:func:`public_address`, uses its public IPv4 address (its private one when it has none)
and port 22; :func:`private_address` always uses the private address (a client inside the
VPC).  Change it with :func:`set_address_hook`, e.g. for a bastion or port forwarding;
the test-suite uses it to map moto's instances onto loopback sshd servers.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import time
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

from . import ec2api, instance_types, records, teardown, userdata
from .config import CloudConfig
from .ec2api import AWSError, CapacityError, call, tag_spec
from .hosts import HostSpec
from .progress import Progress

log = logging.getLogger("joblib_cloud")

AddressHook = Callable[[dict[str, Any]], tuple[str, int]]

DEFAULT_USER = "ec2-user"  # Amazon Linux; pass user= for other images
AWS_CONNECT_TIMEOUT = 600.0  # booting and installing Python takes minutes
DEFAULT_CONNECT_TIMEOUT = 60.0  # config.py's default: replaced by the above on aws
SSM_IMAGE = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-{arch}"
CHECKIP_URL = "https://checkip.amazonaws.com"  # AWS's own service: no third party
ROOT_VOLUME_GIB = 16
LIVE_STATES = ("pending", "running")
#: Seconds between polls while waiting for instances to run (tests shorten it).
POLL = 2.0


def public_address(instance: dict[str, Any]) -> tuple[str, int]:
    """Default hook: the public IPv4 address (private if none), port 22."""
    address = instance.get("PublicIpAddress") or instance.get("PrivateIpAddress")
    if not address:
        raise AWSError(f"instance {instance.get('InstanceId')} has no IP address yet")
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
    connect_timeout: float = AWS_CONNECT_TIMEOUT
    session: Any = None

    def abort(self) -> None:
        """Connecting failed: terminate what this call launched (never re-attached ones)."""
        if self.launched_ids:
            _cleanup(self.session, self.region, self.cluster, self.launched_ids, self.fresh)


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
    missing = max(config.n - len(existing), 0)
    launched: list[str] = []
    if missing:
        _announce(config, itype, missing, region, progress)
        try:
            _launch(sess, ec2, config, itype, user, client_pub, missing, launched, progress)
        except BaseException as exc:
            _cleanup(sess, region, config.cluster, launched, fresh=not existing, error=exc)
            raise
    ids = [i["InstanceId"] for i in existing[:config.n]] + launched
    try:
        instances = _wait_running(ec2, ids, AWS_CONNECT_TIMEOUT, progress)
        specs = _specs(region, config.cluster, instances, user)
    except BaseException as exc:
        if launched:
            _cleanup(sess, region, config.cluster, launched, fresh=not existing, error=exc)
        raise
    known = records.write_known_hosts(region, config.cluster,
                                      [(s.known_hosts_name, s.host_key or "") for s in specs])
    timeout = (AWS_CONNECT_TIMEOUT if config.connect_timeout == DEFAULT_CONNECT_TIMEOUT
               else config.connect_timeout)
    progress.update(f"{len(specs)} machines running; waiting for SSH (they boot and install "
                    f"Python {userdata.platform.python_version()} packages)")
    return ClusterHandle(config.cluster, region, specs, str(key_path), str(known), ids,
                         launched, fresh=not existing, connect_timeout=timeout, session=sess)


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
    address, port = _address_hook(instance)
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
        with urllib.request.urlopen(CHECKIP_URL, timeout=10) as response:
            ip = ipaddress.ip_address(response.read().decode().strip())
    except Exception as exc:  # noqa: BLE001 - any failure gets the same advice
        raise AWSError(
            f"could not find this computer's public IP address ({CHECKIP_URL}: {exc}), "
            "which the security group needs to open SSH to you alone. Pass "
            "ingress_cidr='203.0.113.7/32' (or set JOBLIB_CLOUD_INGRESS_CIDR).") from None
    return f"{ip}/{ip.max_prefixlen}"


def _image(sess: Any, ec2: Any, config: CloudConfig, itype: instance_types.InstanceType
           ) -> tuple[str, str]:
    """(AMI id, root device name): ``image_id`` or the current Amazon Linux 2023."""
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
    return image_id, images[0].get("RootDeviceName", "/dev/xvda")


def _default_vpc(ec2: Any) -> tuple[str, list[str]]:
    vpcs = call(ec2.describe_vpcs, "find the default VPC",
                Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"]
    if not vpcs:
        raise AWSError("this region has no default VPC: create one with "
                       "`aws ec2 create-default-vpc`, or use another region=")
    vpc = vpcs[0]["VpcId"]
    subnets = call(ec2.describe_subnets, "list subnets",
                   Filters=[{"Name": "vpc-id", "Values": [vpc]},
                            {"Name": "default-for-az", "Values": ["true"]}])["Subnets"]
    subnets.sort(key=lambda s: s["AvailabilityZone"])
    return vpc, [s["SubnetId"] for s in subnets]


def _security_group(ec2: Any, cluster: str, vpc: str, cidr: str) -> str:
    """The cluster's group (tagged at creation), with port 22 open to ``cidr`` only."""
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
            if ec2api.error_code(exc) != "InvalidGroup.Duplicate":
                raise
            raise AWSError(f"a security group named {name} exists but does not carry the tag "
                           f"{ec2api.TAG_KEY}={cluster}; joblib-cloud never touches untagged "
                           "resources: delete or rename it, or use another cluster= name"
                           ) from None
        group = {"GroupId": gid, "IpPermissions": []}
    ranges = "Ipv6Ranges" if ":" in cidr else "IpRanges"
    key = "CidrIpv6" if ":" in cidr else "CidrIp"
    opened = {r.get(key) for p in group.get("IpPermissions", []) if p.get("FromPort") == 22
              for r in p.get(ranges, [])}
    if cidr not in opened:
        try:
            call(ec2.authorize_security_group_ingress, "open SSH in the security group",
                 GroupId=group["GroupId"],
                 IpPermissions=[{"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
                                 ranges: [{key: cidr, "Description": "joblib-cloud client"}]}])
        except Exception as exc:
            if ec2api.error_code(exc) != "InvalidPermission.Duplicate":
                raise
    return group["GroupId"]


def _launch(sess: Any, ec2: Any, config: CloudConfig, itype: instance_types.InstanceType,
            user: str, client_pub: str, count: int, launched: list[str], progress: Progress
            ) -> None:
    """Launch ``count`` machines, one call each (own host key), appending each instance id
    to ``launched`` as soon as it exists (so a failure later can clean it up)."""
    image_id, root_device = _image(sess, ec2, config, itype)
    cidr = client_cidr(config)
    vpc, subnets = _default_vpc(ec2)
    group = _security_group(ec2, config.cluster, vpc, cidr)
    base = {
        "ImageId": image_id, "InstanceType": itype.name, "MinCount": 1, "MaxCount": 1,
        "SecurityGroupIds": [group],
        "InstanceInitiatedShutdownBehavior": "terminate",
        "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled",
                            "HttpPutResponseHopLimit": 1},
        "BlockDeviceMappings": [{"DeviceName": root_device, "Ebs": {
            "DeleteOnTermination": True, "VolumeSize": ROOT_VOLUME_GIB, "VolumeType": "gp3"}}],
        "TagSpecifications": [tag_spec("instance", config.cluster),
                              tag_spec("volume", config.cluster)],
    }
    spot = config.spot
    for index in range(count):
        host_private, host_public = records.generate_ed25519()
        params = dict(base, UserData=userdata.build(
            user=user, host_private_key=host_private, host_public_key=host_public,
            client_public_key=client_pub, idle_timeout=config.idle_timeout,
            max_lifetime=config.max_lifetime, boot_timeout=config.boot_timeout,
            shutdown_command=config.shutdown_command,
            packages=config.packages, requirements_path=config.requirements))
        instance, spot = _run_one(ec2, params, subnets, spot, itype.name, progress)
        launched.append(instance["InstanceId"])
        records.save_host_key(sess.region_name, config.cluster, instance["InstanceId"],
                              host_public)
        progress.update(f"launched {index + 1}/{count} machines ({instance['InstanceId']})")


def _run_one(ec2: Any, params: dict[str, Any], subnets: list[str], spot: bool,
             type_name: str, progress: Progress) -> tuple[dict[str, Any], bool]:
    """One instance: spot then on-demand if asked, each zone in turn on capacity errors.
    Returns it and whether spot is still worth trying for the next one."""
    markets = [True, False] if spot else [False]
    last: CapacityError | None = None
    for use_spot in markets:
        for subnet in subnets or [None]:
            attempt = dict(params, ClientToken=f"jc-{uuid.uuid4().hex}")
            if subnet:
                attempt["SubnetId"] = subnet
            if use_spot:
                attempt["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": {
                    "SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}}
            try:
                response = call(ec2.run_instances, f"launch a {type_name} machine", **attempt)
                return response["Instances"][0], use_spot
            except CapacityError as exc:
                last = exc
                progress.update(f"{exc}; trying the next zone")
        if use_spot:
            progress.update(f"no spot capacity for {type_name}; falling back to on-demand")
    raise AWSError(f"{last}. No zone of this region has capacity for {type_name} right now: "
                   "try another instance= type or region=, or try again later.")


def _wait_running(ec2: Any, ids: list[str], timeout: float, progress: Progress
                  ) -> list[dict[str, Any]]:
    """Poll until every instance runs with an address; a dead one is an error."""
    deadline = time.monotonic() + timeout
    while True:
        found = {}
        pages = call(lambda: list(ec2.get_paginator("describe_instances").paginate(
            Filters=[{"Name": "instance-id", "Values": ids}])), "check the machines")
        for page in pages:
            for reservation in page["Reservations"]:
                for inst in reservation["Instances"]:
                    found[inst["InstanceId"]] = inst
        dead = [i for i in found.values()
                if i["State"]["Name"] in ("shutting-down", "terminated", "stopping", "stopped")]
        if dead:
            reasons = "; ".join(f"{i['InstanceId']}: {i['State']['Name']} "
                                f"({(i.get('StateReason') or {}).get('Message', 'no reason')})"
                                for i in dead)
            raise AWSError(f"machines stopped while starting: {reasons}")
        running = [found[i] for i in ids if i in found
                   and found[i]["State"]["Name"] == "running"]
        if len(running) == len(ids):
            return running
        if time.monotonic() > deadline:
            raise AWSError(f"only {len(running)}/{len(ids)} machines were running after "
                           f"{timeout:.0f}s")
        progress.update(f"{len(running)}/{len(ids)} machines running")
        time.sleep(POLL)


def _cleanup(sess: Any, region: str, cluster: str, launched: list[str] | None, fresh: bool,
             error: BaseException | None = None) -> None:
    """Undo a failed launch.  A fresh cluster is removed entirely by tag (which also finds
    a machine whose launch response was lost); otherwise only ``launched`` goes."""
    lines: list[str] = []
    try:
        if fresh:
            ok = teardown.down_region(sess, region, cluster, dry_run=False, out=lines.append)
        else:
            ok = teardown.terminate_ids(sess.client("ec2"), launched or [], out=lines.append)
    except Exception as exc:  # noqa: BLE001 - reported with the original error
        ok, lines = False, [*lines, f"{type(exc).__name__}: {exc}"]
    if not ok and error is not None:
        note = (f"joblib-cloud could not fully clean up after this error: {'; '.join(lines)}. "
                f"Run `joblib-cloud down --cluster {cluster} --region {region}`.")
        log.error(note)
        if hasattr(error, "add_note"):  # Python 3.11+
            error.add_note(note)
