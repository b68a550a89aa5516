"""Waiting for a host that accepts TCP but not yet SSH (a VM booting behind a NAT or a
proxy) prints nothing: paramiko's per-attempt errors are debug records; what ends the wait
is one clear error."""

from __future__ import annotations

import logging
import socket
import threading

import pytest

from joblib_cloud.client.hosts import HostSpec
from joblib_cloud.client.ssh import SSHConnection
from joblib_cloud.errors import HostConnectError


@pytest.fixture
def no_banner():
    """A loopback port that accepts connections and closes them at once."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)  # the loop sees ``stop`` without waiting for a connection
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    server.close()
    thread.join(5)


def test_retries_while_a_host_boots_are_debug_records_not_tracebacks(no_banner, capfd,
                                                                      caplog):
    spec = HostSpec(address="127.0.0.1", port=no_banner, user="nobody")
    with caplog.at_level(logging.INFO), pytest.raises(HostConnectError) as caught:
        SSHConnection(spec, key_path=None, known_hosts="/dev/null", connect_timeout=3)
    assert "Error reading SSH protocol banner" in str(caught.value)
    assert "raise connect_timeout" in str(caught.value)
    err = capfd.readouterr().err
    assert "Exception (client)" not in err and "Traceback" not in err, err
    assert not [r for r in caplog.records if r.levelno >= logging.INFO]

    with caplog.at_level(logging.DEBUG), pytest.raises(HostConnectError):
        SSHConnection(spec, key_path=None, known_hosts="/dev/null", connect_timeout=2)
    banner = [r for r in caplog.records if "Error reading SSH protocol banner" in r.getMessage()
              and r.name == "joblib_cloud.ssh.connecting"]
    assert banner and all(r.levelno == logging.DEBUG for r in banner)
    assert "Exception (client)" not in capfd.readouterr().err
