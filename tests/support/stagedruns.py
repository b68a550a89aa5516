"""Fits on an aws fleet of loopback hosts that stage their large argument in moto's S3:
the settings, the ``X`` fixture (10 MB) and the expected results, which the staging and
the bucket-security tests share."""

from __future__ import annotations

import getpass
import sys
from typing import Any

import numpy as np
import pytest
from awsmock import CIDR, REGION
from joblib import Parallel, delayed, parallel_backend

from joblib_cloud.client import registry
from joblib_cloud.client.cluster import Cluster
from joblib_cloud.config import resolve_config

SIZE = 10 * 2**20


def staged_settings(cluster: str = "stage", **extra: Any) -> dict[str, Any]:
    """Loopback is a fast link, on which ``auto`` sends directly: these tests stage."""
    return {"provider": "aws", "n": 3, "instance": "C2", "cluster": cluster,
            "region": REGION, "ingress_cidr": CIDR, "user": getpass.getuser(),
            "python": sys.executable, "workers_per_host": 1, "staging": "always", **extra}


def row_sums(X: np.ndarray, rows: slice) -> float:
    return float(X[rows].sum())


def run_row_sums(settings: dict[str, Any], X: np.ndarray, tasks: int = 6) -> list[float]:
    assert cluster_of(settings).wait_until_settled(60)  # every host takes a task
    with parallel_backend("cloud", **settings):
        return Parallel(n_jobs=3)(delayed(row_sums)(X, slice(i, i + 5)) for i in range(tasks))


def expected_row_sums(X: np.ndarray, tasks: int = 6) -> list[float]:
    return [float(X[i:i + 5].sum()) for i in range(tasks)]


def cluster_of(settings: dict[str, Any]) -> Cluster:
    return registry.get_cluster(resolve_config(**settings))


@pytest.fixture
def X() -> np.ndarray:
    return np.random.default_rng(0).random(SIZE // 8).reshape(-1, 64)
