"""A real Docker engine and a registry on loopback, for ``image=`` tests.

- ``image_tarball()``: a Debian 12 root made by ``mmdebstrap`` holding a venv
  (``/opt/venv``) with this client's joblib, cloudpickle, numpy, scipy, scikit-learn and
  paramiko, pip-installed from the package index at build time, plus one module the
  hosts' own Python does not have (``MARKER_MODULE``).  Cached by recipe, as
  ``guests.base_image`` is.
- ``Engine``: Debian's ``dockerd`` with its own socket and exec root (``--iptables=false
  --ip6tables=false --bridge=none``; containers use ``--network host``), and Debian's
  ``docker-registry`` on ``127.0.0.1:<free port>``; the data roots of both are kept in
  the cache, so the imported and pushed image survives between runs.  Each start pushes
  it (a no-op once the registry has it) and untags it again under the registry's name,
  so a host's first ``docker run 127.0.0.1:PORT/…`` really pulls it from the registry,
  as a VM would.

Both daemons are stopped by PID.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from guests import CACHE, _ca_bundle
from sshfleet import _free_port

DOCKERD = shutil.which("dockerd") or "/usr/sbin/dockerd"
REGISTRY = shutil.which("docker-registry") or "/usr/bin/docker-registry"
DEBIAN_PACKAGES = ("python3", "python3-venv", "ca-certificates")
PIP_PACKAGES = ("joblib", "cloudpickle", "numpy", "scipy", "scikit-learn", "pandas",
                "paramiko")
VENV = "/opt/venv"
#: A module only the image has: importing it inside a task proves the image's packages.
MARKER_MODULE = "joblib_cloud_image_marker"
MARKER_VALUE = "packages of the joblib-cloud test image"
IMAGE_PATH = f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
REPOSITORY = "joblib-cloud-test/worker"


def tools_missing() -> str | None:
    """Why a Docker engine cannot run here, or None."""
    if os.geteuid() != 0:
        return "dockerd needs root"
    for tool, package in ((DOCKERD, "docker.io"), (REGISTRY, "docker-registry"),
                          ("docker", "docker.io"), ("mmdebstrap", "mmdebstrap")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install {package})"
    return None


def _pins() -> list[str]:
    """The client's own versions: the agent refuses a different cloudpickle, and equal
    numpy/scikit-learn keep results equal to the client's."""
    return [f"{name}=={importlib.metadata.version(name)}" for name in PIP_PACKAGES]


def _hooks() -> list[str]:
    pip = f"{VENV}/bin/pip install --quiet --no-cache-dir --disable-pip-version-check"
    marker = f"{VENV}/lib/python3.11/site-packages/{MARKER_MODULE}.py"
    return [
        'cat > "$1/etc/ssl/certs/ca-certificates.crt" < "$JC_CA_BUNDLE"',
        'printf "[global]\\ncert = /etc/ssl/certs/ca-certificates.crt\\n" > "$1/etc/pip.conf"',
        f'chroot "$1" python3 -m venv {VENV}',
        f'chroot "$1" env -i PATH=/usr/bin:/bin HOME=/root {pip} ' + " ".join(_pins()),
        f'echo "VALUE = {MARKER_VALUE!r}" > "$1{marker}"',
        'rm -rf "$1"/var/lib/apt/lists/* "$1"/usr/share/doc "$1"/usr/share/man',
    ]


def _recipe() -> str:
    return json.dumps({"packages": DEBIAN_PACKAGES, "hooks": _hooks(),
                       "fn": inspect.getsource(image_tarball)}, sort_keys=True)


def recipe_key() -> str:
    return hashlib.sha256((_recipe() + _ca_bundle().hex()[:64]).encode()).hexdigest()[:12]


def image_tarball() -> Path:
    """The cached root filesystem tarball (built on first use: a few minutes)."""
    path = CACHE / f"docker-image-{recipe_key()}.tar"
    if path.exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return path
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            bundle = Path(tmp) / "ca.crt"
            bundle.write_bytes(_ca_bundle())
            out = Path(tmp) / "root.tar"
            subprocess.run(["mmdebstrap", "--quiet", "--variant=minbase",
                            f"--include={','.join(DEBIAN_PACKAGES)}",
                            *[f"--customize-hook={hook}" for hook in _hooks()],
                            "bookworm", str(out)],
                           check=True, stdin=subprocess.DEVNULL,
                           env={**os.environ, "JC_CA_BUNDLE": str(bundle)})
            out.rename(path)
    return path


def _stop(proc: subprocess.Popen | None, timeout: float = 30) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


class Engine:
    """``dockerd`` and a registry on loopback; ``image`` is the registry's reference."""

    def __init__(self) -> None:
        # Short: containerd's sockets live under the exec root (108-byte socket paths).
        self.dir = Path(tempfile.mkdtemp(prefix="jc-docker-", dir="/tmp"))
        self.socket = self.dir / "docker.sock"
        self.host = f"unix://{self.socket}"
        self.data_root = CACHE / "docker-data"
        # Kept per recipe: a re-push then sends nothing.
        self.registry_root = CACHE / f"docker-registry-{recipe_key()}"
        self.dockerd: subprocess.Popen | None = None
        self.registry: subprocess.Popen | None = None
        self.registry_port = 0
        self.local_image = f"{REPOSITORY}:{recipe_key()}"
        self.image = ""
        self._lock: object | None = None

    # ------------------------------------------------------------------ commands
    @property
    def env(self) -> dict[str, str]:
        """The environment under which ``docker`` talks to this engine."""
        return {**os.environ, "DOCKER_HOST": self.host,
                "DOCKER_CONFIG": str(self.dir / "client")}

    def docker(self, *args: str, check: bool = True, timeout: float = 600
               ) -> subprocess.CompletedProcess:
        return subprocess.run(["docker", *args], env=self.env, capture_output=True,
                              text=True, check=check, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def has_image(self, ref: str) -> bool:
        return self.docker("image", "inspect", ref, check=False).returncode == 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Engine:
        CACHE.mkdir(parents=True, exist_ok=True)
        lock = open(CACHE / ".docker-data.lock", "w")
        fcntl.flock(lock, fcntl.LOCK_EX)  # one engine on the cached data root at a time
        self._lock = lock
        tarball = image_tarball()
        self._start_dockerd()
        self._start_registry()
        self._remove_other_recipes()
        if not self.has_image(self.local_image):
            self.docker("import", "--change", f"ENV PATH={IMAGE_PATH}", str(tarball),
                        self.local_image)
        self.image = f"127.0.0.1:{self.registry_port}/{self.local_image}"
        self.docker("tag", self.local_image, self.image)
        self.docker("push", self.image)
        self.docker("rmi", self.image)  # untag only: hosts pull it from the registry
        return self

    def _remove_other_recipes(self) -> None:
        """The images, tarballs and registries of older recipes (they are 0.5 GB each)."""
        for path in [*CACHE.glob("docker-image-*.tar"), *CACHE.glob("docker-registry-*")]:
            if recipe_key() in path.name:
                continue
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        tags = self.docker("images", REPOSITORY, "--format", "{{.Repository}}:{{.Tag}}")
        stale = [ref for ref in tags.stdout.split() if ref != self.local_image]
        if stale:
            self.docker("rmi", *stale)

    def _start_dockerd(self) -> None:
        log = open(self.dir / "dockerd.log", "wb")
        self.dockerd = subprocess.Popen(
            [DOCKERD, "--iptables=false", "--ip6tables=false", "--bridge=none",
             "--data-root", str(self.data_root), "--exec-root", str(self.dir / "exec"),
             "--pidfile", str(self.dir / "dockerd.pid"), "-H", self.host],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self._wait(lambda: self.docker("version", check=False).returncode == 0,
                   self.dockerd, "dockerd", self.dir / "dockerd.log")

    def _start_registry(self) -> None:
        self.registry_port = _free_port("127.0.0.1")
        config = self.dir / "registry.yml"
        config.write_text(json.dumps({  # YAML is a superset of JSON
            "version": 0.1, "log": {"level": "warn"},
            "storage": {"filesystem": {"rootdirectory": str(self.registry_root)}},
            "http": {"addr": f"127.0.0.1:{self.registry_port}"}}))
        log = open(self.dir / "registry.log", "wb")
        self.registry = subprocess.Popen([REGISTRY, "serve", str(config)],
                                         stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)
        log.close()

        def answers() -> bool:
            import urllib.request
            try:
                with urllib.request.urlopen(
                        f"http://127.0.0.1:{self.registry_port}/v2/", timeout=1) as r:
                    return r.status == 200
            except OSError:
                return False

        self._wait(answers, self.registry, "docker-registry", self.dir / "registry.log")

    @staticmethod
    def _wait(ready, proc: subprocess.Popen, what: str, log: Path,
              timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start: {log.read_text()[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.dockerd is not None and self.dockerd.poll() is None:
            running = self.docker("ps", "-q", check=False).stdout.split()
            if running:
                self.docker("rm", "-f", *running, check=False)
        _stop(self.registry)
        _stop(self.dockerd, timeout=60)
        if self._lock is not None:
            self._lock.close()  # type: ignore[attr-defined]
            self._lock = None
        for mount in reversed(self._mounts()):  # dockerd leaves exec/netns/default mounted
            subprocess.run(["umount", "-l", mount], check=False)
        shutil.rmtree(self.dir, ignore_errors=True)

    def _mounts(self) -> list[str]:
        with open("/proc/self/mountinfo") as info:
            points = [line.split()[4] for line in info]
        return [p for p in points if p.startswith(f"{self.dir}/")]


@pytest.fixture(name="engine", scope="module")
def engine_fixture():
    """A started ``Engine`` (the image in its registry), stopped after the module."""
    reason = tools_missing()
    if reason:
        pytest.fail(f"a Docker engine cannot run here: {reason}")
    engine = Engine()
    try:
        engine.start()
        yield engine
    finally:
        engine.stop()


def where_am_i(i: int) -> dict:
    """A task that says where it ran: which Python, whose home, inside the image or not."""
    import joblib_cloud_image_marker  # only the image has it

    return {"i": i, "prefix": sys.prefix, "marker": joblib_cloud_image_marker.VALUE,
            "home": os.environ["JOBLIB_CLOUD_HOME"], "uid": os.getuid(),
            "dockerenv": os.path.exists("/.dockerenv"),
            "python": ".".join(map(str, sys.version_info[:2]))}
