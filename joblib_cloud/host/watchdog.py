"""The on-VM kill switch: shut the machine down when its boot hangs, when it has no work,
and at a deadline whatever happens.

It runs on the VM as a systemd service installed by the boot script, independent of
the client, so a machine is never billed after the client crashed, lost its network,
forgot to call ``joblib-cloud down``, or simply stayed open with nothing to do.  Work is
what touches the activity file: the agent while a batch, an install or a download is in
flight, a ``run`` job while it runs and while it saves its outputs.  A connected client
does not count as work: after ``--idle-timeout`` without work the machine stops, a client
attached or not.  The agent touches a second file while a client is attached; once the
last client left (no agent process for this home), ``--no-client-timeout`` applies, which
is shorter.  Standalone on purpose: the standard library only, Python 3.7+, so it runs
on the image's system Python before anything else is installed.

On a VM the boot script writes a ready file when the host is set up.  Until then the
machine is booting, never idle (a long install must not be cut short), but it may not
boot for longer than ``--boot-timeout``; from then on, idle time counts from the later
of that file and the last activity.  The lifetime ends at ``--deadline``, an absolute
time written into the user-data at launch, so a reboot does not restart it.
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
ATTACHED_FILE = "attached"


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


def reason_to_stop(home: str, started: float, idle_timeout: float, deadline: float,
                   now: float, ready_file: str | None = None,
                   boot_timeout: float = float("inf"),
                   no_client_timeout: float = float("inf")) -> str | None:
    """Why the machine must stop now, or None.  ``started``: when the boot began;
    ``deadline``: the absolute end of its lifetime."""
    if now >= deadline:
        return f"maximum lifetime reached (deadline {time.ctime(deadline)})"
    if ready_file is not None:
        ready = mtime(ready_file)
        if ready is None:
            if now - started >= boot_timeout:
                return f"the boot did not finish within boot_timeout {boot_timeout:.0f}s"
            return None
        started = max(started, ready)
    work = last_activity(home, started)
    idle = now - work
    if idle >= idle_timeout:
        who = "a client attached" if agent_running(home) else "no client"
        return f"idle for {idle:.0f}s (idle_timeout {idle_timeout:.0f}s), {who}, no work"
    attached = mtime(os.path.join(home, ATTACHED_FILE))
    if attached is not None and idle >= no_client_timeout and not agent_running(home):
        alone = now - max(work, attached)
        if alone >= no_client_timeout:
            return (f"idle for {idle:.0f}s and no client for {alone:.0f}s "
                    f"(no_client_timeout {no_client_timeout:.0f}s)")
    return None


def watch(home: str, idle_timeout: float, deadline: float, shutdown_command: str,
          poll: float, started: float, ready_file: str | None = None,
          boot_timeout: float = float("inf"),
          no_client_timeout: float = float("inf")) -> None:
    log(f"watching {home}: idle_timeout={idle_timeout:.0f}s "
        f"no_client_timeout={no_client_timeout:.0f}s deadline={time.ctime(deadline)} "
        f"boot_timeout={boot_timeout:.0f}s")
    while True:
        reason = reason_to_stop(home, started, idle_timeout, deadline, time.time(),
                                ready_file, boot_timeout, no_client_timeout)
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
    parser.add_argument("--no-client-timeout", type=float, default=float("inf"),
                        help="seconds without work once the last client left")
    parser.add_argument("--max-lifetime", type=float, default=float("inf"),
                        help="seconds from this start (or boot, with --since-boot)")
    parser.add_argument("--deadline", type=float, default=float("inf"),
                        help="the lifetime's end, in seconds since the epoch")
    parser.add_argument("--shutdown-command", default="shutdown -h now")
    parser.add_argument("--poll", type=float, default=10.0, help="seconds between checks")
    parser.add_argument("--since-boot", action="store_true",
                        help="count --max-lifetime and --boot-timeout from system boot")
    parser.add_argument("--ready-file", help="written when the boot is done: until then "
                        "the machine is booting, not idle")
    parser.add_argument("--boot-timeout", type=float, default=float("inf"),
                        help="with --ready-file: seconds the boot may take")
    args = parser.parse_args(argv)
    started = boot_time() if args.since_boot else time.time()
    deadline = min(args.deadline, started + args.max_lifetime)
    if deadline == float("inf"):
        parser.error("give --deadline or --max-lifetime")
    home = args.home or os.path.join(pwd.getpwnam(args.user).pw_dir, HOME_DIRNAME)
    watch(home, args.idle_timeout, deadline, args.shutdown_command, args.poll, started,
          args.ready_file, args.boot_timeout, args.no_client_timeout)


if __name__ == "__main__":
    main()
