"""What the client checks and says as a host's agent starts: the versions a host must
share with the client (from its HELLO), and why a start failed."""

from __future__ import annotations

import platform
import re
import warnings
from collections.abc import Collection

from ..config import CloudConfig
from ..errors import EnvironmentMismatchError, HostConnectError
from ..worker import host_versions
from .hearing import START_SILENCE_HEARTBEATS, START_SILENCE_MIN


def check_versions(host: str, remote: dict[str, str | None],
                   installing: Collection[str] = ()) -> None:
    """Refuse a host whose Python minor or cloudpickle differs; warn on other packages
    (not those its boot is still ``installing``: tasks that import them wait)."""
    local = host_versions()
    py_l, py_r = platform.python_version(), remote.get("python") or "?"
    if py_l.split(".")[:2] != py_r.split(".")[:2]:
        raise EnvironmentMismatchError(
            f"host {host} runs Python {py_r} but this client runs Python {py_l}: pickled "
            "tasks do not cross Python minor versions. Point python= at a Python "
            f"{'.'.join(py_l.split('.')[:2])} interpreter on the host.")
    if local["cloudpickle"] != remote.get("cloudpickle"):
        raise EnvironmentMismatchError(
            f"host {host} has cloudpickle {remote.get('cloudpickle')} but this client has "
            f"cloudpickle {local['cloudpickle']}: install cloudpickle=={local['cloudpickle']} "
            "on the host (packages=[...] on aws).")
    others = [(name, version, remote.get(name)) for name, version in local.items()
              if name not in ("python", "cloudpickle") and version is not None
              and remote.get(name) != version and name not in installing]
    differ = [f"{name} {theirs} (this client: {mine})" for name, mine, theirs in others
              if theirs]
    missing = [f"{name} {mine}" for name, mine, theirs in others if not theirs]
    if differ or missing:  # one line per host, however many packages
        parts = ([f"has {', '.join(differ)}: results may differ"] if differ else []) + (
            [f"lacks {', '.join(missing)}: tasks that import them fail there unless "
             "sync_packages installs them"] if missing else [])
        warnings.warn(f"host {host} {'; '.join(parts)}.", RuntimeWarning, stacklevel=2)


def did_not_start(host: str, config: CloudConfig, detail: str) -> HostConnectError:
    """The agent's stream ended before it was ready; ``detail``: what it said last."""
    missing = re.search(r"No module named '([^'.]+)", detail)
    python = config.python or "python3"
    advice = ("It needs Python with joblib and cloudpickle installed (set python= "
              "to the right interpreter).")
    if missing and missing.group(1) not in ("joblib", "cloudpickle"):
        advice = (f"The agent needs only joblib and cloudpickle, so needing "
                  f"{missing.group(1)!r} there is a joblib-cloud bug: please report it "
                  "with this message.")
    elif config.image:
        return HostConnectError(
            f"the joblib-cloud agent on {host} did not start in image="
            f"{config.image!r} with python={python!r}: {detail}. The host needs "
            "Docker usable by the SSH user and able to pull the image; the image "
            "needs Python with joblib and cloudpickle (python= names the "
            "interpreter inside the image).")
    return HostConnectError(
        f"the joblib-cloud agent on {host} did not start with python="
        f"{python!r}: {detail}. {advice}")


def said_nothing(host: str, config: CloudConfig, silent: float,
                 stderr_tail: bytes) -> HostConnectError:
    """The host said nothing for ``silent`` seconds while its agent started."""
    said = stderr_tail.decode(errors="replace").strip().splitlines()
    return HostConnectError(
        f"the joblib-cloud agent on {host} said nothing for {silent:.0f}s "
        f"while starting (python={config.python or 'python3'!r}"
        + (f", image={config.image!r}" if config.image else "") + ")"
        + (f"; its last words: {said[-1]!r}" if said else "")
        + ". Check that this command starts on the host (log in and run it), or "
        "raise heartbeat_timeout if the host is only very slow: a start may be "
        f"silent for {START_SILENCE_HEARTBEATS} x heartbeat_timeout (at least "
        f"{START_SILENCE_MIN:.0f}s).")
