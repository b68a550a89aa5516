"""Job subcommands: ``run``, ``jobs``, ``logs``, ``cancel``, ``pull``, ``forward``."""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path
from typing import Any

from ..config import _to_size, resolve_config
from ..errors import ConfigError
from ..jobs import attach, control, ports
from ..jobs.outputs import DEFAULT_MAX_OUTPUT
from ..jobs.workspace import DEFAULT_MAX_UPLOAD
from ..provisioner import PROVIDERS, provider
from .table import table


def register(subparsers: argparse._SubParsersAction) -> None:
    run = subparsers.add_parser(
        "run", help="run a command on a cloud machine in a copy of this directory",
        description="Copy the current directory (minus .gitignore'd files) to the first "
                    "machine of the cluster, run COMMAND there with the backend's Python, "
                    "stream its output and exit with its exit code; inside it, "
                    "parallel_backend('cloud') spans every machine of the cluster. Files "
                    "the job creates or changes come back into ./joblib-cloud-runs/JOB/.")
    run.add_argument("-i", "--instance", help="instance alias (C16, M8, ...) or EC2 type")
    run.add_argument("-n", type=int, help="number of machines in the cluster (the job "
                                          "runs on the first, its backend uses all)")
    run.add_argument("--cluster", help="cluster name (default: 'default')")
    run.add_argument("--provider", choices=sorted(PROVIDERS))
    run.add_argument("--budget", type=float, help="dollar cap the machines hold to (aws)")
    run.add_argument("--detach", action="store_true",
                     help="print the job id and return; see `jobs`, `logs`, `cancel`")
    run.add_argument("--max-upload", default=str(DEFAULT_MAX_UPLOAD), metavar="SIZE",
                     help="largest directory to copy, e.g. 100M (default), 1G")
    run.add_argument("--port", action="append", default=[], metavar="REMOTE[:LOCAL]",
                     help="forward the job's port to http://127.0.0.1:LOCAL/ (repeatable)")
    run.add_argument("--output", default="", metavar="DIR",
                     help="bring back only what the job writes under DIR of its workspace")
    run.add_argument("--into", type=Path, metavar="DIR",
                     help="where outputs go (default ./joblib-cloud-runs/JOB/)")
    run.add_argument("--max-output", default=str(DEFAULT_MAX_OUTPUT), metavar="SIZE",
                     help="largest total of outputs to copy back, e.g. 100M (default)")
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

    pull = subparsers.add_parser("pull", help="copy a job's outputs here")
    pull.add_argument("job", help="job id (or a unique prefix)")
    pull.add_argument("path", nargs="?", default="", help="only this file or directory")
    pull.add_argument("--into", type=Path, metavar="DIR",
                      help="where outputs go (default ./joblib-cloud-runs/JOB/)")
    pull.add_argument("--max-output", default=str(DEFAULT_MAX_OUTPUT), metavar="SIZE",
                      help="largest total to copy, e.g. 100M (default)")
    pull.set_defaults(func=cmd_pull)

    forward = subparsers.add_parser("forward", help="reach a running job's port from here")
    forward.add_argument("job", help="job id (or a unique prefix)")
    forward.add_argument("port", metavar="REMOTE[:LOCAL]")
    forward.set_defaults(func=cmd_forward)


def _size(text: str, option: str) -> int:
    try:
        return _to_size(text)
    except ValueError as exc:
        raise ConfigError(f"{option}: {exc}") from None


def cmd_run(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    config = resolve_config(provider=args.provider, instance=args.instance, n=args.n,
                            cluster=args.cluster, verbose=args.verbose or None,
                            budget=args.budget)
    note = provider(config.provider).run_note(config, args.n)
    if note:
        print(f"joblib-cloud: note: {note}", file=sys.stderr)
    options = control.RunOptions(
        detach=args.detach, max_upload=_size(args.max_upload, "--max-upload"),
        output=args.output, into=args.into, max_output=_size(args.max_output, "--max-output"),
        ports=[ports.parse_port(p) for p in args.port])
    return control.run(config, command, options=options)


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


def cmd_pull(args: argparse.Namespace) -> int:
    return attach.pull(args.job, args.path, args.into, _size(args.max_output, "--max-output"))


def cmd_forward(args: argparse.Namespace) -> int:
    return attach.forward(args.job, ports.parse_port(args.port))
