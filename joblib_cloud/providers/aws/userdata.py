"""The cloud-init user-data that turns a fresh EC2 image into a joblib-cloud host.

Order matters for safety and for the client's wait:

1. cloud-init installs *our* pre-generated SSH host key before sshd starts, so the very
   first connection is verified against a key the client already knows.
2. The hard lifetime stop is armed in ``bootcmd``, the first thing cloud-init runs on
   every boot, and needs nothing but ``date``, ``sleep`` and ``systemctl`` (``shutdown -h
   +N`` needs D-Bus, which is not up yet at that point).  It sleeps until a deadline
   written here at launch, so a reboot (EC2 auto-recovery, a task's ``sudo reboot``) does
   not restart the lifetime.  Then the watchdog service starts, before anything can fail:
   it stops a boot that takes longer than ``boot_timeout``, and once the boot is done, a
   machine without work for ``idle_timeout`` (``no_client_timeout`` once its last client
   left), and at the same deadline.
3. The boot script fetches uv (a wheel from the package index, digest checked), makes a
   virtual environment with the distribution's Python at the client's minor version (uv's
   standalone Python where the distribution has none) and installs the client's joblib
   and cloudpickle into ``/opt/joblib-cloud/venv``: all the agent needs.  Its output goes
   to the console too, so a failure shows in EC2's console output; a failure powers the
   machine off.
4. The rest of the client's pins, ``packages=`` and ``requirements=`` install in the
   background, described by the state file that ``host/background.py`` reads: tasks that
   need them wait for them on the host; a failure there fails those tasks, not the boot.
5. Only then is the client's public key authorised: until that moment SSH logins are
   refused, which the client treats as "still booting" and retries.

The document is ``#cloud-config`` followed by JSON (a subset of YAML), so it needs no YAML
library to write and tests can parse exactly what EC2 stored.
"""

from __future__ import annotations

import base64
import gzip
import importlib.metadata
import json
import platform
import re
import shlex
import time
from pathlib import Path
from typing import Any

from ...host import fetch_uv, watchdog
from .boot_packages import background_state, background_step, normal

ROOT = "/opt/joblib-cloud"
VENV = f"{ROOT}/venv"
HOST_PYTHON = f"{VENV}/bin/python"
#: Written by the boot script when the host is ready: the watchdog's idle clock starts here.
READY_FILE = f"{ROOT}/ready"
BOOT_LOG = "/var/log/joblib-cloud-boot.log"
#: Pinned to the client's versions so pickles and results match.  The agent itself needs
#: only joblib and cloudpickle (tests/test_host_requirements.py).
CLIENT_PACKAGES = ("joblib", "cloudpickle", "loky", "numpy", "scipy", "scikit-learn",
                   "pandas", "threadpoolctl")
SSHD_CONFIG = "/etc/ssh/sshd_config.d/01-joblib-cloud.conf"
CLIENT_KEY_PATH = f"{ROOT}/client_key.pub"
UV_VERSION = "0.13.9"
#: What the agent needs: installed before the host lets the client in.  numpy is among
#: them because joblib imports it when it is there: a numpy half-written by the
#: background install broke the agent's own start.  paramiko is what a ``run -n N`` job's
#: backend reaches its siblings with (there when the job config asks for it).  With
#: :data:`BACKGROUND_INSTALL`, the rest of the client's pins, ``packages=`` and
#: ``requirements=`` install afterwards while tasks already run (``host/background.py``);
#: without it, everything installs first (``bench/cold_start.py`` compares the two).
AGENT_PACKAGES = ("joblib", "cloudpickle", "numpy", "paramiko")
BACKGROUND_INSTALL = True
BREAK = " --break-system-packages"
MAX_USER_DATA = 16 * 1024  # EC2's limit, before base64


def client_requirements(extra: tuple[str, ...] = ()) -> list[str]:
    pins = []
    for name in CLIENT_PACKAGES:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return pins + list(extra)


#: A machine whose deadline passed while it was down still gets this long after a boot.
MIN_LEFT = 60


def hard_stop_command(deadline: float) -> list[str]:
    """``bootcmd`` entry: power off at ``deadline`` (seconds since the epoch) whatever
    happens, from a process of its own (cloud-init goes on at once)."""
    wait = (f"left=$(({int(deadline)} - $(date +%s))); [ $left -gt {MIN_LEFT} ] || "
            f"left={MIN_LEFT}; sleep $left")
    return ["sh", "-c", f"setsid sh -c '{wait}; systemctl poweroff || poweroff -f' "
                        "</dev/null >/dev/null 2>&1 &"]


#: The OpenMP runtime (libgomp), in the background while uv installs: scikit-learn's own
#: wheels carry theirs, but LightGBM's and XGBoost's load the system's, which minimal
#: images lack.  Not fatal: a task that needs it says so.
_OPENMP = f"""(if command -v dnf >/dev/null; then dnf install -y -q libgomp
 elif command -v apt-get >/dev/null; then apt-get update -qq &&
   DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libgomp1; fi) >{ROOT}/openmp.log 2>&1 &
OPENMP=$!
"""


_NO_OPENMP = f"""wait $OPENMP || echo "joblib-cloud: no OpenMP runtime (see \
{ROOT}/openmp.log): LightGBM and XGBoost will not load"
"""


#: Starts the boot script's last line when it fails (then it powers the machine off).
BOOT_FAILED = "joblib-cloud: boot failed"
#: Starts the boot's console line when no interpreter at the client's minor can be had:
#: the line names the fix, and the client raises it as :class:`~..errors.HostPythonError`.
NO_PYTHON = "joblib-cloud: no Python"
#: uv's download of its standalone Python is bounded (connect, silence between reads, one
#: retry, in all), so a network that cannot reach it or never answers fails the boot
#: within about a minute, not at boot_timeout.
STANDALONE_LIMITS = "UV_HTTP_CONNECT_TIMEOUT=10 UV_HTTP_TIMEOUT=20 UV_HTTP_RETRIES=1 timeout 300"


def _no_python(python_minor: str) -> str:
    """Bash function ``no_python WHY LINE``: the line that names the fix, then the failure
    (the image's Pythons are listed, so the user knows which client minor would do)."""
    line = (f"{NO_PYTHON} {python_minor} for the agent: $1. This image has Python "
            f"${{HAVE:-(none)}}: run the client on one of those, pass image_id= of an image "
            f"that has python{python_minor}, or python= with the path of a Python "
            f"{python_minor} on it")
    return f"""no_python() {{
  HAVE=$(compgen -c python3. | grep -xE 'python3\\.[0-9]+' | sort -uV | sed 's/^python//' \\
    | paste -sd' ' -) || true
  echo "{line}"
  failed "$2" "$1"
  exit 1
}}
"""


def _install(python: str, pins: str, count: int, flags: str = "") -> str:
    """``pins`` into ``python``, while the OpenMP runtime installs."""
    what = "the agent's packages" if BACKGROUND_INSTALL else "packages"
    return f"""echo "joblib-cloud: installing {count} packages"
{ROOT}/bin/uv pip install --quiet --python {python}{flags} {pins}
echo "joblib-cloud: {what} installed"
"""


def _python_steps(python_minor: str, pins: str, count: int, python: str | None = None) -> str:
    """uv, then a venv with the distribution's Python (else uv's standalone one), then
    ``pins`` (the agent's packages, or all the client's without a background install).
    With ``python=``: that interpreter, which must be at the
    client's minor, takes the packages itself (the agent runs it; no venv)."""
    openmp = "" if BACKGROUND_INSTALL else _OPENMP  # with it: after the heavy packages
    uv = f"""{openmp}python3 {ROOT}/fetch_uv.py {UV_VERSION} {ROOT}/bin
export UV_NO_CACHE=1 UV_PYTHON_INSTALL_DIR={ROOT}/python
"""
    if python:
        return f"""{_no_python(python_minor)}GIVEN={shlex.quote(python)}
PYTHON=$(command -v "$GIVEN") || no_python "python=$GIVEN is not on this image" $LINENO
GOT=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$GOT" = {python_minor} ] || no_python "python=$GIVEN is Python $GOT" $LINENO
{uv}{_install('"$PYTHON"', pins, count, BREAK)}"""
    return f"""PY=python{python_minor}
{_no_python(python_minor)}# The distribution's Python, if it has this minor:
if ! command -v $PY >/dev/null; then
  if command -v dnf >/dev/null; then dnf install -y -q $PY || true
  elif command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $PY) || true
  fi
fi
{uv}if command -v $PY >/dev/null; then PYTHON=$(command -v $PY)
else
  echo "joblib-cloud: no $PY package here: uv's standalone Python"
  {STANDALONE_LIMITS} {ROOT}/bin/uv python install {python_minor} ||
    no_python "uv's standalone Python {python_minor} could not be downloaded" $LINENO
  PYTHON={python_minor}
fi
{ROOT}/bin/uv venv --quiet --python "$PYTHON" {VENV}
{_install(HOST_PYTHON, pins, count)}"""


def _target(python: str | None) -> tuple[str, str]:
    """The interpreter the boot installs into, and uv's flags for it."""
    return ('"$PYTHON"', BREAK) if python else (HOST_PYTHON, "")


def _docker_steps(user: str, image: str) -> str:
    """Docker from the distribution, started, usable by ``user``, the image pulled (the
    agent runs in it: the packages are the image's)."""
    return f"""if ! command -v docker >/dev/null; then
  if command -v dnf >/dev/null; then dnf install -y -q docker
  else apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io
  fi
fi
systemctl enable --now docker
usermod -aG docker {user}
docker pull {shlex.quote(image)}
echo joblib-cloud: image {shlex.quote(image)} pulled
"""


def interpreter_to_prepare(python: str | None) -> str | None:
    """``python=`` as the boot takes it: an interpreter of the image (one word, a path or a
    command name) that gets the client's packages instead of a venv; None (make the venv)
    without it, for the venv's own interpreter, or for a command line such as
    ``env OMP_PROC_BIND=true /opt/joblib-cloud/venv/bin/python``."""
    if not python or len(shlex.split(python)) != 1 or python.startswith(f"{VENV}/"):
        return None
    return python


def boot_script(user: str, python_minor: str, requirements: list[str],
                requirements_file: bool, image: str | None = None,
                python: str | None = None) -> str:
    """Bash run by cloud-init (as root) once the watchdog is up."""
    user = shlex.quote(user)  # validated by config too
    pins = " ".join(shlex.quote(r) for r in requirements)
    if requirements_file:
        pins += f" -r {ROOT}/requirements.txt"
    # The agent (as ``user``) installs into the venv what tasks miss there (sync_packages).
    chown = "" if python else f"chown -R {user}: {VENV}\n"
    later = ""
    if image:
        setup = _docker_steps(user, image)
    elif BACKGROUND_INSTALL:
        agent = [r for r in requirements if normal(re.split("=", r)[0]) in AGENT_PACKAGES]
        rest = [r for r in requirements if r not in agent]
        setup = _python_steps(python_minor, " ".join(shlex.quote(r) for r in agent),
                              len(agent), python) + chown
        target, flags = _target(python)
        later = background_step(target, pins, flags, user, background_state(
            rest, requirements_file), not python, _OPENMP + _NO_OPENMP)
    else:
        setup = _python_steps(python_minor, pins, len(requirements), python) + chown
    what = "Docker and the image" if image else f"uv, Python {python_minor}, the packages"
    openmp = "" if image or BACKGROUND_INSTALL else _NO_OPENMP
    return f"""#!/bin/bash
# joblib-cloud boot: {what}, then SSH access.
set -euo pipefail
exec > >(tee -a {BOOT_LOG}) 2>&1
failed() {{
  echo "{BOOT_FAILED} (line $1: $2); powering off"
  systemctl poweroff || poweroff -f
}}
trap 'failed $LINENO "$BASH_COMMAND"' ERR
echo "joblib-cloud: boot started"
{setup}HOME_DIR=$(getent passwd {user} | cut -d: -f6)
install -d -m 700 -o {user} -g {user} "$HOME_DIR/.joblib-cloud" "$HOME_DIR/.ssh"
{later}cat {CLIENT_KEY_PATH} >> "$HOME_DIR/.ssh/authorized_keys"
chown {user}: "$HOME_DIR/.ssh/authorized_keys" && chmod 600 "$HOME_DIR/.ssh/authorized_keys"
touch {READY_FILE}
echo "joblib-cloud: host ready"
{openmp}"""


def _systemd_arg(arg: str) -> str:
    """One ``ExecStart`` argument: quoted, with systemd's ``%`` and ``$`` expansions off."""
    return shlex.quote(arg).replace("%", "%%").replace("$", "$$")


def watchdog_unit(user: str, idle_timeout: float, deadline: float, boot_timeout: float,
                  shutdown_command: str, no_client_timeout: float | None = None) -> str:
    no_client = idle_timeout if no_client_timeout is None else no_client_timeout
    poll = max(1.0, min(15.0, min(idle_timeout, no_client) / 4))
    command = " ".join(_systemd_arg(a) for a in [
        "/usr/bin/python3", f"{ROOT}/watchdog.py", "--since-boot", "--user", user,
        "--ready-file", READY_FILE, "--boot-timeout", f"{boot_timeout:g}",
        "--idle-timeout", f"{idle_timeout:g}", "--no-client-timeout", f"{no_client:g}",
        "--deadline", f"{int(deadline)}",
        "--shutdown-command", shutdown_command.removeprefix("sudo "), "--poll", f"{poll:g}"])
    return f"""[Unit]
Description=joblib-cloud kill switch (boot deadline, idle timeout, maximum lifetime)
After=network.target

[Service]
ExecStart={command}
StandardError=journal+console
Restart=always
RestartSec=5

[Install]
WantedBy=multi-user.target
"""


def build(*, user: str, host_private_key: str, host_public_key: str, client_public_key: str,
          idle_timeout: float, max_lifetime: float, shutdown_command: str,
          boot_timeout: float = 1200.0, packages: tuple[str, ...] = (),
          requirements_path: str | None = None, image: str | None = None,
          python_minor: str | None = None, python: str | None = None,
          no_client_timeout: float | None = None) -> str:
    """The user-data for one host (each host gets its own SSH host key), which stops at
    the latest ``max_lifetime`` from now.  ``python_minor`` defaults to the client's own;
    ``python``: what the agent runs (``python=``): an interpreter of the image gets the
    client's packages instead of a venv."""
    deadline = time.time() + max_lifetime
    python_minor = python_minor or ".".join(platform.python_version_tuple()[:2])
    python = None if image else interpreter_to_prepare(python)
    files: list[dict[str, Any]] = [
        # sshd offers only the key the client expects (the image may generate others);
        # the cluster's key also signs run -n N jobs' short-lived keys (siblings.py).
        {"path": SSHD_CONFIG, "permissions": "0644",
         "content": "HostKey /etc/ssh/ssh_host_ed25519_key\nPasswordAuthentication no\n"
                    f"TrustedUserCAKeys {CLIENT_KEY_PATH}\n"},
        _packed(f"{ROOT}/watchdog.py", Path(watchdog.__file__).read_text()),
        _packed(f"{ROOT}/fetch_uv.py", Path(fetch_uv.__file__).read_text()),
        {"path": "/etc/systemd/system/joblib-cloud-watchdog.service", "permissions": "0644",
         "content": watchdog_unit(user, idle_timeout, deadline, boot_timeout,
                                  shutdown_command, no_client_timeout)},
        {"path": f"{ROOT}/boot.sh", "permissions": "0755",
         "content": boot_script(user, python_minor, client_requirements(packages),
                                requirements_path is not None, image, python)},
        {"path": CLIENT_KEY_PATH, "permissions": "0644", "content": client_public_key + "\n"},
    ]
    if requirements_path is not None:
        files.append({"path": f"{ROOT}/requirements.txt", "permissions": "0644",
                      "content": Path(requirements_path).expanduser().read_text()})
    document = {
        # Our host key, nothing else: sshd starts with a key the client already trusts
        # (with ssh_keys given, cloud-init generates no others).
        "ssh_deletekeys": True,
        "ssh_keys": {"ed25519_private": host_private_key, "ed25519_public": host_public_key},
        "disable_root": True,
        "bootcmd": [hard_stop_command(deadline)],
        "write_files": files,
        "runcmd": [["systemctl", "daemon-reload"],
                   ["systemctl", "enable", "--now", "joblib-cloud-watchdog.service"],
                   ["bash", f"{ROOT}/boot.sh"]],
    }
    text = "#cloud-config\n" + json.dumps(document, indent=1, ensure_ascii=False) + "\n"
    if len(text.encode()) > MAX_USER_DATA:
        raise ValueError(
            f"the boot script is {len(text.encode())} bytes, over EC2's 16 KiB user-data "
            "limit: shorten the requirements file or pass fewer packages=")
    return text


def _packed(path: str, source: str) -> dict[str, Any]:
    """A shipped script as cloud-init's ``gz+b64`` file: the scripts are most of the
    document, and compressed they leave room under EC2's 16 KiB for the boot script and
    the user's requirements."""
    data = base64.b64encode(gzip.compress(source.encode(), mtime=0)).decode()
    return {"path": path, "permissions": "0755", "encoding": "gz+b64", "content": data}


def parse(text: str) -> dict[str, Any]:
    """Inverse of :func:`build` (used by tests and diagnostics): packed files' contents
    as their text."""
    header, _, body = text.partition("\n")
    if header.strip() != "#cloud-config":
        raise ValueError("not a joblib-cloud user-data document")
    document = json.loads(body)
    for entry in document.get("write_files", ()):
        if entry.pop("encoding", None) == "gz+b64":
            entry["content"] = gzip.decompress(base64.b64decode(entry["content"])).decode()
    return document
