"""The Pythons users bring, for tests: the interpreters on this machine (pyenv's and
Debian's own), and environments made from them that hold only what a real host holds.

A host environment is a venv with exactly the given pinned packages, nothing of the
client's (no joblib-cloud, paramiko, boto3, pytest).  It is built once per interpreter and
package list and cached (``JOBLIB_CLOUD_GUEST_CACHE``, by default
``/var/cache/joblib-cloud-tests``, beside the guests' images).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

CACHE = Path(os.environ.get("JOBLIB_CLOUD_GUEST_CACHE", "/var/cache/joblib-cloud-tests")
             ) / "pythons"
SUPPORTED_MINORS = ((3, 10), (3, 11), (3, 12), (3, 13))
#: What the README asks of a host.
HOST_MINIMAL = ("joblib", "cloudpickle")
#: What an ``aws`` boot installs (providers/aws/userdata.py CLIENT_PACKAGES, less pandas).
HOST_SCIENTIFIC = ("joblib", "cloudpickle", "threadpoolctl", "numpy", "scipy",
                   "scikit-learn")


def _pyenv_root() -> Path:
    return Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")


def describe(python: str) -> dict:
    """Version and origin of an interpreter, asked of the interpreter itself."""
    code = ("import json, sys, sysconfig; print(json.dumps({'version': "
            "'.'.join(map(str, sys.version_info[:3])), 'base': sys.base_prefix, "
            "'executable': sys.executable}))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    info = json.loads(out.stdout)
    info["label"] = info["version"] + (" (Debian)" if info["base"] == "/usr" else "")
    return info


def interpreters() -> list[str]:
    """Every supported CPython found here: pyenv's versions and the distribution's."""
    found = []
    versions = _pyenv_root() / "versions"
    if versions.is_dir():
        for entry in sorted(versions.iterdir()):
            parts = entry.name.split(".")
            if len(parts) == 3 and all(p.isdigit() for p in parts) and \
                    (int(parts[0]), int(parts[1])) in SUPPORTED_MINORS:
                exe = entry / "bin" / f"python{parts[0]}.{parts[1]}"
                if exe.exists():
                    found.append(str(exe))
    for major, minor in SUPPORTED_MINORS:
        exe = Path(f"/usr/bin/python{major}.{minor}")
        if exe.exists():
            found.append(str(exe))
    return found


def base_interpreter() -> str:
    """The interpreter this process's venv (if any) was made from."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    return base if os.path.exists(base) else sys.executable


def minor(python: str) -> str:
    return describe(python)["version"].rsplit(".", 1)[0]


def same_minor_interpreters() -> list[str]:
    """This process's own interpreter first, then every other installation of the same
    minor (a host at another patch level than the client: Debian's 3.11.2 for 3.11.7)."""
    own = os.path.realpath(base_interpreter())
    others = {os.path.realpath(p) for p in interpreters()} - {own}
    return [own, *sorted(p for p in others if minor(p) == minor(own))]


def client_pins(names: tuple[str, ...]) -> list[str]:
    """``name==version`` of this client's own copy of each package (a host must match)."""
    return [f"{name}=={importlib.metadata.version(name)}" for name in names]


def host_env(python: str, packages: list[str]) -> Path:
    """The ``python`` of a cached venv made from ``python`` holding only ``packages``."""
    info = describe(python)
    key = hashlib.sha256(json.dumps([os.path.realpath(python), info["version"],
                                     sorted(packages)]).encode()).hexdigest()[:12]
    root = CACHE / f"host-{info['version']}-{key}"
    if not (root / ".complete").exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        with open(CACHE / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (root / ".complete").exists():
                shutil.rmtree(root, ignore_errors=True)
                subprocess.run([python, "-m", "venv", str(root)], check=True)
                subprocess.run([str(root / "bin" / "python"), "-m", "pip", "install", "-q",
                                "--disable-pip-version-check", *packages], check=True)
                (root / ".complete").write_text(json.dumps(packages))
    return root / "bin" / "python"
