"""A real GridSearchCV on the ``cloud`` backend, compared with ``n_jobs=1``.

    python examples/grid_search.py                        # local provider (no account)
    python examples/grid_search.py --provider ssh --hosts me@10.0.0.5:22,me@10.0.0.6:22
    JOBLIB_CLOUD_PROVIDER=aws python examples/grid_search.py --instance C16 --n 4

Any setting not given as a flag comes from the JOBLIB_CLOUD_* environment or the config
file, exactly as for ``parallel_backend('cloud')``.
"""

from __future__ import annotations

import argparse
import os
import time

from joblib import parallel_backend
from sklearn.datasets import make_classification
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

import joblib_cloud  # noqa: F401  (registers the 'cloud' backend)

PARAM_GRID = {"svc__C": [0.1, 1.0, 10.0, 100.0], "svc__gamma": ["scale", 0.01, 0.1]}


def make_data(n_samples: int = 3000):
    return make_classification(n_samples=n_samples, n_features=30, n_informative=12,
                               random_state=0)


def make_search(n_jobs: int | None) -> GridSearchCV:
    # SVC is single-threaded: the speed-up shown is the backend's, not BLAS threads'.
    model = make_pipeline(StandardScaler(), SVC())
    return GridSearchCV(model, PARAM_GRID, cv=5, n_jobs=n_jobs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--provider", help="local, ssh or aws (default: local here)")
    parser.add_argument("--hosts", help="user@addr:port,... for the ssh provider")
    parser.add_argument("--instance", help="instance alias for aws, e.g. C16")
    parser.add_argument("--n", type=int, help="number of machines")
    parser.add_argument("--samples", type=int, default=3000)
    args = parser.parse_args()
    settings = {k: v for k, v in vars(args).items() if k != "samples" and v is not None}
    if "provider" not in settings and not os.environ.get("JOBLIB_CLOUD_PROVIDER"):
        settings["provider"] = "local"  # the embedded default: no cloud account needed

    X, y = make_data(args.samples)
    start = time.perf_counter()
    baseline = make_search(n_jobs=1).fit(X, y)
    sequential = time.perf_counter() - start

    with parallel_backend("cloud", **settings):
        search = make_search(n_jobs=-1)
        start = time.perf_counter()
        search.fit(X, y)
        remote = time.perf_counter() - start

    assert search.best_params_ == baseline.best_params_, "results differ from n_jobs=1"
    print(f"best params:  {search.best_params_}")
    print(f"best score:   {search.best_score_:.4f}")
    print(f"n_jobs=1:     {sequential:.2f} s")
    print(f"cloud ({settings.get('provider') or os.environ.get('JOBLIB_CLOUD_PROVIDER')}): "
          f"{remote:.2f} s  (speed-up x{sequential / remote:.2f}, "
          f"{len(search.cv_results_['params'])} candidates x 5 folds)")


if __name__ == "__main__":
    main()
