"""Finding and deleting a cluster's AWS resources by tag: ``joblib-cloud down``/``status``.

Everything is found by the tag ``joblib-cloud:cluster`` alone (re-checked on every
resource EC2 returns), so ``down`` works from any computer, after a crash, and never
touches an untagged resource.  Every step is idempotent: running ``down`` twice, or after
a half-finished ``down``, is safe.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from . import ec2api, prices, sshkeys, staging
from .ec2api import call

#: Every state a billable (or soon billable) instance can be in.
ALL_STATES = ("pending", "running", "stopping", "stopped", "shutting-down")
GONE = ("shutting-down", "terminated")
NOT_FOUND = "InvalidInstanceID.NotFound"
#: How long ``down`` waits for instances to stop and the security group to free up.
WAIT_TIMEOUT = 600.0
POLL = 3.0

Out = Callable[[str], None]


def terminate_ids(ec2: Any, ids: list[str], out: Out, timeout: float | None = None,
                  not_found_timeout: float = 0.0) -> bool:
    """Terminate ``ids`` and wait until AWS reports them shutting down or gone.

    EC2 may not know an instance launched a moment ago yet: ``not_found_timeout`` is how
    long ``InvalidInstanceID.NotFound`` is retried."""
    if not ids:
        return True
    timeout = WAIT_TIMEOUT if timeout is None else timeout
    unknown = _terminate(ec2, ids, not_found_timeout)
    out(f"terminating {len(ids)} machines: {', '.join(ids)}")
    if unknown:
        out(f"ERROR: EC2 does not know {', '.join(unknown)}; if they appear later, "
            "terminate them with `joblib-cloud down`")
    ids = [i for i in ids if i not in unknown]
    deadline = time.monotonic() + timeout
    while True:
        states = {i["InstanceId"]: i["State"]["Name"] for i in ec2api.instances(
            ec2, "check terminated machines", [{"Name": "instance-id", "Values": ids}])}
        left = [i for i in ids if states.get(i, "terminated") not in GONE]
        if not left:
            out(f"{len(ids)} machines shutting down or terminated")
            return not unknown
        if time.monotonic() > deadline:
            out(f"ERROR: still not terminating after {timeout:.0f}s: {', '.join(left)}")
            return False
        time.sleep(POLL)


def _terminate(ec2: Any, ids: list[str], not_found_timeout: float) -> list[str]:
    """``TerminateInstances`` for ``ids``, retrying with back-off while EC2 does not know
    one of them yet; then one by one.  Returns the ids EC2 never knew."""
    deadline = time.monotonic() + not_found_timeout
    delay = POLL
    while True:
        try:
            for start in range(0, len(ids), 500):
                call(ec2.terminate_instances, "terminate machines",
                     InstanceIds=ids[start:start + 500])
            return []
        except Exception as exc:
            ec2api.unless(exc, NOT_FOUND)
        if time.monotonic() >= deadline:
            break
        time.sleep(delay)
        delay = min(delay * 2, 5.0)
    if len(ids) == 1:
        return list(ids)
    unknown = []
    for iid in ids:  # terminate every one EC2 knows
        unknown += _terminate(ec2, [iid], 0.0)
    return unknown


def _delete_group(ec2: Any, group: dict[str, Any], out: Out, timeout: float) -> bool:
    """Delete a security group, retrying while terminating instances still use it."""
    deadline = time.monotonic() + timeout
    gid = group["GroupId"]
    while True:
        try:
            call(ec2.delete_security_group, "delete a security group", GroupId=gid)
            out(f"deleted security group {gid} ({group.get('GroupName', '')})")
            return True
        except Exception as exc:
            code = ec2api.error_code(exc)
            if code == "InvalidGroup.NotFound":
                return True
            if code != "DependencyViolation" or time.monotonic() > deadline:
                out(f"ERROR: could not delete security group {gid}: {exc}")
                return False
        time.sleep(POLL)


def _tagged(items: list[dict[str, Any]], cluster: str | None) -> list[dict[str, Any]]:
    """Re-check EC2's tag filter: nothing untagged may ever be deleted."""
    return [x for x in items if ec2api.tag_value(x) is not None
            and (cluster is None or ec2api.tag_value(x) == cluster)]


def find(ec2: Any, cluster: str | None) -> dict[str, list[dict[str, Any]]]:
    """The cluster's (or every cluster's) instances, security groups and loose volumes."""
    groups = call(ec2.describe_security_groups, "list security groups",
                  Filters=ec2api.cluster_filter(cluster))["SecurityGroups"]
    volumes = call(ec2.describe_volumes, "list volumes",
                   Filters=ec2api.cluster_filter(cluster)
                   + [{"Name": "status", "Values": ["available"]}])["Volumes"]
    return {"instances": ec2api.describe_instances(ec2, cluster, ALL_STATES),
            "groups": _tagged(groups, cluster), "volumes": _tagged(volumes, cluster)}


def down_region(sess: Any, region: str, cluster: str | None, dry_run: bool, out: Out,
                timeout: float | None = None, shared: bool = False) -> bool:
    """Delete a cluster (``None``: every joblib-cloud cluster) in one region; its shared
    directory in S3 only when ``shared``.

    Returns False if something could not be deleted (the caller exits non-zero)."""
    timeout = WAIT_TIMEOUT if timeout is None else timeout
    ec2 = sess.client("ec2", region_name=region)
    found = find(ec2, cluster)
    instances, groups, volumes = found["instances"], found["groups"], found["volumes"]
    names = {n for kind in found.values() for x in kind if (n := ec2api.tag_value(x))}
    local = [cluster] if cluster is not None else sshkeys.local_clusters(region)
    names.update(n for n in local if sshkeys.exists(region, n))
    swept = staging.sweep(region, cluster, dry_run, out, shared)
    if not names:
        out(f"{region}: nothing to delete for "
            f"{'any cluster' if cluster is None else f'cluster {cluster!r}'}")
        return swept
    verb = "would " if dry_run else ""
    ok = swept
    live = [i for i in instances if i["State"]["Name"] not in GONE]
    for inst in instances:
        out(f"{region}: {verb}terminate {inst['InstanceId']} ({inst['InstanceType']}, "
            f"{inst['State']['Name']}, cluster {ec2api.tag_value(inst)})")
    if not dry_run:
        ok &= terminate_ids(ec2, [i["InstanceId"] for i in live],
                            lambda line: out(f"{region}: {line}"), timeout)
    for group in groups:
        if dry_run:
            out(f"{region}: would delete security group {group['GroupId']}")
        else:
            ok &= _delete_group(ec2, group, lambda line: out(f"{region}: {line}"), timeout)
    for volume in volumes:
        out(f"{region}: {verb}delete volume {volume['VolumeId']}")
        if not dry_run:
            try:
                call(ec2.delete_volume, "delete a volume", VolumeId=volume["VolumeId"])
            except Exception as exc:
                if ec2api.error_code(exc) != "InvalidVolume.NotFound":
                    out(f"{region}: ERROR: could not delete volume {volume['VolumeId']}: {exc}")
                    ok = False
    for name in sorted(names):
        if sshkeys.exists(region, name):
            out(f"{region}: {verb}remove local keys {sshkeys.cluster_dir(region, name)}")
            if not dry_run and ok:
                sshkeys.remove(region, name)
    return ok


def _so_far(usd_per_hour: float | None, launched: Any) -> str:
    """What a machine has cost since its launch, at its price."""
    if usd_per_hour is None or not isinstance(launched, datetime):
        return "?"
    hours = (datetime.now(timezone.utc) - launched).total_seconds() / 3600
    return f"{usd_per_hour * max(hours, 0):.2f}"


def age_of(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def age(launch_time: Any) -> str:
    if not isinstance(launch_time, datetime):
        return "?"
    return age_of((datetime.now(timezone.utc) - launch_time).total_seconds())


def status_rows(sess: Any, region: str, cluster: str | None,
                idle: Callable[[dict[str, Any]], float | None] | None = None
                ) -> list[dict[str, str]]:
    """One row per instance of the cluster (``None``: of every cluster); ``idle`` (slow:
    asks each host over SSH) adds the seconds since each host was last used."""
    ec2 = sess.client("ec2", region_name=region)
    rows = []
    for inst in ec2api.describe_instances(ec2, cluster, ALL_STATES):
        type_name = inst["InstanceType"]
        price = prices.on_demand(sess, region, type_name)
        rows.append({
            "cluster": ec2api.tag_value(inst) or "", "region": region,
            "instance": inst["InstanceId"], "state": inst["State"]["Name"], "type": type_name,
            "market": "spot" if inst.get("InstanceLifecycle") == "spot" else "on-demand",
            "age": age(inst.get("LaunchTime")),
            "address": inst.get("PublicIpAddress") or inst.get("PrivateIpAddress") or "-",
            "usd_per_hour": "?" if price.usd_per_hour is None else
            f"{price.usd_per_hour:.3f}{'*' if price.estimate else ''}",
            "usd_so_far": _so_far(price.usd_per_hour, inst.get("LaunchTime")),
            "launched": inst["LaunchTime"].isoformat() if inst.get("LaunchTime") else "",
        })
        if idle is not None:
            seconds = idle(inst)
            rows[-1]["idle"] = "?" if seconds is None else age_of(seconds)
    return rows
