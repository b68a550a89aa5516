"""SSH byte streams to host agents: a channel of one verified SSH connection.

Mirrors paramiko's own split: :class:`SSHConnection` is one verified, authenticated
``Transport`` per host, kept for the cluster's lifetime; each agent, job or upload is a
``Channel`` over it.  The agent's code and the ``local`` provider's pipes live in
``agent_stream.py``, which imports no paramiko (the ``local`` provider runs on hosts).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import shlex
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import paramiko

from ..errors import HostConnectError, HostKeyError
from . import paramiko_fast
from .hosts import HostSpec
from .streams import PID_LINE, AgentStream, agent_command

log = logging.getLogger("joblib_cloud")

#: Count of SSH connections opened by this process (tests assert reuse with it).
connections_opened = 0
_count_lock = threading.Lock()

#: Tuned by measurement (bench/ssh_throughput.py, docs/performance.md): AES-GCM is the
#: fastest cipher paramiko and OpenSSH share, for uploads (~500 vs ~440 MB/s for
#: aes128-ctr on loopback) and for latency (echo round trip ~95 vs ~120 µs: one AEAD call
#: per packet instead of cipher + HMAC).  Window and packet size are what *we* accept, so
#: they govern results (downloads); uploads use sshd's (2 MiB, 32 KiB).  No window/packet
#: combination measured was reliably faster than these; a large window keeps long-haul
#: links busy.
WINDOW_SIZE = 64 * 2**20
MAX_PACKET_SIZE = 2**15
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr",
                     "aes256-ctr")
#: Longest single connection attempt when a check runs between attempts.
CHECKED_ATTEMPT_TIMEOUT = 10.0

#: Where a transport logs until it is connected.  paramiko's transport thread logs each
#: failed attempt at ERROR with a traceback ("Error reading SSH protocol banner" while a
#: VM boots behind a NAT or a proxy): retries are part of waiting, so those records are
#: debug records here.  The error that ends the wait is raised, with the last reason.
CONNECTING_LOG = "joblib_cloud.ssh.connecting"


def _as_debug(record: logging.LogRecord) -> bool:
    record.levelno, record.levelname = logging.DEBUG, "DEBUG"
    return logging.getLogger(CONNECTING_LOG).isEnabledFor(logging.DEBUG)


logging.getLogger(CONNECTING_LOG).addFilter(_as_debug)


def fingerprint(key: paramiko.PKey) -> str:
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def load_private_key(path: str) -> paramiko.PKey:
    try:
        return paramiko.PKey.from_path(os.path.expanduser(path))
    except FileNotFoundError:
        raise HostConnectError(f"SSH key {path} does not exist: set ssh_key= (or "
                               "JOBLIB_CLOUD_SSH_KEY) to your private key file") from None
    except (paramiko.SSHException, ValueError) as exc:
        raise HostConnectError(f"cannot read SSH key {path}: {exc}") from None


def _default_keys() -> list[paramiko.PKey]:
    keys: list[paramiko.PKey] = list(paramiko.Agent().get_keys())
    for name in ("id_ed25519", "id_ecdsa", "id_rsa"):
        path = Path.home() / ".ssh" / name
        if path.exists():
            try:
                keys.append(paramiko.PKey.from_path(path))
            except Exception:  # encrypted or unsupported: ssh-agent may still have it
                continue
    return keys


class SSHConnection:
    """One verified, authenticated SSH connection to a host, reused for everything."""

    def __init__(self, spec: HostSpec, *, key_path: str | None, known_hosts: str | None,
                 connect_timeout: float, retry_auth: bool = False,
                 check: Callable[[bool, bool], None] | None = None,
                 timeout_advice: str | None = None) -> None:
        """``check(booting, out_of_time)`` runs between connection attempts and when
        ``connect_timeout`` runs out, and raises to stop waiting (a VM that stopped
        booting, or whose boot is stuck); ``booting``: the host refused our key, which a
        VM does until its boot authorised it.  ``timeout_advice`` replaces the generic
        advice given when ``connect_timeout`` runs out."""
        self.spec = spec
        self.key_path = key_path
        self.known_hosts = known_hosts or str(Path.home() / ".ssh" / "known_hosts")
        self.transport = self._connect_with_retry(connect_timeout, retry_auth, check,
                                                  timeout_advice)

    # -- connection -------------------------------------------------------------
    def _connect_with_retry(self, cap: float, retry_auth: bool,
                            check: Callable[[bool, bool], None] | None = None,
                            timeout_advice: str | None = None) -> paramiko.Transport:
        start = time.monotonic()
        delay, attempts = 0.25, 0
        last: Exception | None = None
        # With a check, shorter attempts: an address that swallows packets must not hide
        # a dead VM for long.
        longest = CHECKED_ATTEMPT_TIMEOUT if check is not None else 20.0
        while True:
            attempts += 1
            try:
                return self._connect_once(
                    max(min(cap - (time.monotonic() - start), longest), 2))
            except HostKeyError:
                raise
            except paramiko.AuthenticationException as exc:
                if not retry_auth:
                    raise HostConnectError(
                        f"host {self.spec.name} refused our SSH key "
                        f"({self.key_path or 'default keys and ssh-agent'}): {exc}. "
                        "Check the user name and that the key is in the host's "
                        "~/.ssh/authorized_keys.") from None
                last = exc  # during boot, cloud-init may not have installed the key yet
            except (OSError, EOFError, paramiko.SSHException) as exc:
                last = exc
            elapsed = time.monotonic() - start
            booting = isinstance(last, paramiko.AuthenticationException)
            if elapsed >= cap:
                if check is not None:
                    check(booting, True)
                raise HostConnectError(
                    f"host {self.spec.name} unreachable after {elapsed:.1f}s "
                    f"({attempts} attempts); last error: {type(last).__name__}: {last}. "
                    + (timeout_advice or f"Check that it is up and that port {self.spec.port} "
                       "is reachable, or raise connect_timeout.")) from None
            if check is not None:
                check(booting, False)
            log.debug("ssh %s not ready (%s); retrying in %.1fs", self.spec.name, last, delay)
            time.sleep(min(delay, cap - elapsed))
            delay = min(delay * 1.6, 5.0)

    def _connect_once(self, timeout: float) -> paramiko.Transport:
        global connections_opened
        sock = socket.create_connection((self.spec.address, self.spec.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport = paramiko.Transport(sock, default_window_size=WINDOW_SIZE,
                                       default_max_packet_size=MAX_PACKET_SIZE)
        with _count_lock:
            connections_opened += 1
        transport.set_log_channel(CONNECTING_LOG)
        try:
            options = transport.get_security_options()
            options.ciphers = tuple(c for c in PREFERRED_CIPHERS if c in options.ciphers) + \
                tuple(c for c in options.ciphers if c not in PREFERRED_CIPHERS)
            transport.banner_timeout = timeout
            transport.start_client(timeout=timeout)
            self._verify_host_key(transport.get_remote_server_key())
            self._authenticate(transport)
            transport.set_keepalive(15)
            sock.settimeout(None)
            transport.set_log_channel("paramiko.transport")  # from now on, failures matter
            return transport
        except BaseException:
            transport.close()
            raise

    def _verify_host_key(self, key: paramiko.PKey) -> None:
        name = self.spec.known_hosts_name
        known: list[paramiko.PKey] = []
        if self.spec.host_key:
            kind, b64 = self.spec.host_key.split()[:2]
            known.append(paramiko.PKey.from_type_string(kind, base64.b64decode(b64)))
        if os.path.exists(self.known_hosts):
            entries = paramiko.HostKeys(self.known_hosts).lookup(name)
            if entries:
                known.extend(entries.values())
        if any(k.get_name() == key.get_name() and k.asbytes() == key.asbytes() for k in known):
            return
        if known:
            expected = ", ".join(fingerprint(k) for k in known)
            raise HostKeyError(
                f"HOST KEY MISMATCH for {self.spec.name}: it presented {key.get_name()} "
                f"{fingerprint(key)}, but {self.known_hosts} expects {expected}. Someone may "
                "be intercepting the connection, or the host was re-created. If you trust "
                "the new key, remove the old entry with "
                f"`ssh-keygen -R '{name}' -f {self.known_hosts}` and add the new one.")
        raise HostKeyError(
            f"unknown host key for {self.spec.name}: {key.get_name()} {fingerprint(key)} is "
            f"not in {self.known_hosts}. Verify the fingerprint with the host's owner, then "
            f"add it, e.g. `ssh-keyscan -p {self.spec.port} {self.spec.address} >> "
            f"{self.known_hosts}` (joblib-cloud never accepts unknown keys automatically).")

    def _authenticate(self, transport: paramiko.Transport) -> None:
        keys = [load_private_key(self.key_path)] if self.key_path else _default_keys()
        if not keys:
            raise HostConnectError(
                f"no SSH key to log in to {self.spec.name}: set ssh_key= (or "
                "JOBLIB_CLOUD_SSH_KEY) to a private key file")
        last: Exception | None = None
        for key in keys:
            try:
                transport.auth_publickey(self.spec.user, key)
                return
            except paramiko.AuthenticationException as exc:
                last = exc
        raise last or paramiko.AuthenticationException("no key accepted")

    # -- channels ----------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.transport.is_active()

    def exec(self, command: str, env: dict[str, str] | None = None,
             fast: bool = False) -> paramiko.Channel:
        """A channel running ``command``; with ``fast``, its receive buffer is a
        :class:`paramiko_fast.DeliveringPipe` when this paramiko allows it."""
        channel = self.transport.open_session(window_size=WINDOW_SIZE,
                                              max_packet_size=MAX_PACKET_SIZE)
        if fast:
            paramiko_fast.install(channel)  # before anything can arrive
        if env:
            # sshd only accepts AcceptEnv'd variables, so pass them inline instead.
            command = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + command
        channel.exec_command(command)
        return channel

    def close(self) -> None:
        self.transport.close()


class SSHAgent(AgentStream):
    """An agent started over an :class:`SSHConnection` (one exec channel)."""

    def __init__(self, connection: SSHConnection, python: str,
                 on_stderr: Callable[[bytes], None]) -> None:
        self.name = connection.spec.name
        self.connection = connection
        #: The agent's process on the host, once its stderr's first line said it.
        self.pid: int | None = None
        self._head: bytes | None = b""  # stderr until that line has come
        self._on_stderr = on_stderr
        self.channel = connection.exec(agent_command(python, announce_pid=True), fast=True)
        self._pipe = paramiko_fast.pipe_of(self.channel)
        self._pump_stderr(self.channel.recv_stderr, self._stderr)

    def _stderr(self, data: bytes) -> None:
        if self._head is not None:
            self._head += data
            line, newline, data = self._head.partition(b"\n")
            if not newline:
                return
            self._head = None
            if line.startswith(PID_LINE) and line[len(PID_LINE):].isdigit():
                self.pid = int(line[len(PID_LINE):])
            else:
                data = line + newline + data
            if not data:
                return
        self._on_stderr(data)

    def sendall(self, data: bytes | memoryview) -> None:
        # paramiko slices what it sends: a memoryview goes out as bytes would, uncopied
        self.channel.sendall(cast(bytes, data))

    def recv(self, n: int) -> bytes:
        return self.channel.recv(n)

    def can_write_now(self, nbytes: int) -> bool:
        return (self.channel.out_window_size >= nbytes
                and paramiko_fast.clear_to_send(self.connection.transport))

    def has_unread(self) -> bool:
        """Bytes in the connection's socket that paramiko has not read yet (Linux, macOS;
        elsewhere: False)."""
        try:
            import fcntl
            import termios

            waiting = bytearray(4)
            fcntl.ioctl(self.connection.transport.sock.fileno(), termios.FIONREAD, waiting)
        except (ImportError, OSError, AttributeError, ValueError):
            return False
        return int.from_bytes(waiting, sys.byteorder) > 0

    def deliver(self, on_data: Callable[[bytes], None], on_close: Callable[[], None]) -> bool:
        pipe = self._pipe
        if pipe is None or not paramiko_fast.delivers(self.channel, pipe):
            return False
        channel, transport = self.channel, self.connection.transport

        def receive(data: bytes) -> None:
            on_data(data)
            paramiko_fast.grant_window(channel, transport, len(data))

        pipe.deliver_to(receive, on_close)
        return True

    def close(self) -> None:
        self.channel.close()

    def kill(self) -> None:
        self.close()
        if self.pid is None:
            return
        try:  # its process group: itself (a session leader stays in it) and its children
            killer = self.connection.exec(f"kill -KILL -- -{self.pid} 2>/dev/null")
            killer.settimeout(10)
            killer.recv_exit_status()
        except Exception:  # noqa: BLE001 - the host may be gone by now
            pass

