"""The cloud-init user-data that turns a fresh EC2 image into a joblib-cloud host.

Order matters for safety and for the client's wait:

1. cloud-init installs *our* pre-generated SSH host key before sshd starts, so the very
   first connection is verified against a key the client already knows.
2. A scheduled ``shutdown`` (max lifetime) and the watchdog service start before anything
   can fail, so even a broken boot never leaves a billed machine behind.
3. The boot script installs Python at the client's minor version and the client's package
   versions into ``/opt/joblib-cloud/venv``.
4. Only then is the client's public key authorised: until that moment SSH logins are
   refused, which the client treats as "still booting" and retries.

The document is ``#cloud-config`` followed by JSON (a subset of YAML), so it needs no YAML
library to write and tests can parse exactly what EC2 stored.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import shlex
from pathlib import Path
from typing import Any

VENV = "/opt/joblib-cloud/venv"
HOST_PYTHON = f"{VENV}/bin/python"
#: Pinned to the client's versions so pickles and results match (DESIGN §7).  The agent
#: itself needs only joblib and cloudpickle (tests/test_host_requirements.py).
CLIENT_PACKAGES = ("joblib", "cloudpickle", "loky", "numpy", "scipy", "scikit-learn",
                   "pandas", "threadpoolctl")
CLIENT_KEY_PATH = "/opt/joblib-cloud/client_key.pub"
MAX_USER_DATA = 16 * 1024  # EC2's limit, before base64


def client_requirements(extra: tuple[str, ...] = ()) -> list[str]:
    pins = []
    for name in CLIENT_PACKAGES:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return pins + list(extra)


def boot_script(user: str, python_minor: str, requirements: list[str],
                requirements_file: bool) -> str:
    """Bash run by cloud-init (as root) once the watchdog is up."""
    home = f"$(getent passwd {user} | cut -d: -f6)"
    pip_args = " ".join(shlex.quote(r) for r in requirements)
    if requirements_file:
        pip_args += " -r /opt/joblib-cloud/requirements.txt"
    return f"""#!/bin/bash
# joblib-cloud boot script: Python {python_minor} + the client's packages, then SSH access.
set -euo pipefail
exec >>/var/log/joblib-cloud-boot.log 2>&1
trap 'echo "joblib-cloud: boot failed, shutting down"; shutdown -h now' ERR
PY=python{python_minor}
if ! command -v "$PY" >/dev/null; then
  if command -v dnf >/dev/null; then dnf install -y "$PY" "$PY-pip" || true
  elif command -v apt-get >/dev/null; then
    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y "$PY" "$PY-venv" || true
  fi
fi
if command -v "$PY" >/dev/null; then
  "$PY" -m venv {VENV}
else  # no distribution package for this Python: a standalone build through uv
  curl -LsSf https://astral.sh/uv/install.sh | env UV_INSTALL_DIR=/opt/joblib-cloud/uv sh
  UV_PYTHON_INSTALL_DIR=/opt/joblib-cloud/python /opt/joblib-cloud/uv/uv venv --seed \\
    --python {python_minor} {VENV}
fi
{HOST_PYTHON} -m pip install --quiet --upgrade pip
{HOST_PYTHON} -m pip install --quiet {pip_args}
HOME_DIR={home}
install -d -m 700 -o {user} -g {user} "$HOME_DIR/.joblib-cloud" "$HOME_DIR/.ssh"
touch "$HOME_DIR/.joblib-cloud/activity" && chown {user}: "$HOME_DIR/.joblib-cloud/activity"
cat {CLIENT_KEY_PATH} >> "$HOME_DIR/.ssh/authorized_keys"
chown {user}: "$HOME_DIR/.ssh/authorized_keys" && chmod 600 "$HOME_DIR/.ssh/authorized_keys"
echo "joblib-cloud: host ready"
"""


def watchdog_unit(user: str, idle_timeout: float, max_lifetime: float,
                  shutdown_command: str) -> str:
    home = f"/home/{user}/.joblib-cloud" if user != "root" else "/root/.joblib-cloud"
    command = " ".join(shlex.quote(a) for a in [
        "/usr/bin/python3", "/opt/joblib-cloud/watchdog.py", "--since-boot", "--home", home,
        "--idle-timeout", f"{idle_timeout:g}", "--max-lifetime", f"{max_lifetime:g}",
        "--shutdown-command", shutdown_command.removeprefix("sudo "), "--poll", "15"])
    return f"""[Unit]
Description=joblib-cloud kill switch (idle timeout and maximum lifetime)
After=network.target

[Service]
ExecStart={command}
Restart=always
RestartSec=5

[Install]
WantedBy=multi-user.target
"""


def build(*, user: str, host_private_key: str, host_public_key: str, client_public_key: str,
          idle_timeout: float, max_lifetime: float, shutdown_command: str,
          boot_timeout: float = 1200.0, packages: tuple[str, ...] = (), requirements_path: str | None = None) -> str:
    """The user-data for one host (each host gets its own SSH host key)."""
    python_minor = ".".join(platform.python_version_tuple()[:2])
    watchdog_src = (Path(__file__).parent / "watchdog.py").read_text()
    files: list[dict[str, Any]] = [
        # sshd offers only the key the client expects (the image may generate others).
        {"path": "/etc/ssh/sshd_config.d/01-joblib-cloud.conf", "permissions": "0644",
         "content": "HostKey /etc/ssh/ssh_host_ed25519_key\nPasswordAuthentication no\n"},
        {"path": "/opt/joblib-cloud/watchdog.py", "permissions": "0755",
         "content": watchdog_src},
        {"path": "/etc/systemd/system/joblib-cloud-watchdog.service", "permissions": "0644",
         "content": watchdog_unit(user, idle_timeout, max_lifetime, shutdown_command)},
        {"path": "/opt/joblib-cloud/boot.sh", "permissions": "0755",
         "content": boot_script(user, python_minor, client_requirements(packages),
                                requirements_path is not None)},
        {"path": CLIENT_KEY_PATH, "permissions": "0644", "content": client_public_key + "\n"},
    ]
    if requirements_path is not None:
        files.append({"path": "/opt/joblib-cloud/requirements.txt", "permissions": "0644",
                      "content": Path(requirements_path).expanduser().read_text()})
    lifetime_minutes = max(int(max_lifetime // 60), 1)
    document = {
        # Our host key, nothing else: sshd starts with a key the client already trusts.
        "ssh_deletekeys": True,
        "ssh_genkeytypes": [],
        "ssh_keys": {"ed25519_private": host_private_key, "ed25519_public": host_public_key},
        "disable_root": True,
        # A hard stop that does not depend on Python or the watchdog at all.
        "bootcmd": [["shutdown", "-h", f"+{lifetime_minutes}"]],
        "write_files": files,
        "runcmd": [["systemctl", "daemon-reload"],
                   ["systemctl", "enable", "--now", "joblib-cloud-watchdog.service"],
                   ["bash", "/opt/joblib-cloud/boot.sh"]],
    }
    text = "#cloud-config\n" + json.dumps(document, indent=1) + "\n"
    if len(text.encode()) > MAX_USER_DATA:
        raise ValueError(
            f"the boot script is {len(text.encode())} bytes, over EC2's 16 KiB user-data "
            "limit: shorten the requirements file or pass fewer packages=")
    return text


def parse(text: str) -> dict[str, Any]:
    """Inverse of :func:`build` (used by tests and diagnostics)."""
    header, _, body = text.partition("\n")
    if header.strip() != "#cloud-config":
        raise ValueError("not a joblib-cloud user-data document")
    return json.loads(body)
