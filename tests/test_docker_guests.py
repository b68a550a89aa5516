"""``image=`` with ``provider='aws'`` on a guest that really boots: the boot script
installs Docker from Debian's packages, pulls the image from the registry on loopback
(tests/support/dockerengine.py), and the agent runs in it.

The guest is a Docker-capable one (``guests.Guest(docker=True)``): nspawn gives it every
capability, writable cgroup controllers and a plain ``/var/lib/docker``, as a VM has.
"""

from __future__ import annotations

import numpy as np
import pytest
from awsmock import CIDR, REGION, aws_fixture  # noqa: F401  (fixture)
from dockerengine import (
    MARKER_VALUE,
    VENV,
    engine_fixture,  # noqa: F401  (fixture)
    where_am_i,
)
from guest_ec2 import guest_ec2_fixture  # noqa: F401  (fixture)
from joblib import Parallel, delayed, parallel_backend
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV

from joblib_cloud.client import registry
from joblib_cloud.providers.aws import userdata

pytestmark = pytest.mark.slow


def test_the_boot_installs_docker_pulls_the_image_and_the_agent_runs_in_it(guest_ec2,
                                                                           engine):
    guest_ec2.docker = True
    settings = {"provider": "aws", "instance": "C2", "region": REGION,
                "ingress_cidr": CIDR, "cluster": "docker-guest", "workers_per_host": 2,
                "image": engine.image}
    X, y = make_classification(n_samples=300, n_features=8, n_informative=5,
                               random_state=0)

    def fit(n_jobs):
        return GridSearchCV(LogisticRegression(max_iter=500),
                            {"C": [0.01, 0.1, 1.0, 10.0]}, cv=3, n_jobs=n_jobs).fit(X, y)

    expected = fit(1)
    try:
        with parallel_backend("cloud", **settings):
            out = Parallel(batch_size=1)(delayed(where_am_i)(i) for i in range(8))
            actual = fit(-1)
    finally:
        registry.close_all()
    (guest,) = guest_ec2.guests.values()
    log = guest.file(userdata.BOOT_LOG) or ""
    assert f"joblib-cloud: image {engine.image} pulled" in log, log[-3000:]
    assert {o["prefix"] for o in out} == {VENV}
    assert {o["marker"] for o in out} == {MARKER_VALUE}
    assert {o["dockerenv"] for o in out} == {True}
    assert {o["home"] for o in out} == {"/home/ec2-user/.joblib-cloud"}
    assert {o["uid"] for o in out} == {1000}  # ec2-user, not root
    assert actual.best_params_ == expected.best_params_
    np.testing.assert_allclose(actual.cv_results_["mean_test_score"],
                               expected.cv_results_["mean_test_score"])
