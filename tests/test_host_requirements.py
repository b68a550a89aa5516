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
    from joblib_cloud import DistributedPool

    with DistributedPool(**kwargs, initializer=_imported_client_modules, initargs=(0,)) as pool:
        assert pool.map(_imported_client_modules, range(4)) == [[]] * 4
        assert pool.apply_async(_imported_client_modules, (0,)).get() == []


def _urllib3_importable() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("urllib3") is not None
    except (ImportError, ValueError):
        return False


def test_warning_filters_naming_client_only_modules_do_not_reach_the_host(tmp_path):
    """scikit-learn ships the caller's ``warnings.filters`` with every task; once boto3 is
    loaded they name urllib3's warning classes, which a real host need not have."""
    import warnings

    import botocore.exceptions  # noqa: F401  (loads urllib3 and its warning filters)
    import numpy as np
    from sklearn.datasets import make_classification
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV

    wrapper = python_with_sitecustomize(
        tmp_path, "python-without-urllib3",
        "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n"
                                 for m in ("urllib3", "botocore", "boto3")))
    import urllib3.exceptions

    X, y = make_classification(n_samples=120, n_features=6, random_state=0)
    grid = {"C": [0.1, 1.0, 10.0]}
    sequential = GridSearchCV(LogisticRegression(), grid, cv=3, n_jobs=1).fit(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
        with parallel_backend("cloud", provider="local", n=1, workers_per_host=2,
                              python=str(wrapper), cluster="no-urllib3"):
            remote = GridSearchCV(LogisticRegression(), grid, cv=3, n_jobs=-1).fit(X, y)
            # The host really lacks urllib3, and the filter still applies on the client.
            assert Parallel()(delayed(_urllib3_importable)() for _ in range(2)) == [False] * 2
    np.testing.assert_allclose(remote.cv_results_["mean_test_score"],
                               sequential.cv_results_["mean_test_score"])


def test_local_provider_runs_where_only_joblib_and_cloudpickle_are(tmp_path):
    """Inside a ``joblib-cloud run`` job, ``parallel_backend('cloud')`` means the host's
    own cores: the local provider must not need the client's SSH or AWS packages."""
    import subprocess

    wrapper = python_with_sitecustomize(
        tmp_path, "python-on-a-host",
        "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in CLIENT_ONLY))
    code = ("from joblib import Parallel, delayed, parallel_backend\n"
            "import joblib_cloud\n"
            "with parallel_backend('cloud', provider='local', n=1, workers_per_host=2):\n"
            "    print(Parallel()(delayed(pow)(i, 2) for i in range(5)))\n")
    result = subprocess.run([str(wrapper), "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str([i * i for i in range(5)])
