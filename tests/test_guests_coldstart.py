"""Cold start on a guest that really boots the aws user-data: the agent starts once
joblib, cloudpickle and numpy are in, stdlib tasks' results arrive while scipy and
scikit-learn still install, and a scikit-learn task waits for them (not failing).

The guest installs from a package index on loopback (``gated_index``) that holds
scikit-learn's wheel until the first stdlib result is in: on any network, that install is
still under way when the result comes."""

from __future__ import annotations

import pytest
from awsmock import CIDR, REGION, aws_fixture  # noqa: F401  (fixtures)
from gated_index import GatedIndex, wheelhouse
from guest_ec2 import guest_ec2_fixture  # noqa: F401  (fixture)
from joblib import Parallel, delayed, parallel_backend
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression

from joblib_cloud.client import registry
from joblib_cloud.config import resolve_config
from joblib_cloud.providers.aws import userdata
from joblib_cloud.wire import contract

pytestmark = pytest.mark.slow


def _fit_score(model, X, y) -> float:
    return float(model.fit(X, y).score(X, y))


def _stamp(x: int) -> int:
    return x


def test_stdlib_results_before_the_heavy_install_and_a_sklearn_task_waits(guest_ec2):
    settings = {"provider": "aws", "instance": "C2", "region": REGION, "ingress_cidr": CIDR,
                "cluster": "coldstart", "workers_per_host": 2, "n": 1}
    X, y = make_classification(n_samples=300, n_features=8, random_state=0)
    expected = _fit_score(LogisticRegression(max_iter=300), X, y)
    index = GatedIndex(wheelhouse(userdata.client_requirements()))
    index.hold("scikit-learn")
    guest_ec2.image_files["/etc/uv/uv.toml"] = index.uv_config()
    seen: dict[str, object] = {}
    try:
        with parallel_backend("cloud", **settings):
            results = Parallel(return_as="generator_unordered", batch_size=1)(
                [delayed(_fit_score)(LogisticRegression(max_iter=300), X, y)]
                + [delayed(_stamp)(i) for i in range(6)])
            for result in results:
                if isinstance(result, int) and "stdlib" not in seen:
                    (guest,) = guest_ec2.guests.values()
                    states = list(guest.root.glob(f"home/*/.joblib-cloud/"
                                                  f"{contract.INSTALLING_FILE}"))
                    cluster = registry.get_cluster(resolve_config(**settings))
                    seen["stdlib"] = ([(p, p.read_text()) for p in states],
                                      cluster.progress.board.line())
                    index.release()
                seen.setdefault("all", []).append(result)  # type: ignore[union-attr]
    finally:
        registry.close_all()
        index.close()
    # The guest installed from the gated index (so scikit-learn came after that result).
    assert {"numpy", "scipy", "scikit-learn"} <= set(index.served), index.served
    states, line = seen["stdlib"]  # type: ignore[misc]
    # When the first stdlib result came, the boot was still installing, and said so.
    assert len(states) == 1 and '"state": "installing"' in states[0][1], states
    assert "installing " in line and "scikit-learn" in line, line
    # The scikit-learn task waited for that install and is right.
    assert sorted(r for r in seen["all"] if isinstance(r, int)) == list(range(6))
    (score,) = [r for r in seen["all"] if isinstance(r, float)]
    assert score == expected
    log = guest.file(userdata.BOOT_LOG) or ""
    assert log.index("joblib-cloud: host ready") < log.index(
        "joblib-cloud: packages installed"), log
    try:  # "installed" while the OpenMP runtime installs, then gone
        assert '"state": "installed"' in states[0][0].read_text()
    except FileNotFoundError:
        pass


def _total(values) -> float:
    return float(values.sum())


def _logsumexp(values: list[float]) -> float:
    import scipy.special  # installed in the background

    return float(scipy.special.logsumexp(values))


def test_a_failed_background_install_fails_only_the_tasks_that_need_it(guest_ec2):
    """packages= naming a package that does not exist: the background install fails, yet
    the host is up; stdlib tasks run, a task that needs scipy fails with the install's
    words, and the machine stays on."""

    settings = {"provider": "aws", "instance": "C2", "region": REGION, "ingress_cidr": CIDR,
                "cluster": "badbg", "workers_per_host": 2, "n": 1,
                "packages": ["joblib-cloud-no-such-package==0.0.1"]}
    try:
        with parallel_backend("cloud", **settings):
            assert Parallel()(delayed(pow)(i, 2) for i in range(4)) == [0, 1, 4, 9]
            with pytest.raises(ModuleNotFoundError) as info:
                Parallel()(delayed(_logsumexp)([1.0, 2.0 + i]) for i in range(2))
            assert Parallel()(delayed(pow)(i, 3) for i in range(3)) == [0, 1, 8]
    finally:
        registry.close_all()
    message = str(info.value)
    assert "No module named 'scipy'" in message, message
    assert "after the agent starts, and that install failed" in message, message
    assert "joblib-cloud-no-such-package" in message, message
    (guest,) = guest_ec2.guests.values()
    assert not guest.powered_off
    assert "joblib-cloud: installing the packages failed" in guest.console()
