"""The cluster's shared directory, seen from this computer: ``joblib-cloud shared
ls|put|get|rm``.

Every job of a cluster sees it as ``$JOBLIB_CLOUD_SHARED``.  Unless the provider keeps it
elsewhere (:meth:`Provider.shared_directory`; aws: the prefix ``shared/<cluster>/`` of
joblib-cloud's bucket, mirrored on the job's machine), it is a directory on the cluster's
first host (``$JOBLIB_CLOUD_HOME/shared/<cluster>/``), where jobs run, so a job reads and
writes it in place; these commands reach it with the job helper's ``shared-*``
operations (``host/jobfiles.py``).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

from ..client.progress import Progress
from ..config import CloudConfig
from ..errors import ConfigError, JobError
from .outputs import unpack
from .targets import Target


def _target(config: CloudConfig) -> Target:
    from .control import open_target

    target, _, _ = open_target(config, Progress(config.verbose))
    return target


def _run(target: Target, args: list[str], stdin: bytes = b"") -> bytes:
    result = target.call(args, stdin=stdin)
    if result.code != 0:
        detail = result.stderr.decode(errors="replace").strip() or f"exit code {result.code}"
        raise JobError(detail.replace("joblib-cloud (on host): ", ""))
    return result.stdout


def pack_path(path: Path) -> bytes:
    """``path`` (a file, or a directory and what it holds) as a tar.gz under its name."""
    if not path.exists():
        raise ConfigError(f"{path} does not exist")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(path, arcname=path.resolve().name,
                filter=lambda info: None if info.issym() else info)
    return buffer.getvalue()


class HostShared:
    """The shared directory on the cluster's first host."""

    def __init__(self, config: CloudConfig) -> None:
        self.cluster = config.cluster
        self.target = _target(config)

    def ls(self, path: str = "") -> list[dict[str, Any]]:
        out = _run(self.target, ["shared-ls", self.cluster, path])
        return [json.loads(line) for line in out.decode().splitlines() if line.strip()]

    def put(self, local: Path, dest: str = "") -> None:
        _run(self.target, ["shared-put", self.cluster, dest], pack_path(local))

    def get(self, path: str, into: Path) -> list[str]:
        return unpack(_run(self.target, ["shared-get", self.cluster, path]), into)

    def rm(self, path: str) -> None:
        _run(self.target, ["shared-rm", self.cluster, path])

    def close(self) -> None:
        self.target.close()


def open_shared(config: CloudConfig) -> Any:
    """The cluster's shared directory: where its provider keeps it, else the first host's."""
    from ..provisioner import provider

    return provider(config.provider).shared_directory(config) or HostShared(config)
