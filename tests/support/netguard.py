"""The network rule, enforced in every process of the test-suite that runs code under test:
sockets reach only loopback, or networks a test assigned to its own namespaces
(``allow``).  Anything else raises :class:`NonLoopbackConnection` and is recorded in
:data:`violations`."""

from __future__ import annotations

import ipaddress
import socket

violations: list[str] = []
_allowed: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []


class NonLoopbackConnection(OSError):
    pass


def allow(network: str) -> None:
    """Also allow ``network``: addresses the test itself assigned inside network
    namespaces it created (``slowlink.py``)."""
    _allowed.append(ipaddress.ip_network(network))


def allowed(host: object) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        address = ipaddress.ip_address(str(host).split("%")[0])
    except ValueError:
        return False
    return address.is_loopback or any(address in net for net in _allowed)


def _guard(address: object, what: str) -> None:
    if isinstance(address, tuple) and address and not allowed(address[0]):
        violations.append(f"{what} {address!r}")
        raise NonLoopbackConnection(
            f"test code tried to reach {address!r}: only loopback is allowed here")


_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex
_real_sendto = socket.socket.sendto
_real_getaddrinfo = socket.getaddrinfo


def _connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _guard(address, "connect")
    return _real_connect(self, address)


def _connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _guard(address, "connect_ex")
    return _real_connect_ex(self, address)


def _sendto(self, data, *args):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _guard(args[-1], "sendto")
    return _real_sendto(self, data, *args)


def _getaddrinfo(host, *args, **kwargs):
    if host is not None and not allowed(host):
        violations.append(f"getaddrinfo {host!r}")
        raise socket.gaierror(f"test code tried to resolve {host!r}: only loopback is allowed")
    return _real_getaddrinfo(host, *args, **kwargs)


def install() -> None:
    socket.socket.connect = _connect
    socket.socket.connect_ex = _connect_ex
    socket.socket.sendto = _sendto
    socket.getaddrinfo = _getaddrinfo
