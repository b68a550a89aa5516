"""Cluster commands: ``up``, ``status``, ``down``, ``instances``.

``down`` is the command that guarantees nothing is left running: it finds resources by
tag only, so it works after a crash and from any computer with the same AWS account, and
it exits non-zero when something could not be deleted so a CI job notices.
"""

from __future__ import annotations

import argparse
import sys

from . import ec2api, instance_types, provisioner, teardown
from .config import resolve_config


def register(subparsers: argparse._SubParsersAction) -> None:
    up = subparsers.add_parser("up", help="launch (or re-attach to) a cluster and check it")
    up.add_argument("-i", "--instance", help="alias such as C16, M8, R4, or an EC2 type")
    up.add_argument("-n", type=int, help="number of machines")
    up.add_argument("--cluster", help="cluster name (default: 'default')")
    up.add_argument("--region")
    up.add_argument("--spot", action="store_true", default=None,
                    help="spot machines, falling back to on-demand")
    up.set_defaults(func=cmd_up)

    status = subparsers.add_parser("status", help="machines, state, type, age, est. $/h")
    status.add_argument("--cluster", help="one cluster (default: every cluster)")
    status.add_argument("--idle", action="store_true",
                        help="also ask each running machine over SSH how long it has been idle")
    _region_args(status)
    status.set_defaults(func=cmd_status)

    down = subparsers.add_parser(
        "down", help="terminate a cluster's machines, delete its security group and keys")
    which = down.add_mutually_exclusive_group()
    which.add_argument("--cluster", help="cluster name (default: the configured cluster)")
    which.add_argument("--all", action="store_true", help="every joblib-cloud cluster")
    _region_args(down)
    down.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    down.add_argument("--dry-run", action="store_true", help="show what would be deleted")
    down.set_defaults(func=cmd_down)

    instances = subparsers.add_parser("instances", help="instance aliases: type, vCPUs, memory")
    instances.set_defaults(func=cmd_instances)


def _region_args(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--region", help="region (default: the configured region)")
    where.add_argument("--all-regions", action="store_true", help="sweep every region")


def _regions(args: argparse.Namespace) -> tuple[object, list[str]]:
    config = resolve_config(region=args.region)
    sess = ec2api.session((config.region or "us-east-1") if args.all_regions else config.region)
    if not args.all_regions:
        return sess, [sess.region_name]
    ec2 = sess.client("ec2")
    found = ec2api.call(ec2.describe_regions, "list regions")["Regions"]
    return sess, sorted(r["RegionName"] for r in found)


def _skip_denied(region: str, exc: BaseException) -> bool:
    """A region these credentials may not use (a policy, a region not enabled): say so
    and go on with the others.  False for any other error."""
    code = ec2api.cause_code(exc)
    if code not in ec2api.REGION_DENIED_CODES:
        return False
    print(f"{region}: skipped: these AWS credentials may not use this region ({code}); if "
          "you may have machines there, look with credentials allowed there, or "
          "enable the region")
    return True


def cmd_up(args: argparse.Namespace) -> int:
    from .providers import connect

    config = resolve_config(provider="aws", instance=args.instance, n=args.n,
                            cluster=args.cluster, region=args.region, spot=args.spot,
                            verbose=True)
    cluster = connect(config)
    try:
        for host in cluster.hosts:
            print(f"{host.name}: {host.workers} workers")
    finally:
        cluster.close()
    print(f"cluster {config.cluster!r} is up; it stops after {config.idle_timeout:.0f}s "
          f"without a client. Remove it now with `joblib-cloud down --cluster "
          f"{config.cluster}`.")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    sess, regions = _regions(args)
    user = resolve_config().user
    rows = []
    for region in regions:
        idle = None
        if args.idle:
            def idle(inst: dict, region: str = region) -> float | None:
                name = ec2api.tag_value(inst) or ""
                return provisioner.idle_seconds(region, name, inst, user)
        try:
            rows += teardown.status_rows(sess, region, args.cluster, idle)
        except Exception as exc:
            if not (args.all_regions and _skip_denied(region, exc)):
                raise
    if not rows:
        print("no joblib-cloud machines" + (f" in cluster {args.cluster!r}"
                                            if args.cluster else "")
              + f" in {', '.join(regions) if len(regions) < 4 else 'any region'}")
        return 0
    columns = ["cluster", "region", "instance", "state", "type", "market", "age", "address",
               "usd_per_hour"] + (["idle"] if args.idle else [])
    _table([columns] + [[row[c] for c in columns] for row in rows])
    billed = [float(r["usd_per_hour"]) for r in rows
              if r["state"] in ("pending", "running") and r["usd_per_hour"] != "?"]
    print(f"{len(rows)} machines; est. ${sum(billed):.2f}/h on-demand for the running ones")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    cluster = None if args.all else (args.cluster or resolve_config().cluster)
    sess, regions = _regions(args)
    what = "every joblib-cloud cluster" if cluster is None else f"cluster {cluster!r}"
    if not (args.yes or args.dry_run) and sys.stdin.isatty():
        answer = input(f"Delete {what} in {', '.join(regions)} (machines, security group, "
                       "local keys)? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing done")
            return 1
    ok = True
    for region in regions:
        try:
            ok &= teardown.down_region(sess, region, cluster, args.dry_run, print)
        except Exception as exc:  # noqa: BLE001 - report, sweep the other regions, exit 1
            if args.all_regions and _skip_denied(region, exc):
                continue
            print(f"{region}: ERROR: {type(exc).__name__}: {exc}", file=sys.stderr)
            ok = False
    if not ok:
        print(f"joblib-cloud: some resources of {what} could not be deleted (see above); run "
              "this command again, or delete them in the EC2 console (tag "
              f"{ec2api.TAG_KEY})", file=sys.stderr)
    return 0 if ok else 1


def cmd_instances(args: argparse.Namespace) -> int:
    rows = [["alias", "type", "vCPUs", "memory", "est. $/h"]]
    for alias, name, vcpus, memory in instance_types.aliases():
        price = instance_types.hourly_price(name, vcpus)
        rows.append([alias, name, str(vcpus), f"{memory} GiB", f"{price:.3f}"])
    _table(rows)
    print("Any literal EC2 type works too (instance='c7g.2xlarge'). Prices: us-east-1 "
          "on-demand estimates; spot is usually cheaper.")
    return 0


def _table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())
