"""A fleet of real OpenSSH servers on loopback, standing in for cloud VMs.

Each host: its own 127.0.0.x address and port, host key, authorized key, sshd log and
work directory (``JOBLIB_CLOUD_HOME`` set by sshd's ``SetEnv``).  Killing a host's sshd
and everything below it is how a VM dies in a test; every process is stopped by PID.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def _keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", str(path)],
                   check=True)
    return (path.with_suffix(".pub") if path.suffix else Path(str(path) + ".pub")
            ).read_text().strip()


def _free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


class SSHHost:
    def __init__(self, root: Path, index: int, client_pub: str,
                 host_key: tuple[str, str] | None = None, user_ca: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        """``host_key``: a given (OpenSSH private key, public line) pair instead of a
        fresh one, e.g. the key an EC2 user-data document carries; ``user_ca``: a public
        key whose user certificates sshd accepts (``TrustedUserCAKeys``).  ``env``: more
        variables every login gets (sshd ``SetEnv``), e.g. ``DOCKER_HOST``."""
        self.index = index
        self.address = f"127.0.0.{index + 2}"
        self.dir = root / f"host{index}"
        self.dir.mkdir(parents=True)
        self.home = self.dir / "home"
        self.home.mkdir()
        if host_key is None:
            self.host_key_pub = _keygen(self.dir / "ssh_host_ed25519_key")
        else:
            key_file = self.dir / "ssh_host_ed25519_key"
            key_file.write_text(host_key[0])
            key_file.chmod(0o600)  # sshd ignores a host key others can read
            self.host_key_pub = host_key[1].strip()
        (self.dir / "authorized_keys").write_text(client_pub + "\n")
        self.user_ca = user_ca
        if user_ca:
            (self.dir / "user_ca.pub").write_text(user_ca.strip() + "\n")
        self.log = self.dir / "sshd.log"
        self.user = getpass.getuser()
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.env = {"JOBLIB_CLOUD_HOME": str(self.home), **(env or {})}

    @property
    def spec(self) -> str:
        return f"{self.user}@{self.address}:{self.port}"

    def _write_config(self) -> Path:
        config = self.dir / "sshd_config"
        trusted = f"TrustedUserCAKeys {self.dir}/user_ca.pub\n" if self.user_ca else ""
        config.write_text(trusted + f"""\
ListenAddress {self.address}:{self.port}
HostKey {self.dir}/ssh_host_ed25519_key
PidFile {self.dir}/sshd.pid
AuthorizedKeysFile {self.dir}/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
SetEnv {" ".join(f"{k}={v}" for k, v in self.env.items())}
LogLevel VERBOSE
MaxStartups 100:30:200
MaxSessions 100
""")
        return config

    def start(self, port: int | None = None, wait: bool = True) -> None:
        self.port = port or self.port or _free_port(self.address)
        config = self._write_config()
        self.proc = subprocess.Popen([SSHD, "-D", "-f", str(config), "-E", str(self.log)],
                                     stdin=subprocess.DEVNULL)
        if wait:
            self.wait_listening()

    def wait_listening(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"sshd {self.spec} exited: {self.log.read_text()}")
            try:
                with socket.create_connection((self.address, self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"sshd {self.spec} did not listen within {timeout}s")

    def processes(self) -> list[psutil.Process]:
        """sshd and everything below it: connections, agents, workers."""
        if self.proc is None:
            return []
        try:
            parent = psutil.Process(self.proc.pid)
            return [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def agent_processes(self) -> list[psutil.Process]:
        out = []
        for proc in self.processes():
            try:
                if "joblib_cloud.worker" in " ".join(proc.cmdline()):
                    out.append(proc)
            except psutil.Error:
                continue
        return out

    def signal_all(self, sig: int) -> list[int]:
        pids = []
        for proc in self.processes():
            try:
                proc.send_signal(sig)
                pids.append(proc.pid)
            except psutil.NoSuchProcess:
                pass
        return pids

    def kill(self) -> None:
        """The VM dies: sshd, its sessions, the agent and the workers, all at once."""
        procs = self.processes()
        for proc in procs:
            try:
                proc.send_signal(signal.SIGCONT)  # a stopped process would not die
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)
        if self.proc is not None:
            self.proc.wait(timeout=10)
        self.proc = None

    def accepted_logins(self) -> int:
        return self.log.read_text().count("Accepted publickey") if self.log.exists() else 0


class SSHFleet:
    def __init__(self, root: Path, n: int = 3, env: dict[str, str] | None = None) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.client_key = root / "client_key"
        client_pub = _keygen(self.client_key)
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
        self.hosts = [SSHHost(root, i, client_pub, env=env) for i in range(n)]
        self.known_hosts = root / "known_hosts"

    def start(self) -> SSHFleet:
        for host in self.hosts:
            host.start(wait=False)
        for host in self.hosts:
            host.wait_listening()
        self.write_known_hosts()
        return self

    def write_known_hosts(self) -> None:
        self.known_hosts.write_text("".join(
            f"[{h.address}]:{h.port} {h.host_key_pub}\n" for h in self.hosts))
        os.chmod(self.known_hosts, 0o600)

    def kwargs(self, hosts: list[SSHHost] | None = None, **extra) -> dict:
        """Backend settings that reach these hosts exactly as real SSH hosts."""
        return {"provider": "ssh", "hosts": [h.spec for h in (hosts or self.hosts)],
                "ssh_key": str(self.client_key), "known_hosts": str(self.known_hosts),
                "python": sys.executable, **extra}

    def stop(self) -> None:
        for host in self.hosts:
            host.kill()
