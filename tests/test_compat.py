"""What users do, on the Python they have: this set runs under every supported Python in
CI (``.ci/matrix.py``), against hosts that hold only what a real host holds.

Hosts are venvs made from an interpreter of the client's minor (the client's own, and
any other installation of that minor here: Debian's 3.11.2 beside a 3.11.7 client) with
only joblib and cloudpickle, at the client's versions; GridSearchCV's hosts hold what an
``aws`` boot installs (numpy, scipy, scikit-learn, threadpoolctl too).  Each test records
its provider and host for the matrix in ``docs/compatibility.md``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import pythons
from helpers import assert_grid_search_matches_sequential
from joblib import Parallel, delayed, parallel_backend

from joblib_cloud import RemoteTaskError
from joblib_cloud.config import resolve_config
from joblib_cloud.errors import RemoteTraceback

pytestmark = pytest.mark.compat

HOST_PYTHONS = pythons.same_minor_interpreters()


def _label(python: str) -> str:
    return pythons.describe(python)["label"]


@pytest.fixture(scope="module", params=HOST_PYTHONS, ids=[_label(p) for p in HOST_PYTHONS])
def minimal_host(request) -> tuple[str, str]:
    """(host python with only joblib and cloudpickle, its label)."""
    env = pythons.host_env(request.param, pythons.client_pins(pythons.HOST_MINIMAL))
    return str(env), _label(request.param)


@pytest.fixture(params=["local", "ssh"])
def settings(request, fleet, minimal_host, record_property) -> dict:
    python, label = minimal_host
    record_property("provider", request.param)
    record_property("host", f"venv {label}: joblib, cloudpickle")
    if request.param == "local":
        return {"provider": "local", "n": 2, "workers_per_host": 2, "python": python}
    return fleet.kwargs(workers_per_host=2, python=python)


def _where(_):
    """What the worker runs in: its Python's prefix, and which client packages it has."""
    import importlib.util

    have = [m for m in ("numpy", "paramiko", "boto3", "joblib_cloud_test_marker")
            if importlib.util.find_spec(m) is not None]
    return sys.prefix, have


def _fail(x):
    if x == 3:
        raise KeyError(f"task {x} failed on purpose")
    return x


def test_the_backend_runs_on_hosts_with_only_joblib_and_cloudpickle(settings):
    big = os.urandom(2 * 2**20)  # over cache_threshold: cached on each host by content
    with parallel_backend("cloud", **settings):
        where = Parallel()(delayed(_where)(i) for i in range(4))
        sizes = Parallel()(delayed(len)(big) for _ in range(4))
        squares = Parallel(batch_size=3)(delayed(pow)(i, 2) for i in range(50))
        with pytest.raises(KeyError, match="failed on purpose") as info:
            Parallel()(delayed(_fail)(i) for i in range(6))
    prefix = str(Path(settings["python"]).parent.parent)
    assert where == [(prefix, [])] * 4  # the host's own venv; none of the client's packages
    assert sizes == [len(big)] * 4
    assert squares == [i * i for i in range(50)]
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback) and "in _fail" in cause.text
    with parallel_backend("cloud", **settings), pytest.raises(RemoteTaskError):
        Parallel()(delayed(_unpicklable_error)() for _ in range(1))


class _Unpicklable(Exception):
    def __reduce__(self):
        raise TypeError("cannot pickle this exception")


def _unpicklable_error():
    raise _Unpicklable("boom")


def test_distributed_pool_on_hosts_with_only_joblib_and_cloudpickle(settings):
    from joblib_cloud import DistributedPool

    errors = []
    with DistributedPool(**settings) as pool:
        assert pool.map(abs, range(-5, 5)) == [abs(i) for i in range(-5, 5)]
        assert sorted(pool.imap_unordered(abs, range(-3, 3))) == [0, 1, 1, 2, 2, 3]
        assert list(pool.imap(str, range(7), chunksize=3)) == [str(i) for i in range(7)]
        assert pool.starmap(pow, [(2, 3), (3, 2)]) == [8, 9]
        pool.apply_async(_fail, (3,), error_callback=errors.append).wait(60)
    assert len(errors) == 1 and isinstance(errors[0], KeyError)


@pytest.fixture(params=HOST_PYTHONS, ids=[_label(p) for p in HOST_PYTHONS])
def scientific_host(request, record_property) -> str:
    record_property("host", f"venv {_label(request.param)}: + numpy, scipy, scikit-learn")
    return str(pythons.host_env(request.param, pythons.client_pins(pythons.HOST_SCIENTIFIC)))


def test_grid_search_equals_the_sequential_run_on_local(record_property):
    record_property("provider", "local")
    record_property("host", "the client's own Python")
    assert_grid_search_matches_sequential({"provider": "local", "n": 2,
                                           "workers_per_host": 2})


def test_grid_search_equals_the_sequential_run_on_ssh_hosts(fleet, scientific_host,
                                                            record_property):
    record_property("provider", "ssh")
    assert_grid_search_matches_sequential(fleet.kwargs(workers_per_host=2,
                                                       python=scientific_host))


# ------------------------------------------------------------------ joblib-cloud run

JOB = """
import os, sys
shared = os.environ["JOBLIB_CLOUD_SHARED"]
if sys.argv[1] == "write":
    os.makedirs("results", exist_ok=True)
    with open("results/out.txt", "w") as fh:
        fh.write(sys.version.split()[0])
    with open(os.path.join(shared, "note.txt"), "w") as fh:
        fh.write("from the first job")
else:
    with open(os.path.join(shared, "note.txt")) as fh:
        print("shared:", fh.read())
"""


@pytest.fixture(params=["local", "ssh"])
def run_env(request, fleet, minimal_host, tmp_path, record_property) -> dict:
    """The CLI's environment: this client's Python runs ``joblib-cloud``, the job runs in
    the host's minimal venv."""
    python, label = minimal_host
    record_property("provider", request.param)
    record_property("host", f"venv {label}: joblib, cloudpickle")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBLIB_CLOUD_")}
    env.update({"JOBLIB_CLOUD_HOME": str(tmp_path / "client-home"),
                "JOBLIB_CLOUD_PROVIDER": request.param, "JOBLIB_CLOUD_PYTHON": python,
                "JOBLIB_CLOUD_CLUSTER": f"compat-{request.param}"})
    if request.param == "ssh":
        kwargs = fleet.kwargs(hosts=fleet.hosts[2:3], python=python)
        env.update({"JOBLIB_CLOUD_HOSTS": kwargs["hosts"][0],
                    "JOBLIB_CLOUD_SSH_KEY": kwargs["ssh_key"],
                    "JOBLIB_CLOUD_KNOWN_HOSTS": kwargs["known_hosts"]})
    return env


def _cli(env: dict, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "joblib_cloud", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=180)


def test_run_brings_outputs_back_and_shares_a_directory(run_env, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "job.py").write_text(textwrap.dedent(JOB))
    first = _cli(run_env, project, "run", "--", "python", "job.py", "write")
    assert first.returncode == 0, first.stderr
    outputs = list((project / "joblib-cloud-runs").glob("*/results/out.txt"))
    host_version = pythons.describe(run_env["JOBLIB_CLOUD_PYTHON"])["version"]
    assert [p.read_text() for p in outputs] == [host_version]
    second = _cli(run_env, project, "run", "--", "python", "job.py", "read")
    assert second.returncode == 0, second.stderr
    assert "shared: from the first job" in second.stdout
    listing = _cli(run_env, project, "shared", "ls")
    assert listing.returncode == 0 and "note.txt" in listing.stdout, listing.stderr


# ------------------------------------------------------------------ CLI and settings


def test_the_command_line_answers(tmp_path, record_property):
    record_property("provider", "none")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBLIB_CLOUD_")}
    env["JOBLIB_CLOUD_HOME"] = str(tmp_path)
    version = _cli(env, tmp_path, "--version")
    assert version.returncode == 0 and version.stdout.strip(), version.stderr
    instances = _cli(env, tmp_path, "instances")
    assert instances.returncode == 0 and "c6i.4xlarge" in instances.stdout, instances.stderr
    bad = _cli(env, tmp_path, "run", "-n", "0", "--", "true")
    assert bad.returncode != 0 and "n" in bad.stderr and "Traceback" not in bad.stderr


def test_settings_come_from_keyword_environment_and_config_file(tmp_path, monkeypatch,
                                                                 record_property):
    record_property("provider", "none")
    config = tmp_path / "config.toml"
    config.write_text('provider = "ssh"\nn = 3\nidle_timeout = 120\n'
                      'hosts = ["me@127.0.0.2:22"]\n')
    monkeypatch.setenv("JOBLIB_CLOUD_CONFIG", str(config))
    monkeypatch.setenv("JOBLIB_CLOUD_N", "2")
    resolved = resolve_config(idle_timeout=60)
    assert (resolved.provider, resolved.n, resolved.idle_timeout) == ("ssh", 2, 60.0)
    config.write_text("n = [unclosed\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        resolve_config()


def test_a_host_without_the_clients_libraries_gives_one_warning(minimal_host,
                                                                 record_property):
    python, label = minimal_host
    record_property("provider", "local")
    record_property("host", f"venv {label}: joblib, cloudpickle")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with parallel_backend("cloud", provider="local", n=1, workers_per_host=1,
                              python=python, cluster=f"one-warning-{label.split()[0]}"):
            assert Parallel()(delayed(abs)(-i) for i in range(3)) == [0, 1, 2]
    lines = [str(w.message) for w in caught if "lacks" in str(w.message)]
    assert len(lines) == 1, lines
    assert "numpy" in lines[0] and "scikit-learn" in lines[0] and "sync_packages" in lines[0]
