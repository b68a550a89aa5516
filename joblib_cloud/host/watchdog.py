"""The on-VM kill switch: shut the machine down when its boot hangs, when nobody uses it,
and after a maximum lifetime whatever happens.

It runs on the VM as a systemd service installed by the boot script, independent of
the client, so a machine is never billed after the client crashed, lost its network or
forgot to call ``joblib-cloud down``.  A host counts as in use while the agent touches its
activity file (every few seconds while a client is connected, work included) or while an
agent process for that home directory is alive.  Standalone on purpose: the standard
library only, Python 3.7+, so it runs on the image's system Python before anything else
is installed.

On a VM the boot script writes a ready file when the host is set up.  Until then the
machine is booting, never idle (a long install must not be cut short), but it may not
boot for longer than ``--boot-timeout``; from then on, idle time counts from the later
of that file and the last activity.
"""

from __future__ import annotations

import argparse
import os
import pwd
import subprocess
import sys
import time

#: Copies of ``wire/contract.py`` (this script runs without the package).
AGENT_MARK = b"joblib_cloud.worker"
HOME_ENV = "JOBLIB_CLOUD_HOME"
HOME_DIRNAME = ".joblib-cloud"
ACTIVITY_FILE = "activity"


def log(message: str) -> None:
    sys.stderr.write(f"joblib-cloud watchdog: {message}\n")
    sys.stderr.flush()


def boot_time() -> float:
    with open("/proc/uptime") as fh:
        return time.time() - float(fh.read().split()[0])


def _environ(pid: str) -> dict[bytes, bytes]:
    with open(f"/proc/{pid}/environ", "rb") as fh:
        items = fh.read().split(b"\0")
    return dict(item.split(b"=", 1) for item in items if b"=" in item)


def agent_running(home: str) -> bool:
    """Is an agent whose state directory is ``home`` running?  (Scoped by home so other
    users' agents on a shared machine do not keep this one alive.)"""
    target = os.path.realpath(home)
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if AGENT_MARK not in fh.read():
                    continue
            env = _environ(pid)
        except OSError:  # gone, or not ours to read
            continue
        agent_home = env.get(HOME_ENV.encode(), b"").decode(errors="replace")
        if not agent_home and env.get(b"HOME"):
            agent_home = os.path.join(env[b"HOME"].decode(errors="replace"), HOME_DIRNAME)
        if agent_home and os.path.realpath(agent_home) == target:
            return True
    return False


def mtime(path: str) -> float | None:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


def last_activity(home: str, since: float) -> float:
    touched = mtime(os.path.join(home, ACTIVITY_FILE))
    return since if touched is None else max(touched, since)


def reason_to_stop(home: str, started: float, idle_timeout: float, max_lifetime: float,
                   now: float, ready_file: str | None = None,
                   boot_timeout: float = float("inf")) -> str | None:
    if now - started >= max_lifetime:
        return f"maximum lifetime of {max_lifetime:.0f}s reached"
    if ready_file is not None:
        ready = mtime(ready_file)
        if ready is None:
            if now - started >= boot_timeout:
                return f"the boot did not finish within boot_timeout {boot_timeout:.0f}s"
            return None
        started = max(started, ready)
    idle = now - last_activity(home, started)
    if idle >= idle_timeout and not agent_running(home):
        return f"idle for {idle:.0f}s (idle_timeout {idle_timeout:.0f}s), no client, no work"
    return None


def watch(home: str, idle_timeout: float, max_lifetime: float, shutdown_command: str,
          poll: float, started: float, ready_file: str | None = None,
          boot_timeout: float = float("inf")) -> None:
    log(f"watching {home}: idle_timeout={idle_timeout:.0f}s max_lifetime={max_lifetime:.0f}s "
        f"boot_timeout={boot_timeout:.0f}s")
    while True:
        reason = reason_to_stop(home, started, idle_timeout, max_lifetime, time.time(),
                                ready_file, boot_timeout)
        if reason:
            log(f"{reason}: running {shutdown_command!r}")
            if subprocess.call(shutdown_command, shell=True) == 0:
                return
            log("shutdown command failed; trying again")
        time.sleep(poll)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--home", help="the agent's JOBLIB_CLOUD_HOME")
    where.add_argument("--user", help="the agent's user (its home is ~USER/.joblib-cloud)")
    parser.add_argument("--idle-timeout", type=float, required=True)
    parser.add_argument("--max-lifetime", type=float, required=True)
    parser.add_argument("--shutdown-command", default="shutdown -h now")
    parser.add_argument("--poll", type=float, default=10.0, help="seconds between checks")
    parser.add_argument("--since-boot", action="store_true",
                        help="count the lifetime from system boot, not from this start")
    parser.add_argument("--ready-file", help="written when the boot is done: until then "
                        "the machine is booting, not idle")
    parser.add_argument("--boot-timeout", type=float, default=float("inf"),
                        help="with --ready-file: seconds the boot may take")
    args = parser.parse_args(argv)
    started = boot_time() if args.since_boot else time.time()
    home = args.home or os.path.join(pwd.getpwnam(args.user).pw_dir, HOME_DIRNAME)
    watch(home, args.idle_timeout, args.max_lifetime, args.shutdown_command,
          args.poll, started, args.ready_file, args.boot_timeout)


if __name__ == "__main__":
    main()
