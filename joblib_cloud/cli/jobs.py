"""Job subcommands: ``run``, ``jobs``, ``logs``, ``cancel``."""

from __future__ import annotations

import argparse
import datetime
import sys
from typing import Any

from ..config import _to_size, resolve_config
from ..jobs import control
from ..jobs.workspace import DEFAULT_MAX_UPLOAD
from ..provisioner import PROVIDERS
from .table import table


def register(subparsers: argparse._SubParsersAction) -> None:
    run = subparsers.add_parser(
        "run", help="run a command on a cloud machine in a copy of this directory",
        description="Copy the current directory (minus .gitignore'd files) to the first "
                    "machine of the cluster, run COMMAND there with the backend's Python, "
                    "stream its output and exit with its exit code.")
    run.add_argument("-i", "--instance", help="instance alias (C16, M8, ...) or EC2 type")
    run.add_argument("-n", type=int, help="number of machines in the cluster (the job "
                                          "runs on the first)")
    run.add_argument("--cluster", help="cluster name (default: 'default')")
    run.add_argument("--provider", choices=sorted(PROVIDERS))
    run.add_argument("--budget", type=float, help="dollar cap the machines hold to (aws)")
    run.add_argument("--detach", action="store_true",
                     help="print the job id and return; see `jobs`, `logs`, `cancel`")
    run.add_argument("--max-upload", default=str(DEFAULT_MAX_UPLOAD), metavar="SIZE",
                     help="largest directory to copy, e.g. 100M (default), 1G")
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND...")
    run.set_defaults(func=cmd_run)

    listing = subparsers.add_parser("jobs", help="list jobs started from this machine")
    listing.set_defaults(func=cmd_jobs)

    logs = subparsers.add_parser("logs", help="show a job's output")
    logs.add_argument("job", help="job id (or a unique prefix)")
    logs.add_argument("-f", "--follow", action="store_true",
                      help="keep streaming until the job ends, then exit with its code")
    logs.set_defaults(func=cmd_logs)

    cancel = subparsers.add_parser("cancel", help="stop a job (its whole process group)")
    cancel.add_argument("job", help="job id (or a unique prefix)")
    cancel.set_defaults(func=cmd_cancel)


def cmd_run(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    config = resolve_config(provider=args.provider, instance=args.instance, n=args.n,
                            cluster=args.cluster, verbose=args.verbose or None,
                            budget=args.budget)
    try:
        max_upload = _to_size(args.max_upload)
    except ValueError as exc:
        raise ValueError(f"--max-upload: {exc}") from None
    if config.n > 1 and config.provider == "aws":
        print(f"joblib-cloud: note: the job runs on the first of the {config.n} machines; "
              "inside it, parallel_backend('cloud') uses that machine's cores",
              file=sys.stderr)
    return control.run(config, command, detach=args.detach, max_upload=max_upload)


def _when(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    return datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def cmd_jobs(args: argparse.Namespace) -> int:
    records = control.load_records()
    if not records:
        print("no jobs started from this machine (start one with `joblib-cloud run`)",
              file=sys.stderr)
        return 0
    rows = [["JOB", "STATE", "EXIT", "HOST", "STARTED", "COMMAND"]]
    for info in control.statuses(records):
        code: Any = info.get("exit_code")
        rows.append([info["id"], info["state"], "-" if code is None else str(code),
                     info["host"], _when(info.get("created")), info["command"]])
    print(table(rows))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    return control.logs(args.job, follow_output=args.follow)


def cmd_cancel(args: argparse.Namespace) -> int:
    info = control.cancel(control.find_record(args.job))
    code = info.get("exit_code")
    print(f"job {info['id']}: {info['state']}"
          + ("" if code is None else f" (exit code {code})"))
    return 0 if info["state"] != "running" else 1
