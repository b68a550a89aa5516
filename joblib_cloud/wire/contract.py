"""Names that the client, the agent, the job helper and the kill switch must agree on.

The kill switch (``host/watchdog.py``) and the job helper (``host/jobhost.py``) are sent
to hosts as source and run without this package, so they keep their own copies of what
they need; ``tests/test_architecture.py`` checks that those copies match these.  A rename
here that they missed would silently break idle detection on every VM.
"""

from __future__ import annotations

import os

#: Environment variable naming joblib-cloud's state directory, client and host alike.
HOME_ENV = "JOBLIB_CLOUD_HOME"
#: The state directory when ``HOME_ENV`` is unset.
HOME_DEFAULT = "~/.joblib-cloud"
#: In the state directory: touched by agents and jobs while they work; its mtime is the
#: kill switch's "work ran" (a client merely attached does not touch it).
ACTIVITY_FILE = "activity"
#: In the state directory: touched by agents while a client is attached; its mtime is
#: the kill switch's "a client was here" (its no_client_timeout counts from then).
ATTACHED_FILE = "attached"
#: The module the agent runs: the kill switch finds agent processes by it.
AGENT_MODULE = "joblib_cloud.worker"
#: Code shipped before a byte stream (the agent's zip, a job's files) is preceded by its
#: length: this many bytes, big-endian.
LENGTH_PREFIX = 8
#: ``$H`` for shell commands: the state directory, as a double-quoted shell expression.
HOME_SHELL = f'"${{{HOME_ENV}:-$HOME/{HOME_DEFAULT[2:]}}}"'

#: In the state directory, while the boot installs the heavy packages after the agent may
#: start (providers/aws/boot_packages.py writes it, host/background.py reads it): JSON
#: ``{"state": "installing" | "installed" | "failed", "distributions": [names],
#: "modules": [top-level modules they provide] | null (unknown: any), "log": path}``,
#: exclusively ``flock``-ed by the installing process for as long as it runs (the OpenMP
#: runtime after the packages too), and removed when all went well.
INSTALLING_FILE = "installing"


def home() -> str:
    """The state directory, as the environment says (not created)."""
    return os.environ.get(HOME_ENV) or os.path.expanduser(HOME_DEFAULT)


def length_prefix(blob: bytes) -> bytes:
    return len(blob).to_bytes(LENGTH_PREFIX, "big")

