"""The command line as a user runs it, against ``local`` or one host of the loopback sshd
fleet: the ``target`` fixture and helpers the ``run`` tests share."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

#: A job whose own backend spreads tasks over two machines and says where they ran.  Each
#: task waits until tasks ran on two different hosts (one worker per host), so the job
#: can only finish if its backend really uses both machines.
SPREAD_JOB = """
import json, os, sys, time
from joblib import Parallel, delayed, parallel_backend
import joblib_cloud  # noqa: F401  (registers the backend)

def where(i, marks):
    home = os.environ["JOBLIB_CLOUD_HOME"]  # each test host's sshd sets its own
    open(os.path.join(marks, home.replace("/", "_")), "w").close()
    deadline = time.monotonic() + 60
    while len(os.listdir(marks)) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    return home

with parallel_backend("cloud"):
    homes = Parallel(n_jobs=2, batch_size=1)(delayed(where)(i, sys.argv[1]) for i in range(4))
    import joblib
    n = joblib.effective_n_jobs(-1)
print(json.dumps({"homes": sorted(set(homes)), "n_jobs": n,
                  "provider": os.environ["JOBLIB_CLOUD_PROVIDER"],
                  "key": os.environ.get("JOBLIB_CLOUD_SSH_KEY")}))
"""


@pytest.fixture(params=["local", "ssh"])
def target(request, fleet, tmp_path) -> dict:
    """Environment for the CLI, and where the host keeps its job directories."""
    client_home = tmp_path / "client-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBLIB_CLOUD_")}
    env["JOBLIB_CLOUD_HOME"] = str(client_home)
    if request.param == "local":
        env["JOBLIB_CLOUD_PROVIDER"] = "local"
        host_jobs = client_home / "jobs"
    else:
        settings = fleet.kwargs(hosts=fleet.hosts[1:2])
        env.update({"JOBLIB_CLOUD_PROVIDER": "ssh",
                    "JOBLIB_CLOUD_HOSTS": ",".join(settings["hosts"]),
                    "JOBLIB_CLOUD_SSH_KEY": settings["ssh_key"],
                    "JOBLIB_CLOUD_KNOWN_HOSTS": settings["known_hosts"],
                    "JOBLIB_CLOUD_PYTHON": settings["python"]})
        host_jobs = fleet.hosts[1].home / "jobs"
    return {"env": env, "host_jobs": host_jobs, "provider": request.param}


def cli(target: dict, cwd: Path, *args: str, timeout: float = 120
        ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "joblib_cloud", *args], cwd=cwd,
                          env=target["env"], capture_output=True, text=True, timeout=timeout)


def wait_for(condition: Callable[[], Any], timeout: float = 30, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
