"""Local state of ``aws`` clusters: the cluster's SSH key and each host's public key.

The cloud is the source of truth for *what exists* (found by tag); this directory only
holds what the cloud must not: the client's private key, and the host keys we generated,
needed to verify hosts when a later program re-attaches.  Layout::

    $JOBLIB_CLOUD_HOME/aws/<region>/<cluster>/id_ed25519       (0600)
                                             /hosts.json       instance id -> host key
                                             /known_hosts      rewritten on every attach
"""

from __future__ import annotations

import base64
import json
import secrets
import shutil
import struct
import time
from pathlib import Path

from ...config import home_dir, write_private


def generate_ed25519() -> tuple[str, str]:
    """A fresh key pair: (OpenSSH private key text, ``ssh-ed25519 AAAA...`` line)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    return private, public


def _string(data: bytes | str) -> bytes:
    data = data.encode() if isinstance(data, str) else data
    return struct.pack(">I", len(data)) + data


def user_certificate(ca_private: str, public: str, principal: str, key_id: str,
                     seconds: float) -> str:
    """An OpenSSH user certificate (``...-cert.pub`` line) for the key ``public``, signed
    with ``ca_private`` (the cluster's key, which the machines' sshd trusts as a user CA:
    ``TrustedUserCAKeys``), for ``principal`` only, valid from a minute ago for
    ``seconds``, with no extensions (no pty, no forwarding: commands only)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    ca = serialization.load_ssh_private_key(ca_private.encode(), password=None)
    assert isinstance(ca, Ed25519PrivateKey)
    kind = "ssh-ed25519-cert-v01@openssh.com"
    key_blob = base64.b64decode(public.split()[1])
    pk = key_blob[4 + 11 + 4:]  # string "ssh-ed25519", then string pk
    ca_pk = ca.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)
    now = int(time.time())
    body = (_string(kind) + _string(secrets.token_bytes(32)) + _string(pk)
            + struct.pack(">QI", 0, 1) + _string(key_id) + _string(_string(principal))
            + struct.pack(">QQ", now - 60, now + int(seconds)) + _string(b"")
            + _string(b"") + _string(b"") + _string(_string("ssh-ed25519") + _string(ca_pk)))
    signature = _string(_string("ssh-ed25519") + _string(ca.sign(body)))
    return f"{kind} {base64.b64encode(body + signature).decode()} {key_id}"


def aws_root() -> Path:
    return home_dir() / "aws"


def cluster_dir(region: str, cluster: str) -> Path:
    return aws_root() / region / cluster


def client_key(region: str, cluster: str) -> tuple[Path, str]:
    """The cluster's client key (created on first use): (private key path, public line)."""
    path = cluster_dir(region, cluster) / "id_ed25519"
    pub = path.with_name("id_ed25519.pub")
    if not (path.exists() and pub.exists()):
        private, public = generate_ed25519()
        write_private(path, private)
        write_private(pub, public + "\n")
    return path, pub.read_text().strip()


def host_keys(region: str, cluster: str) -> dict[str, str]:
    path = cluster_dir(region, cluster) / "hosts.json"
    return json.loads(path.read_text()) if path.exists() else {}


def save_host_key(region: str, cluster: str, instance_id: str, public_key: str) -> None:
    keys = host_keys(region, cluster)
    keys[instance_id] = public_key
    write_private(cluster_dir(region, cluster) / "hosts.json", json.dumps(keys, indent=1))


def write_known_hosts(region: str, cluster: str, entries: list[tuple[str, str]]) -> Path:
    """(known_hosts name, public key line) pairs -> the cluster's own known_hosts file."""
    path = cluster_dir(region, cluster) / "known_hosts"
    write_private(path, "".join(f"{name} {key}\n" for name, key in entries))
    return path


def exists(region: str, cluster: str) -> bool:
    return cluster_dir(region, cluster).exists()


def remove(region: str, cluster: str) -> bool:
    """Delete the cluster's local keys and records; True if there was something."""
    path = cluster_dir(region, cluster)
    if not path.exists():
        return False
    shutil.rmtree(path)
    return True


def local_clusters(region: str) -> list[str]:
    root = aws_root() / region
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.exists() else []
