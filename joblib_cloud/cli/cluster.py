"""Cluster commands: ``up``, ``status``, ``down``, ``instances``.

Each asks the provider in the configuration (``--provider``, or ``JOBLIB_CLOUD_PROVIDER``,
or the config file; ``aws`` by default).  On ``aws``, ``down`` is the command that
guarantees nothing is left running: it finds resources by tag only, so it works after a
crash and from any computer with the same AWS account, and it exits non-zero when
something could not be deleted so a CI job notices.
"""

from __future__ import annotations

import argparse

from ..config import resolve_config
from ..provisioner import PROVIDERS, provider
from .table import table


def register(subparsers: argparse._SubParsersAction) -> None:
    up = subparsers.add_parser("up", help="launch (or re-attach to) a cluster and check it")
    _provider_arg(up)
    up.add_argument("-i", "--instance", help="alias such as C16, M8, R4, or an EC2 type")
    up.add_argument("-n", type=int, help="number of machines")
    up.add_argument("--cluster", help="cluster name (default: 'default')")
    up.add_argument("--region")
    up.add_argument("--spot", action="store_true", default=None,
                    help="spot machines, falling back to on-demand")
    up.add_argument("--budget", type=float, help="dollar cap the machines hold to (aws)")
    up.set_defaults(func=cmd_up)

    status = subparsers.add_parser(
        "status", help="what runs and whether it answers (aws: machines, state, age, $/h)")
    _provider_arg(status)
    status.add_argument("--cluster", help="one cluster (default: every cluster)")
    status.add_argument("--idle", action="store_true",
                        help="also ask each running machine over SSH how long it has been idle")
    _region_args(status)
    status.set_defaults(func=cmd_status)

    down = subparsers.add_parser(
        "down", help="remove a cluster (aws: machines, security group, local keys)")
    _provider_arg(down)
    which = down.add_mutually_exclusive_group()
    which.add_argument("--cluster", help="cluster name (default: the configured cluster)")
    which.add_argument("--all", action="store_true", help="every joblib-cloud cluster")
    _region_args(down)
    down.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    down.add_argument("--dry-run", action="store_true", help="show what would be deleted")
    down.add_argument("--shared", action="store_true",
                      help="also delete the cluster's shared directory (aws: shared/<cluster>/ "
                           "in the bucket; kept otherwise)")
    down.set_defaults(func=cmd_down)

    cost = subparsers.add_parser("cost", help="what each aws cluster cost over recent days")
    cost.add_argument("--days", type=float, default=30.0, help="how far back (default 30)")
    cost.add_argument("--json", action="store_true", help="rows as JSON, for scripts")
    cost.set_defaults(func=cmd_cost)

    instances = subparsers.add_parser("instances", help="instance aliases: type, vCPUs, memory")
    instances.set_defaults(func=cmd_instances)


def _provider_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--provider", choices=sorted(PROVIDERS),
                        help="the kind of machines (default: the configured provider)")


def _region_args(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--region", help="region (default: the configured region)")
    where.add_argument("--all-regions", action="store_true", help="sweep every region")


def cmd_up(args: argparse.Namespace) -> int:
    from ..client.registry import connect

    config = resolve_config(provider=args.provider, instance=args.instance, n=args.n,
                            cluster=args.cluster, region=args.region, spot=args.spot,
                            budget=args.budget, verbose=True)
    cluster = connect(config)
    try:
        cluster.wait_until_settled()
        for name, error in cluster.failures.items():
            print(f"{name}: did not come up: {error}")
        for host in cluster.hosts:
            print(f"{host.name}: {host.workers} workers")
    finally:
        cluster.close()
    print(provider(config.provider).up_message(config))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    config = resolve_config(provider=args.provider, region=args.region)
    return provider(config.provider).status(config, args, print)


def cmd_down(args: argparse.Namespace) -> int:
    config = resolve_config(provider=args.provider, region=args.region,
                            cluster=None if args.all else args.cluster)
    return provider(config.provider).down(config, args, print)


def cmd_cost(args: argparse.Namespace) -> int:
    """From the launches this computer made (price and launch time) and EC2's record of
    when each machine stopped."""
    import json

    from ..providers.aws import ec2api, ledger

    config = resolve_config()
    rows = ledger.costs(ec2api.session(config.region or "us-east-1"), args.days)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print(f"no joblib-cloud machines launched from this computer in the last "
              f"{args.days:g} days")
        return 0
    print(table([["cluster", "region", "machines", "running", "machine-hours", "usd"]]
                + [[r["cluster"], r["region"], str(r["machines"]), str(r["running"]),
                    f"{r['machine_hours']:.2f}", f"{r['usd']:.2f}"] for r in rows]))
    print(f"${sum(r['usd'] for r in rows):.2f} in the last {args.days:g} days (spot machines "
          "at the spot price they launched at)")
    return 0


def cmd_instances(args: argparse.Namespace) -> int:
    from ..providers.aws import instance_types

    rows = [["alias", "type", "vCPUs", "memory", "est. $/h"]]
    for alias, name, vcpus, memory in instance_types.aliases():
        price = instance_types.hourly_price(name, vcpus)
        rows.append([alias, name, str(vcpus), f"{memory} GiB", f"{price:.3f}"])
    print(table(rows))
    print("Any literal EC2 type works too (instance='c7g.2xlarge'). Prices: us-east-1 "
          "on-demand estimates; spot is usually cheaper.")
    return 0
