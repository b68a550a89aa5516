"""Local state of ``aws`` clusters: the cluster's SSH key and each host's public key.

The cloud is the source of truth for *what exists* (found by tag); this directory only
holds what the cloud must not: the client's private key, and the host keys we generated,
needed to verify hosts when a later program re-attaches.  Layout::

    $JOBLIB_CLOUD_HOME/aws/<region>/<cluster>/id_ed25519       (0600)
                                             /hosts.json       instance id -> host key
                                             /known_hosts      rewritten on every attach
"""

from __future__ import annotations

import json
import shutil
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
