"""Guests: Debian machines that really boot, standing in for EC2 instances.

A guest is what an EC2 instance of a Debian cloud image is, minus the hypervisor: its own
root filesystem (made by ``mmdebstrap`` from Debian's packages: systemd, cloud-init,
sshd, python3, sudo, curl; no venv module, no pip, nothing of ours), booted by
``systemd-nspawn -b`` as PID 1 systemd, with real cloud-init reading a NoCloud seed, and
clocks that start near zero (``unshare --time`` offsets), as a VM's do.

Two image families, as two AMIs: ``bookworm`` (Debian 12: Python 3.11, cloud-init 22.4)
and ``trixie`` (Debian 13: Python 3.13 only, cloud-init 25.1), built from the same recipe
and customised alike: on both, cloud.cfg's default user is ``debian`` (replaced below),
sshd reads ``sshd_config.d``, and ``cloud-init schema --config-file`` checks a document.
Debian 13 differs in what needs nothing here: an ``sshd-keygen`` unit (off when
cloud-init is active) and cloud-init as one process, which prints a traceback on the
console when the machine powers off during its last stage.
Image properties, as an AMI has them: a default user ``ec2-user`` with passwordless sudo,
the NoCloud datasource, no SSH host keys of its own, this machine's CA bundle (so pip and
uv inside reach the package index), cloud-init's network configuration off (the guest
shares this machine's network namespace: it must not reconfigure it).  Each guest's sshd
listens only on its own loopback address ``127.P.x.y:22`` (``P`` from the test process's
id, so test sessions sharing a machine never answer for each other's guests).

The base image is built once and cached (``JOBLIB_CLOUD_GUEST_CACHE``, by default
``/var/cache/joblib-cloud-tests``), keyed by its recipe; each guest runs on an overlay of
it, so a boot writes nothing into the cache.  A guest's console (what EC2's
``GetConsoleOutput`` returns) is the systemd-nspawn process's output, kept in a file.
Every process is stopped by its PID.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import inspect
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

CACHE = Path(os.environ.get("JOBLIB_CLOUD_GUEST_CACHE", "/var/cache/joblib-cloud-tests"))
PACKAGES = ("systemd-sysv", "dbus", "openssh-server", "cloud-init", "python3", "sudo",
            "ca-certificates", "curl")
#: Image family -> the cache directory's prefix (the family is Debian's suite name).
FAMILIES = {"bookworm": "debian12", "trixie": "debian13"}
DEFAULT_USER = "ec2-user"

#: The image's ``/etc/uv/uv.toml``: uv trusts the system's CA bundle (this machine's).
IMAGE_UV_CONFIG = "native-tls = true\n"
#: What the image's own cloud-init configuration says (an AMI's /etc/cloud/cloud.cfg.d).
IMAGE_CLOUD_CFG = {
    "datasource_list": ["NoCloud", "None"],
    "system_info": {"default_user": {
        "name": DEFAULT_USER, "lock_passwd": True, "gecos": "EC2 Default User",
        "groups": ["adm", "systemd-journal"], "sudo": ["ALL=(ALL) NOPASSWD:ALL"],
        "shell": "/bin/bash"}},
    "network": {"config": "disabled"},
    "locale": "false",  # cloud-init skips the locale module (minbase has no locales)
}


def tools_missing() -> str | None:
    """Why guests cannot run here, or None."""
    if os.geteuid() != 0:
        return "guests need root (systemd-nspawn, mounts)"
    for tool in ("mmdebstrap", "systemd-nspawn", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install mmdebstrap systemd-container)"
    return None


def _ca_bundle() -> bytes:
    paths = ssl.get_default_verify_paths()
    for path in (paths.cafile, "/etc/ssl/certs/ca-certificates.crt"):
        if path and os.path.exists(path):
            return Path(path).read_bytes()
    raise RuntimeError("no CA bundle on this machine")


def _customize(root: Path) -> None:
    """Turn a plain Debian root into what a cloud image is."""
    cfg = root / "etc/cloud/cloud.cfg.d/90-image.cfg"
    cfg.write_text(json.dumps(IMAGE_CLOUD_CFG, indent=1) + "\n")
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (root / "etc/ssl/certs/ca-certificates.crt").write_bytes(_ca_bundle())
    (root / "etc/pip.conf").write_text("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")
    (root / "etc/uv").mkdir(exist_ok=True)
    (root / "etc/uv/uv.toml").write_text(IMAGE_UV_CONFIG)
    # A VM has no other machine's containers to talk to; keep boot output on the console.
    (root / "etc/hostname").write_text("localhost\n")
    with contextlib.suppress(FileNotFoundError):
        (root / "etc/machine-id").write_text("")  # each boot makes its own


def _recipe(family: str) -> str:
    return json.dumps({"suite": family, "packages": PACKAGES, "cfg": IMAGE_CLOUD_CFG,
                       "uv": IMAGE_UV_CONFIG, "customize": inspect.getsource(_customize)},
                      sort_keys=True)


def base_image(family: str = "bookworm") -> Path:
    """The cached base root filesystem of ``family`` (built on first use, ~35-45 s)."""
    if family not in FAMILIES:
        raise ValueError(f"no guest image family {family!r}: one of {sorted(FAMILIES)}")
    recipe = _recipe(family)
    key = hashlib.sha256((recipe + _ca_bundle().hex()[:64]).encode()).hexdigest()[:12]
    path = CACHE / f"{FAMILIES[family]}-{key}"
    if (path / ".complete").exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (path / ".complete").exists():
            return path
        tmp = CACHE / f".build-{key}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run(["mmdebstrap", "--quiet", "--variant=minbase",
                        f"--include={','.join(PACKAGES)}", family, str(tmp)],
                       check=True, stdin=subprocess.DEVNULL)
        _customize(tmp)
        (tmp / ".complete").write_text(recipe)
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    return path


#: The second byte of this test process's guest addresses.
_NET = 1 + os.getpid() % 254


def _address(index: int) -> str:
    return f"127.{_NET}.{index // 250}.{index % 250 + 2}"


#: Where a Docker guest sees this machine's cgroup v1 controllers (bind-mounted, writable).
HOST_CGROUP = "/run/host-cgroup"
#: A unit of the Docker guest's image: nspawn mounts the cgroup v1 controllers read-only,
#: where runc must create each container's cgroups; a VM's kernel has them writable.
_CGROUP_UNIT = f"""[Unit]
Description=Writable cgroup controllers, as a VM has them
DefaultDependencies=no
Before=sysinit.target containerd.service docker.service
ConditionPathIsDirectory={HOST_CGROUP}

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/host-cgroup

[Install]
WantedBy=sysinit.target
"""
_CGROUP_SCRIPT = f"""#!/bin/sh
for c in {HOST_CGROUP}/*; do mount --bind "$c" "/sys/fs/cgroup/${{c##*/}}"; done
"""
#: The guest shares this machine's network namespace: its Docker must not add a bridge
#: or firewall rules to it (containers run with ``--network host`` anyway).
_DOCKER_DAEMON = {"iptables": False, "ip6tables": False, "bridge": "none"}


def _cgroup_controllers() -> list[str]:
    root = Path("/sys/fs/cgroup")
    return sorted(p.name for p in root.iterdir()
                  if p.name not in ("systemd", "unified") and not p.is_symlink()
                  and (p / "cgroup.procs").exists())


def _uptime() -> float:
    return float(Path("/proc/uptime").read_text().split()[0])


class Guest:
    """One booting machine.  ``console`` is its console output so far."""

    def __init__(self, workdir: Path, index: int, user_data: str, instance_id: str,
                 delay: float = 0.0, family: str = "bookworm",
                 files: dict[str, str] | None = None, docker: bool = False) -> None:
        """``docker``: a machine where Docker can run containers (``_docker_nspawn``)."""
        self.index = index
        self.family = family
        #: Files of the image's own (path -> text), written before boot: an AMI's settings.
        self.files = dict(files or {})
        self.docker = docker
        self.address = _address(index)
        self.port = 22
        self.instance_id = instance_id
        self.dir = workdir / f"guest{index}"
        self.dir.mkdir(parents=True)
        self.user_data = user_data
        self.delay = delay
        self.console_path = self.dir / "console.log"
        self.root = self.dir / "root"
        self.proc: subprocess.Popen | None = None
        self.created_at = time.time()
        self.started_at: float | None = None  # time.time() when systemd-nspawn started
        self.exited_at: float | None = None
        self._mounted = False
        self._exit_callbacks: list = []
        self._lock = threading.Lock()
        self._cancelled = threading.Event()

    # -------------------------------------------------------------- lifecycle
    def _prepare(self) -> None:
        base = base_image(self.family)
        upper, work = self.dir / "upper", self.dir / "work"
        for d in (upper, work, self.root):
            d.mkdir()
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={base},upperdir={upper},workdir={work}", str(self.root)],
                       check=True)
        self._mounted = True
        seed = self.root / "var/lib/cloud/seed/nocloud"
        seed.mkdir(parents=True, exist_ok=True)
        (seed / "meta-data").write_text(
            f"instance-id: {self.instance_id}\nlocal-hostname: {self.instance_id}\n")
        (seed / "user-data").write_text(self.user_data)
        (self.root / "etc/ssh/sshd_config.d/00-guest-address.conf").write_text(
            f"ListenAddress {self.address}:{self.port}\n")
        for path, text in self.files.items():
            (self.root / path.lstrip("/")).write_text(text)
        if self.docker:
            (self.root / "etc/docker").mkdir(parents=True, exist_ok=True)
            (self.root / "etc/docker/daemon.json").write_text(json.dumps(_DOCKER_DAEMON))
            unit = self.root / "etc/systemd/system/host-cgroup.service"
            unit.write_text(_CGROUP_UNIT)
            script = self.root / "usr/local/sbin/host-cgroup"
            script.write_text(_CGROUP_SCRIPT)
            script.chmod(0o755)
            wants = self.root / "etc/systemd/system/sysinit.target.wants"
            wants.mkdir(parents=True, exist_ok=True)
            (wants / unit.name).symlink_to(f"/etc/systemd/system/{unit.name}")
            (self.dir / "docker").mkdir()

    def _docker_nspawn(self) -> list[str]:
        """What Docker needs of nspawn: every capability, the bpf and keyring system
        calls, this machine's cgroup controllers (mounted over nspawn's read-only ones by
        ``_CGROUP_UNIT``), and ``/var/lib/docker`` on a plain directory (overlay2 does not
        stack on the guest's overlay root)."""
        if not self.docker:
            return []
        return ["--capability=all", "--system-call-filter=@keyring bpf",
                f"--bind={self.dir / 'docker'}:/var/lib/docker",
                *[f"--bind=/sys/fs/cgroup/{c}:{HOST_CGROUP}/{c}"
                  for c in _cgroup_controllers()]]

    def start(self) -> Guest:
        """Boot now, or after ``delay`` seconds (a machine that comes up late)."""
        self._prepare()
        if self.delay:
            threading.Thread(target=self._delayed_boot, daemon=True).start()
        else:
            self._boot()
        return self

    def _delayed_boot(self) -> None:
        if not self._cancelled.wait(self.delay):
            self._boot()

    def _boot(self) -> None:
        offset = max(int(_uptime()) - 1, 0)
        with self._lock:
            if self._cancelled.is_set():
                return
            console = open(self.console_path, "wb")
            self.proc = subprocess.Popen(
                ["unshare", "--time", "--fork", "--kill-child",
                 f"--boottime=-{offset}", f"--monotonic=-{offset}",
                 "systemd-nspawn", "--quiet", "-b", "-D", str(self.root), "--register=no",
                 "--keep-unit", "-M", f"guest{self.index}", "--console=read-only",
                 *self._docker_nspawn()],
                stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                start_new_session=True)
            console.close()
            self.started_at = time.time()
        threading.Thread(target=self._wait_exit, daemon=True).start()

    def _wait_exit(self) -> None:
        assert self.proc is not None
        self.proc.wait()
        self.exited_at = time.time()
        for callback in list(self._exit_callbacks):
            callback(self)

    def on_exit(self, callback) -> None:
        self._exit_callbacks.append(callback)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def powered_off(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def _nspawn_pid(self) -> int | None:
        """systemd-nspawn itself, the child of ``unshare --fork``."""
        if self.proc is None:
            return None
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            pids = children.read_text().split()
        except OSError:
            return None
        return int(pids[0]) if pids else None

    def power_off(self, timeout: float = 60) -> None:
        """What ``TerminateInstances`` does: a clean shutdown (SIGTERM to nspawn)."""
        with self._lock:
            self._cancelled.set()
        if not self.running:
            return
        pid = self._nspawn_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """The machine vanishes at once."""
        with self._lock:
            self._cancelled.set()
        if self.proc is None:
            return
        pid = self._nspawn_pid()
        for target in (pid, self.proc.pid):
            if target is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(target, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def cleanup(self) -> None:
        self.power_off()
        if self._mounted:
            subprocess.run(["umount", "-l", str(self.root)], check=False)
            self._mounted = False

    # -------------------------------------------------------------- looking inside
    def console(self) -> str:
        try:
            return self.console_path.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def file(self, path: str) -> str | None:
        """A file of the guest's filesystem (read from its overlay, as root would)."""
        try:
            return (self.root / path.lstrip("/")).read_text(errors="replace")
        except (FileNotFoundError, NotADirectoryError):
            return None

    def uptime(self) -> float | None:
        return None if self.started_at is None else time.time() - self.started_at

    def offered_host_keys(self) -> list[str]:
        """Every host key its sshd offers (one key exchange per key type, as ssh-keyscan
        does), as ``type base64`` strings."""
        out = subprocess.run(["ssh-keyscan", "-T", "5", "-p", str(self.port), self.address],
                             capture_output=True, text=True, timeout=60).stdout
        return sorted(" ".join(line.split()[1:3]) for line in out.splitlines()
                      if line and not line.startswith("#"))

    def listening(self) -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex((self.address, self.port)) == 0

    def wait(self, condition, timeout: float, what: str, poll: float = 0.25) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"guest {self.instance_id}: timed out after {timeout:.0f}s waiting for "
                    f"{what}; console tail:\n{self.console()[-3000:]}")
            time.sleep(poll)
