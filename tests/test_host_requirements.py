"""A host needs Python with joblib and cloudpickle, and nothing of the client side."""

from __future__ import annotations

import sys

from hostenv import python_with_sitecustomize
from joblib import Parallel, delayed, parallel_backend

#: What a host may lack: the client's SSH/AWS packages, and standalone loky (joblib
#: carries its own copy for the nested Parallel calls of tasks).
CLIENT_ONLY = ("paramiko", "psutil", "boto3", "botocore", "moto", "loky")


def _imported_client_modules(_):
    return sorted(m for m in CLIENT_ONLY if sys.modules.get(m) is not None)


def test_agent_and_workers_run_without_client_only_packages(tmp_path):
    # A "host" whose Python cannot import the client's SSH/AWS packages at all.
    wrapper = python_with_sitecustomize(
        tmp_path, "python-without-client-packages",
        "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in CLIENT_ONLY))
    kwargs = {"provider": "local", "n": 1, "workers_per_host": 2, "python": str(wrapper),
              "cluster": "no-client-packages"}
    with parallel_backend("cloud", **kwargs):
        assert Parallel()(delayed(_imported_client_modules)(i) for i in range(4)) == [[]] * 4
