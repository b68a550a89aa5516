"""Clients on macOS and Windows: nothing on the client's path may need a Linux-only piece
unguarded.  They cannot run here, so the client runs in a Python that lacks those pieces:
no ``fcntl``, ``termios``, ``pty`` or ``resource``, no ``socket.TCP_INFO``, no ``os.fork``
or ``sched_getaffinity``, no ``/proc``, and ``sys.platform`` saying ``darwin``; the hosts
are the loopback sshd fleet (Linux, as cloud machines are)."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

import pytest
from hostenv import python_with_sitecustomize

pytestmark = pytest.mark.compat

NOT_LINUX = """
import builtins, io, os, socket, sys
for name in ("fcntl", "termios", "pty", "resource"):
    sys.modules[name] = None
for module, attr in ((socket, "TCP_INFO"), (os, "fork"), (os, "forkpty"),
                     (os, "sched_getaffinity")):
    if hasattr(module, attr):
        delattr(module, attr)

def _refuse_proc(function):
    def guarded(path, *args, **kwargs):
        if str(os.fspath(path) if not isinstance(path, int) else "").startswith("/proc"):
            raise FileNotFoundError(2, "no /proc on this system", str(path))
        return function(path, *args, **kwargs)
    return guarded

builtins.open = io.open = _refuse_proc(io.open)
os.open, os.listdir, os.scandir, os.stat = (_refuse_proc(f) for f in
                                            (os.open, os.listdir, os.scandir, os.stat))
import importlib, sysconfig
sysconfig.get_paths()  # its build-time variables are named after the real platform
# Standard modules that pick a platform's native helper at import (macOS's _scproxy...)
# are loaded first as they are: the stand-in is for our code's branches, not the stdlib's.
for name in ("urllib.request", "platform", "uuid", "mimetypes", "ssl", "getpass",
             "multiprocessing", "concurrent.futures", "selectors", "ctypes.util"):
    importlib.import_module(name)
sys.platform = "darwin"
"""

CLIENT = """
import json, os, sys
from joblib import Parallel, delayed, parallel_backend
import joblib_cloud
from joblib_cloud import DistributedPool

settings = json.loads(sys.argv[1])
big = os.urandom(3 * 2**20)  # cached on each host: the upload path and the link's rate
with parallel_backend("cloud", **settings):
    sizes = Parallel()(delayed(len)(big) for _ in range(6))
    squares = Parallel(batch_size=4)(delayed(pow)(i, 2) for i in range(40))
with DistributedPool(**settings) as pool:
    pooled = pool.map(abs, range(-4, 4))
print(json.dumps({"sizes": sizes, "squares": squares, "pooled": pooled,
                  "platform": sys.platform, "fcntl": "fcntl" in sys.modules
                  and sys.modules["fcntl"] is not None}))
"""


def test_the_ssh_path_runs_on_a_client_without_linux_only_pieces(fleet, tmp_path,
                                                                  record_property):
    record_property("provider", "ssh")
    record_property("host", "client without Linux-only pieces (macOS/Windows stand-in)")
    python = python_with_sitecustomize(tmp_path, "python-not-linux", NOT_LINUX)
    settings = fleet.kwargs(workers_per_host=2, cluster="not-linux")
    env = {**os.environ, "JOBLIB_CLOUD_HOME": str(tmp_path / "home")}
    done = subprocess.run([str(python), "-c", textwrap.dedent(CLIENT), json.dumps(settings)],
                          capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result == {"sizes": [3 * 2**20] * 6, "squares": [i * i for i in range(40)],
                      "pooled": [abs(i) for i in range(-4, 4)], "platform": "darwin",
                      "fcntl": False}
    status = subprocess.run(
        [str(python), "-m", "joblib_cloud", "status"], capture_output=True, text=True,
        timeout=120, env={**env, "JOBLIB_CLOUD_PROVIDER": "ssh",
                          "JOBLIB_CLOUD_HOSTS": ",".join(settings["hosts"]),
                          "JOBLIB_CLOUD_SSH_KEY": settings["ssh_key"],
                          "JOBLIB_CLOUD_KNOWN_HOSTS": settings["known_hosts"]})
    assert status.returncode == 0, status.stderr
    assert all(h.split("@")[1] in status.stdout for h in settings["hosts"]), status.stdout
