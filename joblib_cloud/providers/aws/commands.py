"""``status`` and ``down`` for EC2: every region asked for, machines found by tag."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ... import provisioner
from ...cli.table import table
from ...client.hosts import HostSpec
from ...config import CloudConfig
from ...provisioner import HostTarget
from ...wire import contract
from . import addresses, ec2api, sshkeys, teardown
from .launch import DEFAULT_USER

Out = provisioner.Out


def regions(config: CloudConfig, args: argparse.Namespace) -> tuple[Any, list[str]]:
    """The session and the regions a command covers: one, or every one."""
    every = getattr(args, "all_regions", False)
    sess = ec2api.session((config.region or "us-east-1") if every else config.region)
    if not every:
        return sess, [sess.region_name]
    ec2 = sess.client("ec2")
    found = ec2api.call(ec2.describe_regions, "list regions")["Regions"]
    return sess, sorted(r["RegionName"] for r in found)


def _skip_denied(region: str, exc: BaseException, out: Out) -> bool:
    """A region these credentials may not use (a policy, a region not enabled): say so
    and go on with the others.  False for any other error."""
    code = ec2api.cause_code(exc)
    if code not in ec2api.REGION_DENIED_CODES:
        return False
    out(f"{region}: skipped: these AWS credentials may not use this region ({code}); if "
        "you may have machines there, look with credentials allowed there, or "
        "enable the region")
    return True


def status(config: CloudConfig, args: argparse.Namespace, out: Out) -> int:
    sess, where = regions(config, args)
    cluster = getattr(args, "cluster", None)
    rows = []
    for region in where:
        idle = None
        if getattr(args, "idle", False):
            def idle(inst: dict, region: str = region) -> float | None:
                name = ec2api.tag_value(inst) or ""
                return idle_seconds(region, name, inst, config.user)
        try:
            rows += teardown.status_rows(sess, region, cluster, idle)
        except Exception as exc:
            if not (getattr(args, "all_regions", False) and _skip_denied(region, exc, out)):
                raise
    if not rows:
        out("no joblib-cloud machines" + (f" in cluster {cluster!r}" if cluster else "")
            + f" in {', '.join(where) if len(where) < 4 else 'any region'}")
        return 0
    columns = STATUS_COLUMNS + (["idle"] if getattr(args, "idle", False) else [])
    out(table([columns] + [[row[c] for c in columns] for row in rows]))
    out(status_footer(rows))
    return 0


#: The columns of ``status``, in the CLI's table and in the notebook's view of a cluster.
STATUS_COLUMNS = ["cluster", "region", "instance", "state", "type", "market", "age", "address",
                  "usd_per_hour", "usd_so_far"]


def status_footer(rows: list[dict[str, str]]) -> str:
    """What the machines of ``rows`` cost: per hour now, and spent so far."""
    billed = [float(r["usd_per_hour"].rstrip("*")) for r in rows
              if r["state"] in ("pending", "running") and r["usd_per_hour"] != "?"]
    note = ("; * = estimate (built-in us-east-1 list price: the Price List API could not be "
            "asked)" if any(r["usd_per_hour"].endswith("*") for r in rows) else "")
    return (f"{len(rows)} machines; ${sum(billed):.2f}/h on-demand for the running ones, at "
            f"the region's prices; ${spent_on(rows):.2f} spent on them so far{note}")


def spent_on(rows: list[dict[str, str]]) -> float:
    return sum(float(r["usd_so_far"]) for r in rows if r["usd_so_far"] != "?")


def down(config: CloudConfig, args: argparse.Namespace, out: Out) -> int:
    cluster = None if getattr(args, "all", False) else config.cluster
    sess, where = regions(config, args)
    what = "every joblib-cloud cluster" if cluster is None else f"cluster {cluster!r}"
    if not (args.yes or args.dry_run) and sys.stdin.isatty():
        answer = input(f"Delete {what} in {', '.join(where)} (machines, security group, "
                       "staged S3 objects, local keys)? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            out("nothing done")
            return 1
    ok = True
    for region in where:
        try:
            ok &= teardown.down_region(sess, region, cluster, args.dry_run, out,
                                       shared=getattr(args, "shared", False))
        except Exception as exc:  # noqa: BLE001 - report, sweep the other regions, exit 1
            if getattr(args, "all_regions", False) and _skip_denied(region, exc, out):
                continue
            print(f"{region}: ERROR: {type(exc).__name__}: {exc}", file=sys.stderr)
            ok = False
    if not ok:
        print(f"joblib-cloud: some resources of {what} could not be deleted (see above); run "
              "this command again, or delete them in the EC2 console (tag "
              f"{ec2api.TAG_KEY})", file=sys.stderr)
    return 0 if ok else 1


def idle_seconds(region: str, cluster: str, instance: dict[str, Any], user: str | None,
                 timeout: float = 5.0) -> float | None:
    """Seconds since the host's agent last reported activity (its kill-switch clock), read
    over a verified SSH connection; None when it cannot be reached or never ran."""
    host_key = sshkeys.host_keys(region, cluster).get(instance["InstanceId"])
    if host_key is None or instance["State"]["Name"] != "running":
        return None
    key_path, _ = sshkeys.client_key(region, cluster)
    try:
        address, port = addresses.address_of(instance)
    except Exception:  # noqa: BLE001 - no usable address: shown as "?"
        return None
    spec = HostSpec(address=address, port=int(port), user=user or DEFAULT_USER,
                    label=instance["InstanceId"], host_key=host_key)
    target = HostTarget(spec.name, spec, str(key_path),
                        str(sshkeys.cluster_dir(region, cluster) / "known_hosts"))
    try:
        connection = target.connect(timeout)
    except Exception:  # noqa: BLE001 - unreachable or still booting: shown as "?"
        return None
    try:
        channel = connection.exec(
            f'h={contract.HOME_SHELL}; '
            f'echo $(( $(date +%s) - $(stat -c %Y "$h/{contract.ACTIVITY_FILE}") ))')
        channel.settimeout(timeout)
        output = b""
        while chunk := channel.recv(1024):
            output += chunk
        return float(output.decode().strip())
    except Exception:  # noqa: BLE001 - no activity file yet, or the read timed out
        return None
    finally:
        connection.close()

