"""``joblib-cloud`` command line: cluster commands and job commands.

Subcommands live in their own modules, each with a ``register(subparsers)`` function:
``cluster`` (up, status, down, instances), ``jobs`` (run, jobs, logs, cancel, pull,
forward) and ``shared`` (the cluster's shared directory).
"""

from __future__ import annotations

import argparse
import logging
import sys

from .. import __version__
from ..errors import ConfigError, HostConnectError, JoblibCloudError

EXIT_CODES = f"""\
exit codes:
  0    done (run: the command's own exit code)
  {JoblibCloudError.exit_code}    failed: one line (no traceback) says what happened and what to do
  {ConfigError.exit_code}    a setting, argument or name that cannot work as given (as for usage)
  {HostConnectError.exit_code}    a host could not be reached, or its key not verified
  130  interrupted (Ctrl-C)"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="joblib-cloud",
        description="Run joblib / scikit-learn n_jobs code on cloud machines.",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"joblib-cloud {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from . import cluster, jobs, shared

    cluster.register(sub)
    jobs.register(sub)
    shared.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="joblib-cloud: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except JoblibCloudError as exc:  # the user's to fix: the message, not a traceback
        print(f"joblib-cloud: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (ValueError, RuntimeError) as exc:
        print(f"joblib-cloud: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
