"""What each cluster cost: a ledger of launches on this computer, completed with EC2's own
records of when each machine stopped.

EC2 lists a terminated instance for about an hour only, so each launch is written down
here (instance, cluster, region, type, market, price per hour, launch time) and its end is
filled in from ``DescribeInstances`` (the state transition time of a terminated machine)
whenever ``joblib-cloud cost`` or ``status`` sees it.  ``~/.joblib-cloud/aws/ledger.json``.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from typing import Any

from ...config import write_private
from . import ec2api, sshkeys

_STOPPED_AT = re.compile(r"\((\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) (?:GMT|UTC)\)")


def _path():
    return sshkeys.aws_root() / "ledger.json"


def read() -> dict[str, dict[str, Any]]:
    try:
        return json.loads(_path().read_text())
    except (OSError, ValueError):
        return {}


def record(instance: dict[str, Any], cluster: str, region: str, market: str,
           usd_per_hour: float | None) -> None:
    entries = read()
    launched = instance.get("LaunchTime") or datetime.now(timezone.utc)
    entries[instance["InstanceId"]] = {
        "cluster": cluster, "region": region, "type": instance["InstanceType"],
        "market": market, "usd_per_hour": usd_per_hour,
        "launched": launched.isoformat(), "ended": None}
    write_private(_path(), json.dumps(entries, indent=1))


def stopped_at(instance: dict[str, Any]) -> datetime | None:
    """When EC2 says a stopped or terminated machine stopped."""
    match = _STOPPED_AT.search(instance.get("StateTransitionReason") or "")
    if not match:
        return None
    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc)


def costs(sess: Any, days: float) -> list[dict[str, Any]]:
    """One row per cluster and region: machines, machine-hours and dollars over the last
    ``days`` days (machines still running count up to now)."""
    entries = read()
    now = datetime.now(timezone.utc)
    since = now - timedelta(days=days)
    by_region: dict[str, list[str]] = {}
    for iid, entry in entries.items():
        if entry["ended"] is None:
            by_region.setdefault(entry["region"], []).append(iid)
    for region, ids in by_region.items():
        ec2 = sess.client("ec2", region_name=region)
        seen = {i["InstanceId"]: i for i in ec2api.instances(
            ec2, "look up machines' stop times", [{"Name": "instance-id", "Values": ids}])}
        for iid in ids:
            inst = seen.get(iid)
            if inst is not None and inst["State"]["Name"] in ("terminated", "stopped"):
                ended = stopped_at(inst) or now
                entries[iid]["ended"] = ended.isoformat()
            elif inst is None:  # EC2 has forgotten it: it ended at the latest an hour ago
                entries[iid]["ended"] = (now - timedelta(hours=1)).isoformat()
    write_private(_path(), json.dumps(entries, indent=1))
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for entry in entries.values():
        launched = datetime.fromisoformat(entry["launched"])
        ended = datetime.fromisoformat(entry["ended"]) if entry["ended"] else now
        if ended < since:
            continue
        hours = max((ended - max(launched, since)).total_seconds(), 0) / 3600
        row = rows.setdefault((entry["cluster"], entry["region"]), {
            "cluster": entry["cluster"], "region": entry["region"], "machines": 0,
            "machine_hours": 0.0, "usd": 0.0, "running": 0})
        row["machines"] += 1
        row["machine_hours"] += hours
        row["usd"] += hours * (entry["usd_per_hour"] or 0.0)
        row["running"] += entry["ended"] is None
    return sorted(rows.values(), key=lambda r: (-r["usd"], r["cluster"]))
