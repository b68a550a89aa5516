"""Small helpers shared by the test modules."""

from __future__ import annotations

import time

import numpy as np
from joblib import parallel_backend
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV


def wait_until(condition, timeout: float, what: str, poll: float = 0.05) -> None:
    """Until ``condition()`` is true; an AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(poll)


def assert_grid_search_matches_sequential(settings: dict) -> None:
    """A small GridSearchCV through the cloud backend gives the sequential results."""
    X, y = make_classification(n_samples=300, n_features=12, random_state=0)
    grid = {"C": [0.01, 0.1, 1.0, 10.0], "fit_intercept": [True, False]}
    sequential = GridSearchCV(LogisticRegression(max_iter=500), grid, cv=3, n_jobs=1).fit(X, y)
    with parallel_backend("cloud", **settings):
        remote = GridSearchCV(LogisticRegression(max_iter=500), grid, cv=3,
                              n_jobs=-1).fit(X, y)
    assert remote.best_params_ == sequential.best_params_
    np.testing.assert_allclose(remote.cv_results_["mean_test_score"],
                               sequential.cv_results_["mean_test_score"])
