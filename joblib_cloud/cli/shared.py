"""``joblib-cloud shared ls|put|get|rm``: the cluster's shared directory
(``$JOBLIB_CLOUD_SHARED`` in every job) from this computer."""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

from ..config import resolve_config
from ..host.jobfiles import human
from ..jobs import shared
from ..provisioner import PROVIDERS
from .table import table


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "shared", help="the cluster's shared directory ($JOBLIB_CLOUD_SHARED in jobs)",
        description="Every job of a cluster sees one shared directory as "
                    "$JOBLIB_CLOUD_SHARED; these commands manage it from here.")
    parser.add_argument("--cluster", help="cluster name (default: 'default')")
    parser.add_argument("--provider", choices=sorted(PROVIDERS))
    sub = parser.add_subparsers(dest="shared_command", metavar="ls|put|get|rm", required=True)
    ls = sub.add_parser("ls", help="list files")
    ls.add_argument("path", nargs="?", default="")
    put = sub.add_parser("put", help="copy a local file or directory in")
    put.add_argument("local", type=Path)
    put.add_argument("dest", nargs="?", default="", help="directory in the shared one")
    get = sub.add_parser("get", help="copy a file or directory out")
    get.add_argument("path")
    get.add_argument("into", nargs="?", type=Path, default=Path("."))
    rm = sub.add_parser("rm", help="remove a file or directory")
    rm.add_argument("path")
    parser.set_defaults(func=cmd_shared)


def cmd_shared(args: argparse.Namespace) -> int:
    config = resolve_config(provider=args.provider, cluster=args.cluster,
                            verbose=args.verbose or None)
    store = shared.open_shared(config)
    try:
        if args.shared_command == "ls":
            rows = [["PATH", "SIZE", "MODIFIED"]]
            for item in store.ls(args.path):
                when = datetime.datetime.fromtimestamp(item["mtime"])
                rows.append([item["path"], human(item["size"]),
                             when.strftime("%Y-%m-%d %H:%M:%S")])
            print(table(rows))
        elif args.shared_command == "put":
            store.put(args.local, args.dest)
        elif args.shared_command == "get":
            for name in store.get(args.path, args.into):
                print(args.into / name)
        else:
            store.rm(args.path)
    finally:
        store.close()
    return 0
