"""``run --port REMOTE[:LOCAL]`` and ``joblib-cloud forward JOB PORT``: a port of the
job's machine at ``http://127.0.0.1:LOCAL/`` on this computer.

On ``ssh`` and ``aws`` each connection to the local port is a ``direct-tcpip`` channel of
the job's own verified SSH connection to ``127.0.0.1:REMOTE`` on the machine, so nothing
is opened to the internet.  On ``local`` the port is on this computer already: the URL
is the port itself, or a plain relay when LOCAL differs.  The URL is printed once
something listens there (the job may take a while to start its server).
"""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import paramiko

from ..client.ssh import SSHConnection
from ..errors import ConfigError

#: Seconds between checks that something listens on the remote port.
POLL = 0.25


@dataclasses.dataclass(frozen=True)
class PortSpec:
    remote: int
    local: int


def parse_port(text: str) -> PortSpec:
    """``8888`` or ``8888:9999`` (remote, local)."""
    try:
        parts = [int(p) for p in text.split(":")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or not all(0 < p < 65536 for p in parts):
        raise ConfigError(f"--port {text!r}: expected REMOTE or REMOTE:LOCAL port numbers "
                         "(1-65535), e.g. --port 8888 or --port 8888:9999")
    return PortSpec(parts[0], parts[-1])


Opener = Callable[[], Any]  # a connected socket-like object, or raises


def _opener(connection: SSHConnection | None, remote: int) -> Opener:
    if connection is None:
        return lambda: socket.create_connection(("127.0.0.1", remote), timeout=5)

    def open_channel() -> paramiko.Channel:
        return connection.transport.open_channel(
            "direct-tcpip", ("127.0.0.1", remote), ("127.0.0.1", 0), timeout=10)

    return open_channel


def _pipe(src: Any, dst: Any) -> None:
    try:
        while data := src.recv(1 << 16):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for end in (dst, src):
            try:
                end.shutdown(socket.SHUT_WR)
            except OSError:
                pass


class Forward:
    """One forwarded port, served by daemon threads until :meth:`close`."""

    def __init__(self, connection: SSHConnection | None, spec: PortSpec,
                 announce: Callable[[str], None]) -> None:
        self.spec = spec
        self.url = f"http://127.0.0.1:{spec.local}/"
        self._open = _opener(connection, spec.remote)
        self._closed = threading.Event()
        self._server: socket.socket | None = None
        if connection is not None or spec.local != spec.remote:
            self._server = socket.socket()
            self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                self._server.bind(("127.0.0.1", spec.local))
            except OSError as exc:
                self._server.close()
                raise ConfigError(f"cannot forward to local port {spec.local}: {exc}. "
                                 f"Pick another one: --port {spec.remote}:OTHER") from None
            self._server.listen(16)
            threading.Thread(target=self._serve, daemon=True).start()
        threading.Thread(target=self._wait_listening, args=(announce,), daemon=True).start()

    def _wait_listening(self, announce: Callable[[str], None]) -> None:
        while not self._closed.is_set():
            try:
                self._open().close()
            except (OSError, paramiko.SSHException):
                self._closed.wait(POLL)
                continue
            if not self._closed.is_set():
                announce(self.url)
            return

    def _serve(self) -> None:
        assert self._server is not None
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        try:
            remote = self._open()
        except (OSError, paramiko.SSHException):
            client.close()
            return
        back = threading.Thread(target=_pipe, args=(remote, client), daemon=True)
        back.start()
        _pipe(client, remote)
        back.join()
        client.close()
        remote.close()

    def close(self) -> None:
        self._closed.set()
        if self._server is not None:
            self._server.close()


def forward_all(connection: SSHConnection | None, specs: list[PortSpec],
                announce: Callable[[str], None]) -> list[Forward]:
    forwards: list[Forward] = []
    try:
        for spec in specs:
            forwards.append(Forward(connection, spec, announce))
    except BaseException:
        for forward in forwards:
            forward.close()
        raise
    return forwards


def hold(forwards: list[Forward], alive: Callable[[], bool]) -> None:
    """Serve until Ctrl-C, or until ``alive()`` says the job (or connection) is gone."""
    try:
        while alive():
            time.sleep(1.0)
    finally:
        for forward in forwards:
            forward.close()
