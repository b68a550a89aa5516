"""Host addresses: ``user@addr:port`` strings and the spec the transports connect to."""

from __future__ import annotations

import dataclasses
import getpass
import re

_HOST_RE = re.compile(
    r"^(?:(?P<user>[A-Za-z0-9._-]+)@)?"
    r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<addr>[A-Za-z0-9._-]+))"
    r"(?::(?P<port>\d{1,5}))?$"
)


@dataclasses.dataclass(frozen=True)
class HostSpec:
    """Where one host's agent runs.  ``address`` is what we connect to."""

    address: str
    port: int = 22
    user: str = dataclasses.field(default_factory=getpass.getuser)
    #: Human-readable name used in messages and output prefixes.
    label: str = ""
    #: Expected host public key line ("ssh-ed25519 AAAA..."), when known in advance (EC2).
    host_key: str | None = None

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        addr = f"[{self.address}]" if ":" in self.address else self.address
        return f"{self.user}@{addr}:{self.port}"

    @property
    def known_hosts_name(self) -> str:
        """The name OpenSSH writes into known_hosts for this address and port."""
        if self.port == 22:
            return self.address
        return f"[{self.address}]:{self.port}"


def parse_host(text: str) -> HostSpec:
    """Parse ``user@addr:port`` (user and port optional; IPv6 as ``[::1]:22``)."""
    match = _HOST_RE.match(text.strip())
    if not match:
        raise ValueError(
            f"malformed host {text!r}: expected 'user@address:port', e.g. "
            "'ubuntu@10.0.0.5:22' or 'me@[::1]:2222'"
        )
    port = int(match.group("port") or 22)
    if not 0 < port < 65536:
        raise ValueError(f"malformed host {text!r}: port {port} is out of range 1-65535")
    address = match.group("v6") or match.group("addr")
    user = match.group("user") or getpass.getuser()
    return HostSpec(address=address, port=port, user=user)
