"""AWS EC2 provisioning (the ``aws`` provider). Being built: see issue 3."""

from __future__ import annotations

from typing import Any


def ensure_cluster(config: Any, progress: Any) -> Any:
    raise NotImplementedError("the aws provider is not built yet; use provider='local' or 'ssh'")
