"""A client on a slow link: its own network namespace, joined by a veth pair to a far side
where the hosts and the object store run at full speed; the client's side of the pair is
shaped with ``tc`` (``tbf``), as a laptop's uplink is.

Both namespaces and their addresses (:data:`SUBNET`, the benchmarking range of RFC 2544)
are this fixture's own; nothing else is ever a target.  What crosses the client's link is
read from the veth's own counters (``tx_bytes``).

- :class:`SlowLink`: the namespaces, the link, processes started in either side;
- :class:`FarHost`: an sshd host on the far side (the loopback fleet's, moved);
- :func:`far_ec2_hook`: address hook mapping moto's instances onto far hosts started with
  the keys from their user-data, as the ``loopback_ec2`` fixture does on loopback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from sshfleet import SSHHost

SUBNET = "198.18.0.0/30"
CLIENT_ADDRESS = "198.18.0.1"
FAR_ADDRESS = "198.18.0.2"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class SlowLink:
    def __init__(self, rate: str = "100mbit") -> None:
        tag = f"{os.getpid()}"
        self.client_ns = f"jlc-client-{tag}"
        self.far_ns = f"jlc-far-{tag}"
        self.rate = rate
        self.procs: list[subprocess.Popen] = []

    @classmethod
    def existing(cls, client_ns: str, far_ns: str) -> SlowLink:
        """A link another process made (the client program's view of it)."""
        link = cls()
        link.client_ns, link.far_ns = client_ns, far_ns
        return link

    def start(self) -> SlowLink:
        client, far = self.client_ns, self.far_ns
        _ip("netns", "add", client)
        _ip("netns", "add", far)
        _ip("link", "add", "jlc-c", "netns", client, "type", "veth", "peer", "name", "jlc-f",
            "netns", far)
        for ns, dev, address in ((client, "jlc-c", CLIENT_ADDRESS), (far, "jlc-f", FAR_ADDRESS)):
            _ip("-n", ns, "addr", "add", f"{address}/30", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        # The client's uplink: what it sends waits in a token bucket at ``rate``.
        subprocess.run(["ip", "netns", "exec", client, "tc", "qdisc", "add", "dev", "jlc-c",
                        "root", "tbf", "rate", self.rate, "burst", "64kb", "latency",
                        "200ms"], check=True, capture_output=True)
        return self

    def sent_bytes(self) -> int:
        """Bytes the client has sent over its link so far."""
        return self._counter("tx_bytes")

    def sent_packets(self) -> int:
        return self._counter("tx_packets")

    def _counter(self, name: str) -> int:
        out = subprocess.run(["ip", "netns", "exec", self.client_ns, "cat",
                              f"/sys/class/net/jlc-c/statistics/{name}"],
                             check=True, capture_output=True, text=True).stdout
        return int(out)

    def far(self, argv: list[str], **kwargs: Any) -> subprocess.Popen:
        return self._start(self.far_ns, argv, **kwargs)

    def client(self, argv: list[str], **kwargs: Any) -> subprocess.Popen:
        return self._start(self.client_ns, argv, **kwargs)

    def _start(self, ns: str, argv: list[str], **kwargs: Any) -> subprocess.Popen:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kwargs)
        self.procs.append(proc)
        return proc

    def wait_port(self, port: int, timeout: float = 30.0) -> None:
        """Until something on the far side listens on ``port`` (checked from there)."""
        probe = ("import socket, sys\ntry:\n"
                 f"    socket.create_connection(({FAR_ADDRESS!r}, {port}), 0.5).close()\n"
                 "except OSError:\n    sys.exit(1)")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if subprocess.run(["ip", "netns", "exec", self.far_ns, sys.executable, "-c",
                               probe]).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"nothing listens on {FAR_ADDRESS}:{port} after {timeout}s")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        for ns in (self.client_ns, self.far_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


class FarHost(SSHHost):
    """An sshd host on the far side of a :class:`SlowLink`."""

    def __init__(self, link: SlowLink, root: Path, index: int, client_pub: str,
                 host_key: tuple[str, str] | None = None, user_ca: str | None = None) -> None:
        super().__init__(root, index, client_pub, host_key, user_ca)
        self.link = link
        self.address = FAR_ADDRESS
        self.port = 22000 + index

    def start(self, port: int | None = None, wait: bool = True) -> None:
        config = self._write_config()
        self.proc = self.link.far(["/usr/sbin/sshd", "-D", "-f", str(config), "-E",
                                   str(self.log)], stdin=subprocess.DEVNULL)
        if wait:
            self.link.wait_port(self.port)


class LateFarHost(FarHost):
    """A far host whose sshd starts ``delay`` seconds after it is asked to: a machine
    still booting, which refuses connections until then (the client keeps trying)."""

    def __init__(self, *args: Any, delay: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.delay = delay
        self._cancelled = threading.Event()

    def start(self, port: int | None = None, wait: bool = True) -> None:
        if not self.delay:
            super().start(port, wait)
            return

        def boot() -> None:
            if not self._cancelled.wait(self.delay):
                FarHost.start(self, wait=False)

        threading.Thread(target=boot, daemon=True, name=f"late-host-{self.index}").start()

    def kill(self) -> None:
        self._cancelled.set()
        super().kill()


def far_ec2_hook(link: SlowLink, ec2: Any, root: Path, stagger: float = 0.0) -> Any:
    """Address hook: each launched instance becomes a far host with the host key and client
    key its stored user-data carries; the ``i``-th one's sshd starts ``i * stagger``
    seconds after the launch (machines that come up apart, as on EC2)."""
    from awsmock import sshd_per_instance

    return sshd_per_instance(ec2, lambda index, *args, **kw: LateFarHost(
        link, root, index, *args, delay=index * stagger, **kw))


S3_PORT = 5123


def start_object_store(link: SlowLink) -> str:
    """moto's server on the far side; its endpoint URL."""
    link.far([sys.executable, "-m", "moto.server", "-H", FAR_ADDRESS, "-p", str(S3_PORT)],
             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    link.wait_port(S3_PORT)
    return f"http://{FAR_ADDRESS}:{S3_PORT}"


def run_client(link: SlowLink, endpoint: str, **options: Any) -> dict[str, Any]:
    """One run of ``slowlink_client.py`` in the client's namespace; what it measured."""
    argv = [sys.executable, str(Path(__file__).with_name("slowlink_client.py")),
            "--client-ns", link.client_ns, "--far-ns", link.far_ns]
    for name, value in options.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    env = {**os.environ, "AWS_ENDPOINT_URL_S3": endpoint, "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    proc = link.client(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True)
    out, err = proc.communicate(timeout=900)
    if proc.returncode:
        raise RuntimeError(f"the slow-link client failed ({proc.returncode}):\n{err[-4000:]}")
    return json.loads(out.strip().splitlines()[-1])
