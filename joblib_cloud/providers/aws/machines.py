"""The machines of one launch: waiting on them, checking them while they boot, and
undoing the launch when anything fails.

EC2 is eventually consistent: an instance launched a moment ago may be missing from
``DescribeInstances``, and ``TerminateInstances`` may not know it yet.  So a clean-up
terminates the union of what it launched, what its launch requests' client tokens find
(a response lost on the way) and, for a new cluster, what the tag finds, retrying until
EC2 agrees.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any

from ...client.hosts import HostSpec
from . import ec2api, teardown, userdata
from .ec2api import BootFailedError, PythonBootFailedError, call

log = logging.getLogger("joblib_cloud")

LIVE_STATES = ("pending", "running")


DEAD_STATES = ("shutting-down", "terminated", "stopping", "stopped")


SPOT_RECLAIMED = "Server.SpotInstanceTermination"


#: Seconds between polls while waiting for instances to run (tests shorten it).
POLL = 2.0


#: While waiting for SSH, the machines' state is checked every this many polls.
BOOT_CHECK_POLLS = 2.5


#: How long a clean-up keeps looking for (and retrying) instances EC2 does not list yet.
CONSISTENCY_TIMEOUT = 30.0


#: Lines of a failed machine's console output shown in the error.
CONSOLE_LINES = 25
#: A booting machine whose console shows nothing new for this long is stuck: stopped
#: then rather than billed until ``boot_timeout``.  Its console is read this often.
BOOT_STALL = 300.0
CONSOLE_POLL = 30.0


@dataclasses.dataclass
class Launches:
    """What one call launched: instance ids it got back, and the client token of every
    ``RunInstances`` it sent, so a machine whose launch response was lost is found too."""

    ids: list[str] = dataclasses.field(default_factory=list)
    spot_ids: list[str] = dataclasses.field(default_factory=list)
    tokens: list[str] = dataclasses.field(default_factory=list)
    #: Tokens of requests that failed in a way that may still have started a machine.
    uncertain: list[str] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.ids or self.uncertain)


@dataclasses.dataclass
class ClusterHandle:
    """What the ``ssh`` path needs to reach the machines, plus how to undo a launch."""

    cluster: str
    region: str
    specs: list[HostSpec]
    ssh_key: str
    known_hosts: str | None
    instance_ids: list[str]
    #: Launched by this call (not re-attached): terminated by :meth:`abort`.
    launched_ids: list[str]
    #: True if the cluster did not exist before this call: abort removes all of it.
    fresh: bool
    python: str = userdata.HOST_PYTHON
    connect_timeout: float = 1200.0
    #: vCPUs of the instance type: the workers a host will have.
    vcpus: int | None = None
    #: Each machine's USD/h (at the market it launched on), and when it was launched.
    usd_per_hour: dict[str, float] = dataclasses.field(default_factory=dict)
    launch_times: dict[str, Any] = dataclasses.field(default_factory=dict)
    session: Any = None
    ec2: Any = None
    launches: Launches = dataclasses.field(default_factory=Launches)
    #: Where port 22 was opened (``None``: the user's own ``security_group_id``).
    cidr: str | None = None
    security_group_id: str | None = None
    #: Machines whose metadata endpoint (which serves the user-data) is still on.
    metadata_open: list[str] = dataclasses.field(default_factory=list)
    _seen: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict, repr=False)
    _seen_at: float = dataclasses.field(default=float("-inf"), repr=False)
    #: Per booting machine: its console's last lines, when they last changed, when looked.
    _consoles: dict[str, tuple[str, float, float]] = dataclasses.field(default_factory=dict,
                                                                      repr=False)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def abort(self) -> None:
        """Connecting failed: terminate what this call launched (never re-attached ones)."""
        if self.launches or self.launched_ids:
            launches = self.launches if self.launches else Launches(ids=self.launched_ids)
            _cleanup(self.session, self.region, self.cluster, launches, self.fresh)

    def boot_check(self, spec: HostSpec) -> Callable[[bool, bool], None]:
        """For the SSH wait on ``spec``: raises :class:`BootFailedError` once its machine
        has left pending/running, instead of retrying a dead address until the timeout;
        and while it refuses logins (booting), once its console shows no progress for
        ``BOOT_STALL`` or the wait runs out, with the console's last lines."""
        instance_id = spec.label

        def check(booting: bool, out_of_time: bool) -> None:
            self._check_alive(instance_id)
            if booting:
                self._check_progress(instance_id, out_of_time)

        return check

    def _check_progress(self, instance_id: str, out_of_time: bool) -> None:
        now = time.monotonic()
        tail, changed, looked = self._consoles.get(instance_id, ("", now, float("-inf")))
        if out_of_time or now - looked >= CONSOLE_POLL:
            try:
                seen = "\n".join(console_lines(self.ec2, instance_id))
            except Exception as exc:  # noqa: BLE001 - no console: no judgement on progress
                log.debug("no console output of %s: %s", instance_id, exc)
                seen = ""
            if seen and seen != tail:
                tail, changed = seen, now
            self._consoles[instance_id] = (tail, changed, now)
        stalled = now - changed
        if not (out_of_time or (tail and stalled >= BOOT_STALL)):
            return
        what = (f"still booting when the wait ran out (boot_timeout, or connect_timeout; "
                f"now {self.connect_timeout:.0f}s)" if out_of_time else
                f"stuck booting: its console shows no progress for {stalled:.0f}s")
        raise BootFailedError(
            f"machine {instance_id} is {what}. It refuses SSH logins because its boot has "
            "not authorised our key yet (not a network problem); it is stopped. A package "
            "install that never ends points to the package index or a mirror (a held apt "
            "lock, an unreachable index): run again, or check packages=, requirements= and "
            "image_id=.\nLast lines of its console output:\n"
            + (tail or console_tail(self.ec2, instance_id)))

    def _check_alive(self, instance_id: str) -> None:
        with self._lock:  # one DescribeInstances per interval for all hosts
            if time.monotonic() - self._seen_at >= POLL * BOOT_CHECK_POLLS:
                try:
                    self._seen = {i["InstanceId"]: i for i in
                                  _describe_ids(self.ec2, self.instance_ids)}
                except Exception as exc:  # noqa: BLE001 - a failed look is not a failed boot
                    log.debug("could not check the machines' state: %s", exc)
                self._seen_at = time.monotonic()
            instance = self._seen.get(instance_id)
        if instance is not None and instance["State"]["Name"] not in LIVE_STATES:
            raise boot_failure(self.ec2, instance)

    def timeout_advice(self) -> str:
        """What to check when a machine never accepts SSH."""
        if self.cidr is None:
            where = (f"Port 22 must be open to this computer in security group "
                     f"{self.security_group_id} (security_group_id=).")
        else:
            where = (f"Port 22 of the machines is open to {self.cidr} only: if this "
                     "computer's public address is not in it (another network, a VPN or "
                     "proxy), pass ingress_cidr= with the right one, or unset it to detect "
                     "it again.")
        return (f"{where} A machine that is only slow to boot needs a longer wait: raise "
                f"boot_timeout (or connect_timeout; now {self.connect_timeout:.0f}s).")

    def drop(self, instance_id: str) -> None:
        """A machine that never came up, while the others did: terminate it if this call
        launched it (a re-attached one stops on its own idle timer)."""
        if instance_id in self.launches.ids:
            ec2 = self.session.client("ec2")
            teardown.terminate_ids(ec2, [instance_id], log.info, timeout=60.0,
                                   not_found_timeout=CONSISTENCY_TIMEOUT)

    def close_metadata(self, instance_ids: list[str] | None = None) -> None:
        """These machines (default: all) have booted: turn off their metadata endpoint,
        which would serve the user-data (with the host's private SSH key) to any process
        on them."""
        closing = [i for i in self.metadata_open if instance_ids is None or i in instance_ids]
        for instance_id in closing:
            try:
                call(self.ec2.modify_instance_metadata_options,
                     "turn off the metadata endpoint", InstanceId=instance_id,
                     HttpEndpoint="disabled")
            except Exception as exc:  # noqa: BLE001 - the cluster still works
                log.warning(
                    "could not turn off the metadata endpoint of %s (%s): any process on it "
                    "can read its SSH host key. Allow ec2:ModifyInstanceMetadataOptions to "
                    "these credentials.", instance_id, exc)
        self.metadata_open = [i for i in self.metadata_open if i not in closing]


def _describe_ids(ec2: Any, ids: list[str]) -> list[dict[str, Any]]:
    if not ids:
        return []
    return ec2api.instances(ec2, "check the machines",
                            [{"Name": "instance-id", "Values": ids}])


def console_lines(ec2: Any, instance_id: str, lines: int = CONSOLE_LINES) -> list[str]:
    """The last ``lines`` of the machine's console output (where the boot script writes);
    raises when EC2 does not give it."""
    try:
        response = ec2.get_console_output(InstanceId=instance_id, Latest=True)
    except Exception as exc:
        ec2api.unless(exc, "Unsupported*", "InvalidParameter*")
        response = ec2.get_console_output(InstanceId=instance_id)  # not on Xen types
    return boot_lines(response.get("Output") or "")[-lines:]


def console_tail(ec2: Any, instance_id: str, lines: int = CONSOLE_LINES) -> str:
    """:func:`console_lines` as text, or why there is none."""
    try:
        tail = console_lines(ec2, instance_id, lines)
    except Exception as exc:  # noqa: BLE001 - the error is still worth showing without it
        return f"(console output unavailable: {ec2api.error_code(exc) or exc})"
    return "\n".join(tail) if tail else "(no console output yet)"


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def boot_lines(console: str) -> list[str]:
    """The console lines that tell how the boot went: what cloud-init and joblib-cloud
    printed (the boot script, the kill switch), without the rest of the system's start
    and stop messages; all lines if there are none of those.  They end with the boot
    script's own verdict when it failed (what a shutting-down cloud-init prints after it
    is noise).  (botocore has already decoded EC2's base64.)"""
    rows = [_ANSI.sub("", row).rstrip() for row in console.splitlines()]
    rows = [row for row in rows if row.strip()]
    ours = [row for row in rows if "cloud-init[" in row or "joblib-cloud" in row]
    verdicts = [i for i, row in enumerate(ours) if userdata.BOOT_FAILED in row]
    return ours[:verdicts[-1] + 1] if verdicts else ours or rows


def boot_failure(ec2: Any, instance: dict[str, Any],
                 others: list[dict[str, Any]] | None = None) -> BootFailedError:
    """The error for a machine that stopped before it accepted SSH."""
    iid, state = instance["InstanceId"], instance["State"]["Name"]
    reason = instance.get("StateReason") or {}
    why = reason.get("Message") or instance.get("StateTransitionReason") or "no reason given"
    if reason.get("Code") == SPOT_RECLAIMED:
        advice = "EC2 took the spot capacity back: run again, or use spot=False."
    else:
        advice = ("Fix what the console output shows (e.g. a package in packages= or "
                  "requirements= that does not install, or an image_id= without the "
                  "expected user or Python), then run again.")
    also = "".join(f" Also {o['InstanceId']}: {o['State']['Name']}." for o in others or ())
    tail = console_tail(ec2, iid)
    error: type[BootFailedError] = BootFailedError
    no_python = [row for row in tail.splitlines() if userdata.NO_PYTHON in row]
    if no_python:  # the boot said which Pythons the image has and what to pass instead
        error = PythonBootFailedError
        advice = no_python[-1][no_python[-1].index(userdata.NO_PYTHON):]
        advice = advice.removeprefix("joblib-cloud: ") + "."
    return error(
        f"machine {iid} stopped while booting: it is {state} ({why}).{also} {advice}\n"
        f"Last lines of its console output:\n{tail}")


def _find_by_tokens(ec2: Any, launches: Launches) -> tuple[set[str], list[str]]:
    """Instances the launch requests' client tokens find, waiting a bounded time for the
    requests of unknown outcome to show up.  Returns (ids, tokens never found)."""
    deadline = time.monotonic() + CONSISTENCY_TIMEOUT
    found: dict[str, str] = {}
    delay = POLL
    while True:
        for start in range(0, len(launches.tokens), 100):
            batch = launches.tokens[start:start + 100]
            listed = ec2api.instances(ec2, "find launched machines",
                                      [{"Name": "client-token", "Values": batch}])
            found.update({i["ClientToken"]: i["InstanceId"] for i in listed
                          if i.get("ClientToken")})
        missing = [t for t in launches.uncertain if t not in found]
        if not missing or time.monotonic() > deadline:
            return set(found.values()), missing
        time.sleep(delay)
        delay = min(delay * 2, 5.0)


def _cleanup(sess: Any, region: str, cluster: str, launches: Launches, fresh: bool,
             error: BaseException | None = None) -> None:
    """Undo a failed launch: terminate what this call launched (found by id, by client
    token, and for a fresh cluster by tag), then for a fresh cluster remove the rest."""
    lines: list[str] = []
    try:
        ec2 = sess.client("ec2")
        ids = set(launches.ids)
        if launches.tokens:
            by_token, lost = _find_by_tokens(ec2, launches)
            ids |= by_token
            if lost:
                lines.append(f"launch requests {', '.join(lost)} may still start machines")
        if fresh:
            ids |= {i["InstanceId"] for i in
                    ec2api.describe_instances(ec2, cluster, teardown.ALL_STATES)}
        ok = not lines
        ok &= teardown.terminate_ids(ec2, sorted(ids), out=lines.append,
                                     not_found_timeout=CONSISTENCY_TIMEOUT)
        if fresh:
            ok &= teardown.down_region(sess, region, cluster, dry_run=False, out=lines.append)
    except Exception as exc:  # noqa: BLE001 - reported with the original error
        ok, lines = False, [*lines, f"{type(exc).__name__}: {exc}"]
    if not ok:
        note = (f"joblib-cloud could not fully clean up after this error: {'; '.join(lines)}. "
                f"Run `joblib-cloud down --cluster {cluster} --region {region}`.")
        log.error(note)
        if error is not None and hasattr(error, "add_note"):  # Python 3.11+
            error.add_note(note)

