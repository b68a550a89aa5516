"""Launching: EC2 machines for a cluster, re-attached by tag, the missing ones started.

Provisioning is a few plain functions keyed by cluster name and the tag
``joblib-cloud:cluster=<name>`` (no hidden local state that could disagree with the
cloud).  :func:`ensure_cluster` re-attaches to the cluster's running machines and
launches the missing ones, one ``RunInstances`` per host because each host gets its own
pre-generated SSH host key in its user-data.  Whatever fails part-way, everything this
call created is terminated before the error reaches the user (``machines.py``).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from ...client.hosts import HostSpec
from ...client.progress import Progress
from ...config import CloudConfig
from . import (
    addresses,
    budget,
    ec2api,
    instance_types,
    ledger,
    machines,
    network,
    prices,
    sshkeys,
    userdata,
)
from .ec2api import AWSError, CapacityError, call, tag_spec
from .machines import (
    DEAD_STATES,
    LIVE_STATES,
    SPOT_RECLAIMED,
    ClusterHandle,
    Launches,
    _cleanup,
    _describe_ids,
    boot_failure,
)
from .network import Network, client_cidr

log = logging.getLogger("joblib_cloud")


DEFAULT_USER = "ec2-user"  # Amazon Linux; pass user= for other images


SSM_IMAGE = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-{arch}"


ROOT_VOLUME_GIB = 16


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
    key_path, client_pub = sshkeys.client_key(region, config.cluster)
    existing = _existing(ec2, config.cluster, itype, progress)
    cidr = None if config.security_group_id else client_cidr(config)
    if existing and cidr is not None:
        network.open_ssh(ec2, config.cluster, cidr)
    missing = max(config.n - len(existing), 0)
    launches = Launches()
    fresh = not existing
    try:
        launcher, dollars = None, None
        usd_per_hour: float | None
        rates = _existing_prices(sess, ec2, itype, existing)  # each machine's own, for spend
        if config.budget is not None:  # each machine's kill switch holds its share
            usd_per_hour = budget.hourly_price(sess, ec2, config, itype)
            dollars = budget.share(config, itype, usd_per_hour, budget.spend(
                rates, {i["InstanceId"]: i["LaunchTime"] for i in existing}))
        else:
            usd_per_hour = budget.launch_price(sess, ec2, config.spot, itype)
        if missing:
            _announce(sess, ec2, config, itype, missing, progress)
            launcher = _Launcher(sess, ec2, config, itype, user, client_pub, cidr, progress,
                                 {config.spot: usd_per_hour}, dollars)
            launcher.launch(missing, config.spot, launches)
            rates.update(launcher.rates)
        ids = [i["InstanceId"] for i in existing[:config.n]] + launches.ids
        instances = _wait_replacing_spot(ec2, ids, launcher, launches, config, progress)
        if launcher is not None:
            rates.update(launcher.rates)  # spot machines taken back were replaced
        specs = _specs(region, config.cluster, instances, user)
    except BaseException as exc:
        if fresh or launches:
            _cleanup(sess, region, config.cluster, launches, fresh, error=exc)
        raise
    known = sshkeys.write_known_hosts(region, config.cluster,
                                      [(s.known_hosts_name, s.host_key or "") for s in specs])
    timeout = (config.boot_timeout if config.connect_timeout is None
               else config.connect_timeout)
    progress.update(f"{len(specs)} machines running; waiting for SSH (they boot and install "
                    f"Python {userdata.platform.python_version()} packages)")
    return ClusterHandle(
        config.cluster, region, specs, str(key_path), str(known),
        [i["InstanceId"] for i in instances], launches.ids, fresh=fresh,
        connect_timeout=timeout, vcpus=itype.vcpus,
        usd_per_hour={i["InstanceId"]: rates[i["InstanceId"]] for i in instances
                      if i["InstanceId"] in rates},
        launch_times={i["InstanceId"]: i["LaunchTime"] for i in instances}, session=sess,
        ec2=ec2,
        launches=launches, cidr=cidr,
        security_group_id=config.security_group_id,
        metadata_open=[i["InstanceId"] for i in instances
                       if (i.get("MetadataOptions") or {}).get("HttpEndpoint") != "disabled"])


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


def _existing_prices(sess: Any, ec2: Any, itype: instance_types.InstanceType,
                     existing: list[dict[str, Any]]) -> dict[str, float]:
    """The USD/h of each running machine: as recorded at its launch, else its market's
    price now."""
    recorded = ledger.read()
    rates: dict[str, float] = {}
    for inst in existing:
        price = (recorded.get(inst["InstanceId"]) or {}).get("usd_per_hour")
        if price is None:
            price = budget.launch_price(sess, ec2, inst.get("InstanceLifecycle") == "spot",
                                        itype)
        if price is not None:
            rates[inst["InstanceId"]] = float(price)
    return rates


def _specs(region: str, cluster: str, instances: list[dict[str, Any]], user: str
           ) -> list[HostSpec]:
    keys = sshkeys.host_keys(region, cluster)
    specs = []
    for inst in instances:
        iid = inst["InstanceId"]
        if iid not in keys:
            raise AWSError(
                f"machine {iid} of cluster {cluster!r} was launched from another computer (or "
                f"{sshkeys.cluster_dir(region, cluster)} was deleted), so its SSH keys are "
                f"unknown here. Remove the cluster with `joblib-cloud down --cluster "
                f"{cluster}`, or use another cluster= name.")
        address, port = addresses.address_of(inst)
        specs.append(HostSpec(address=address, port=int(port), user=user,
                              label=f"{iid}", host_key=keys[iid]))
    return specs


def announcement(sess: Any, ec2: Any, config: CloudConfig,
                 itype: instance_types.InstanceType, count: int) -> str:
    """``2 x C16 = c6i.4xlarge (16 vCPU, 32 GiB) spot in eu-west-1: $1.10/h (on-demand
    $5.44/h)``, at the prices of the region in use."""
    region = sess.region_name
    demand = prices.on_demand(sess, region, itype.name, itype.vcpus)
    spot = prices.spot(ec2, itype.name) if config.spot else None
    if spot is not None:
        cost = f"{spot.text(count)} (on-demand {demand.text(count)})"
    else:
        cost = demand.text(count)
    alias = f"{itype.alias} = " if itype.alias else ""
    market = "spot" if config.spot else "on-demand"
    return (f"{count} x {alias}{itype.name} ({itype.vcpus} vCPU, {itype.memory_gib:g} GiB) "
            f"{market} in {region}: {cost}")


def _announce(sess: Any, ec2: Any, config: CloudConfig, itype: instance_types.InstanceType,
              count: int, progress: Progress) -> None:
    progress.announce(
        f"launching {announcement(sess, ec2, config, itype, count)}. "
        f"They stop after {config.idle_timeout:.0f}s without work "
        f"({config.no_client_timeout:.0f}s once no client is attached) and "
        f"{config.max_lifetime / 3600:g}h at most; `joblib-cloud down --cluster "
        f"{config.cluster}` removes them now.")


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
            ec2api.unless(exc, "ParameterNotFound")
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
                 cidr: str | None, progress: Progress,
                 known_prices: dict[bool, float | None], dollars: float | None = None
                 ) -> None:
        """``known_prices``: the price per market (spot or not) already looked up;
        ``dollars``: with a budget, what each machine may spend."""
        image_id, root_device, snapshot_gib = _image(sess, ec2, config, itype)
        self.network: Network = network.find_network(ec2, config, sess.region_name, cidr)
        self.public_ip = addresses.wants_public_address()
        self.sess, self.ec2, self.config, self.itype = sess, ec2, config, itype
        self.user, self.client_pub, self.progress = user, client_pub, progress
        self._prices = dict(known_prices)
        self.dollars = dollars
        #: USD/h of each machine launched, at the market it was launched on.
        self.rates: dict[str, float] = {}
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
            host_private, host_public = sshkeys.generate_ed25519()

            def params(use_spot: bool, private: str = host_private,
                       public: str = host_public) -> dict[str, Any]:
                return dict(self.base, UserData=userdata.build(
                    user=self.user, host_private_key=private, host_public_key=public,
                    client_public_key=self.client_pub, idle_timeout=config.idle_timeout,
                    no_client_timeout=config.no_client_timeout,
                    max_lifetime=self.lifetime(use_spot), boot_timeout=config.boot_timeout,
                    shutdown_command=config.shutdown_command,
                    packages=config.packages, requirements_path=config.requirements,
                    image=config.image, python=config.python))

            instance, used_spot = self._run_one(params, spot, launches)
            spot = spot and used_spot
            iid = instance["InstanceId"]
            launches.ids.append(iid)
            if used_spot:
                launches.spot_ids.append(iid)
            sshkeys.save_host_key(self.sess.region_name, config.cluster, iid, host_public)
            price = self._price(used_spot)
            if price is not None:
                self.rates[iid] = price
            ledger.record(instance, config.cluster, self.sess.region_name,
                          "spot" if used_spot else "on-demand", price)
            self.progress.host(iid, "launching")
            self.progress.update(f"launched {index + 1}/{count} machines ({iid})")

    def _price(self, spot: bool) -> float | None:
        if spot not in self._prices:
            self._prices[spot] = budget.launch_price(self.sess, self.ec2, spot, self.itype)
        return self._prices[spot]

    def lifetime(self, spot: bool) -> float:
        """``max_lifetime``, or with a budget what each machine's share buys at the price
        of the market it launches on."""
        if self.dollars is None:
            return self.config.max_lifetime
        price = self._price(spot)
        if price is None:
            raise AWSError(f"budget= needs the {'spot' if spot else 'on-demand'} price of "
                           f"{self.itype.name}, and none is known: unset budget=")
        return budget.lifetime(self.config, self.dollars, price)

    def _run_one(self, params: Callable[[bool], dict[str, Any]], spot: bool,
                 launches: Launches) -> tuple[dict[str, Any], bool]:
        """One instance: spot then on-demand if asked, each zone in turn on capacity
        errors.  Returns it and whether it is a spot instance.  ``params``: the launch's
        for a market (the user-data holds the lifetime its price buys)."""
        type_name = self.itype.name
        last: CapacityError | None = None
        for use_spot in ([True, False] if spot else [False]):
            market = params(use_spot)
            for subnet in self.network.subnets:
                attempt = dict(market, **network.interface_params(self.network, subnet,
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
        for instance in running:
            progress.host(instance["InstanceId"], "booting")
        if len(running) == len(ids):
            return running, []
        if time.monotonic() > deadline:
            raise AWSError(f"only {len(running)}/{len(ids)} machines were running after "
                           f"{timeout:.0f}s: try again, or another region= or instance=")
        progress.update(f"{len(running)}/{len(ids)} machines running")
        time.sleep(machines.POLL)


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
