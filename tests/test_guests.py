"""``provider='aws'`` on guests that really boot the exact user-data (tests/support/guest_ec2.py).

A guest holds only what a Debian 12 cloud image holds: no venv module, no pip, nothing of
ours.  Everything a task needs comes from the boot script, as on a fresh EC2 instance.
"""

from __future__ import annotations

import re
import socket
import subprocess
import threading
import time

import numpy as np
import paramiko
import pytest
from awsmock import CIDR, REGION, aws_fixture, cluster_instances  # noqa: F401  (fixtures)
from guest_ec2 import SELF_SHUTDOWN, guest_ec2_fixture  # noqa: F401  (fixture)
from helpers import assert_grid_search_matches_sequential, wait_until
from joblib import Parallel, delayed, parallel_backend
from s3double import s3_fixture  # noqa: F401  (fixture)
from sklearn.datasets import make_classification
from sklearn.model_selection import GridSearchCV

from joblib_cloud import DistributedPool
from joblib_cloud.client import registry
from joblib_cloud.config import resolve_config
from joblib_cloud.errors import ClusterLostError, JoblibCloudError
from joblib_cloud.providers.aws import sshkeys, userdata

pytestmark = pytest.mark.slow


def _settings(cluster: str, **extra) -> dict:
    return {"provider": "aws", "instance": "C2", "region": REGION, "ingress_cidr": CIDR,
            "cluster": cluster, "workers_per_host": 2, **extra}


def _square(x: int) -> int:
    return x * x


def _part_sum(X, part: int) -> float:
    return float(X[part::4].sum())


def test_grid_search_and_pool_on_two_fresh_guests_then_idle_power_off(guest_ec2, s3):
    """The headline use on machines that boot: results equal the sequential run; host
    keys verified from the first connection; a large argument staged in S3 is fetched by
    each machine with its presigned URL; a short idle_timeout never cuts the install
    short, and the machines power off once the client has left."""
    settings = _settings("guests", n=2, idle_timeout=20)
    try:
        assert_grid_search_matches_sequential(settings)
        with DistributedPool(**settings) as pool:
            assert pool.map(_square, range(50)) == [x * x for x in range(50)]
        X = np.random.default_rng(0).random(2**21)  # 16 MB
        with parallel_backend("cloud", **settings, staging="always"):
            sums = Parallel(n_jobs=4)(delayed(_part_sum)(X, i) for i in range(8))
        assert sums == [float(X[i::4].sum()) for i in range(8)]
        hosts = registry.get_cluster(resolve_config(**settings)).hosts
        assert len(hosts) == 2
        for host in hosts:  # each machine downloaded it itself, none got it over SSH
            assert host.uploads.bytes_fetched > X.nbytes and host.uploads.bytes_sent == 0

        guests = list(guest_ec2.guests.values())
        assert len(guests) == 2
        keys = sshkeys.host_keys(REGION, "guests")
        for guest in guests:
            # sshd offers the injected key and nothing else; the image's own are gone.
            injected = " ".join(keys[guest.instance_id].split()[:2])
            assert guest.offered_host_keys() == [injected]
            # The install outlived idle_timeout (20 s) from boot, and was not cut short.
            log = guest.file(userdata.BOOT_LOG) or ""
            assert "joblib-cloud: host ready" in log, log
            # cloud-init took the whole document (image's configuration + our user-data).
            assert "Invalid cloud-config" not in (guest.file("/var/log/cloud-init.log") or "")
    finally:
        registry.close_all()

    # The client has left: each guest powers itself off after idle_timeout, and the
    # fake EC2 reports the instance terminated by its own shutdown.
    for guest in guests:
        guest.wait(lambda g=guest: g.powered_off, 120, "idle power-off")
    wait_until(lambda: not cluster_instances(guest_ec2_client(), "guests",
                                        states=("pending", "running")), 30, "terminated")


def guest_ec2_client():
    import boto3

    return boto3.client("ec2", region_name=REGION)


JOB = """
import json, os, sys
from joblib import Parallel, delayed, parallel_backend
import joblib_cloud
with parallel_backend("cloud"):
    squares = Parallel()(delayed(pow)(i, 2) for i in range(6))
print("JOB-RESULT " + json.dumps({"squares": squares, "python": sys.executable,
                                  "provider": os.environ.get("JOBLIB_CLOUD_PROVIDER")}))
"""


def test_run_a_script_on_a_fresh_guest_with_the_cloud_backend_inside(guest_ec2, tmp_path,
                                                                      monkeypatch, capfd):
    import json

    from joblib_cloud import cli

    project = tmp_path / "project"
    project.mkdir()
    (project / "job.py").write_text(JOB)
    monkeypatch.chdir(project)
    for name, value in {"REGION": REGION, "INGRESS_CIDR": CIDR, "IDLE_TIMEOUT": "60"}.items():
        monkeypatch.setenv(f"JOBLIB_CLOUD_{name}", value)
    try:
        code = cli.main(["run", "--provider", "aws", "-i", "C2", "--cluster", "guestjob",
                         "--", "python", "job.py"])
    finally:
        registry.close_all()
    out, err = capfd.readouterr()
    assert code == 0, (out, err)
    line = next(x for x in out.splitlines() if "JOB-RESULT " in x)
    result = json.loads(line.split("JOB-RESULT ", 1)[1])
    assert result["squares"] == [i * i for i in range(6)]
    assert result["python"].startswith(userdata.ROOT)  # the venv the boot made
    (guest,) = guest_ec2.guests.values()
    assert guest.running


def test_hard_lifetime_stops_the_machine_with_a_client_attached(guest_ec2):
    """max_lifetime holds whatever the client does: the machine powers itself off in the
    middle of a call, and the call fails with a clear error instead of hanging."""
    settings = _settings("lifetime", n=1, max_lifetime=75, heartbeat_timeout=10)
    started = time.monotonic()
    try:
        with parallel_backend("cloud", **settings):
            with pytest.raises(ClusterLostError) as info:
                Parallel()(delayed(time.sleep)(300) for _ in range(2))
    finally:
        registry.close_all()
    (guest,) = guest_ec2.guests.values()
    guest.wait(lambda: guest.powered_off, 60, "power-off")
    lived = guest.exited_at - guest.started_at
    assert 70 <= lived <= 110, lived
    assert time.monotonic() - started < 150
    assert "i-" in str(info.value)
    (inst,) = cluster_instances(guest_ec2_client(), "lifetime",
                                states=("shutting-down", "terminated"))
    assert inst["StateReason"]["Code"] == SELF_SHUTDOWN[0]


@pytest.mark.parametrize("family", ["bookworm", "trixie"])
def test_cloud_init_accepts_every_rendered_user_data(tmp_path, family):
    """The real cloud-init of each image family (22.4 on Debian 12, 25.1 on Debian 13)
    validates each variant the provider can send."""
    from guests import base_image, tools_missing

    reason = tools_missing()
    if reason:
        pytest.fail(f"guests cannot run here: {reason}")
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("tqdm==4.66.1\n")
    keys = sshkeys.generate_ed25519()
    common = {"user": "ec2-user", "host_private_key": keys[0], "host_public_key": keys[1],
              "client_public_key": keys[1], "idle_timeout": 600, "max_lifetime": 43200,
              "shutdown_command": "sudo shutdown -h now"}
    variants = {
        "default": userdata.build(**common),
        "packages": userdata.build(**common, packages=("xgboost==2.1.0", "tqdm")),
        "requirements": userdata.build(**common, requirements_path=str(requirements)),
        "odd-command": userdata.build(**{**common, "shutdown_command": "echo 100% $HOME"},
                                      boot_timeout=90),
        "docker-image": userdata.build(**common, image="python:3.11-slim"),
        "other-python": userdata.build(**common, python_minor="3.13"),
        "python=": userdata.build(**common, python="/opt/python 3/bin/python3"),
    }
    for name, text in variants.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        result = subprocess.run(
            ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "-D",
             str(base_image(family)),
             "--read-only", f"--bind-ro={path}:/tmp/user-data", "cloud-init", "schema",
             "--config-file", "/tmp/user-data"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and "Valid" in result.stdout, (name, result.stdout,
                                                                     result.stderr)
        boot = next(f["content"] for f in userdata.parse(text)["write_files"]
                    if f["path"].endswith("/boot.sh"))
        syntax = subprocess.run(["bash", "-n"], input=boot, capture_output=True, text=True)
        assert syntax.returncode == 0, (name, syntax.stderr)


def test_a_boot_that_fails_powers_off_and_the_client_says_why(guest_ec2, monkeypatch):
    """A package that does not exist, installed before the host lets the client in (the
    boot without a background install; with one, see test_guests_coldstart.py): the boot
    script fails, the machine powers itself off, and the client raises with the state
    reason and the boot's last console lines within about a minute, instead of retrying
    SSH for the whole boot_timeout."""
    monkeypatch.setattr(userdata, "BACKGROUND_INSTALL", False)
    settings = _settings("badboot", n=1, packages=["joblib-cloud-no-such-package==0.0.1"])
    started = time.monotonic()
    try:
        with pytest.raises(JoblibCloudError) as info:
            with parallel_backend("cloud", **settings):
                Parallel()(delayed(pow)(i, 2) for i in range(2))
    finally:
        registry.close_all()
    elapsed = time.monotonic() - started
    message = str(info.value)
    assert elapsed < 75, elapsed
    assert SELF_SHUTDOWN[0] in message, message
    assert "joblib-cloud: boot failed" in message, message
    assert "joblib-cloud-no-such-package" in message, message
    (guest,) = guest_ec2.guests.values()
    assert guest.powered_off
    assert cluster_instances(guest_ec2_client(), "badboot",
                             states=("pending", "running")) == []


def test_a_hung_boot_refuses_logins_and_is_stopped_by_its_deadline(guest_ec2, tmp_path,
                                                                  monkeypatch):
    """The install hangs (a package index that never answers) before the host lets the
    client in: SSH logins stay refused, the boot deadline powers the machine off, and the
    client raises instead of waiting."""
    monkeypatch.setattr(userdata, "BACKGROUND_INSTALL", False)
    with socket.socket() as silent:  # accepts connections into its backlog, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        # The client would wait 300 s: what stops the machine is its own boot deadline.
        settings = _settings("hungboot", n=1, boot_timeout=45, connect_timeout=300, packages=[
            f"hangs @ http://127.0.0.1:{port}/hangs-1.0-py3-none-any.whl"])
        outcome: dict = {}

        def call() -> None:
            try:
                with parallel_backend("cloud", **settings):
                    outcome["result"] = Parallel()(delayed(pow)(i, 2) for i in range(2))
            except BaseException as exc:  # noqa: BLE001 - checked below
                outcome["error"] = exc

        caller = threading.Thread(target=call, daemon=True)
        caller.start()
        try:
            wait_until(lambda: guest_ec2.guests, 60, "the launch")
            (guest,) = guest_ec2.guests.values()
            wait_until(lambda: guest.instance_id in sshkeys.host_keys(REGION, "hungboot"), 30,
                  f"the host key record ({outcome})")
            key_path, _ = sshkeys.client_key(REGION, "hungboot")
            host_keys = sshkeys.host_keys(REGION, "hungboot")
            guest.wait(lambda: "joblib-cloud: installing" in guest.console(), 60, "install")
            guest.wait(guest.listening, 30, "sshd")
            with pytest.raises(paramiko.AuthenticationException):
                _login(guest, key_path, keys=host_keys)
            guest.wait(lambda: guest.powered_off, 90, "the boot deadline")
            caller.join(timeout=60)
            assert not caller.is_alive()
        finally:
            caller.join(timeout=120)
            registry.close_all()
    lived = guest.exited_at - guest.started_at
    assert 45 <= lived <= 80, lived
    assert "boot did not finish within boot_timeout 45s" in guest.console()
    assert "result" not in outcome
    assert SELF_SHUTDOWN[0] in str(outcome["error"]), outcome["error"]


def _login(guest, key_path, keys) -> None:
    """Log in as the cluster's client would, host key verified."""
    import base64

    expected = keys[guest.instance_id].split()
    with socket.create_connection((guest.address, guest.port), timeout=10) as sock:
        transport = paramiko.Transport(sock)
        try:
            transport.start_client(timeout=10)
            offered = transport.get_remote_server_key()
            assert offered.get_base64() == expected[1]
            assert base64.b64decode(expected[1]) == offered.asbytes()
            transport.auth_publickey("ec2-user", paramiko.PKey.from_path(str(key_path)))
        finally:
            transport.close()


def test_an_image_without_the_clients_python_takes_uvs_standalone_python(tmp_path):
    """Debian 12 has no python3.13 package: the boot takes uv (a wheel from the package
    index, no installer script) and asks it for its standalone Python 3.13.  uv downloads
    that from GitHub, which this machine cannot reach: here the boot must then stop at
    that download with the line that names the image's Python and the fix (and power off);
    with the download reachable, the venv runs Python 3.13."""
    from guests import Guest, base_image

    base_image()
    keys = sshkeys.generate_ed25519()
    text = userdata.build(user="ec2-user", host_private_key=keys[0], host_public_key=keys[1],
                          client_public_key=keys[1], idle_timeout=600, max_lifetime=600,
                          shutdown_command="shutdown -h now", python_minor="3.13")
    assert "astral.sh" not in text and "install.sh" not in text
    guest = Guest(tmp_path, 200, text, "i-standalone").start()
    try:
        guest.wait(lambda: guest.powered_off or "host ready" in guest.console(), 240,
                   "the boot's outcome")
        console = guest.console()
        assert "fetch_uv: uv " in console and "py3-none-manylinux" in console, console
        assert "no python3.13 package here: uv's standalone Python" in console, console
        if "joblib-cloud: host ready" in console:
            assert "version_info = 3.13" in (guest.file(f"{userdata.VENV}/pyvenv.cfg") or "")
        else:
            assert (f"{userdata.NO_PYTHON} 3.13 for the agent: uv's standalone Python 3.13 "
                    "could not be downloaded. This image has Python 3.11: ") in console, console
            assert "joblib-cloud: boot failed" in console
            assert "joblib-cloud: installing" not in console, console
            guest.wait(lambda: guest.powered_off, 60, "power-off after the failed boot")
    finally:
        guest.cleanup()


def test_a_model_from_a_package_the_host_lacks_runs_without_packages(guest_ec2):
    """LightGBM is not in the boot's packages: the first batch misses it on the fresh
    host, the host installs the client's version (and the boot gave it the OpenMP runtime
    LightGBM loads), the batch runs again, and the search matches the sequential one."""
    lightgbm = pytest.importorskip("lightgbm")
    from importlib.metadata import version

    X, y = make_classification(n_samples=200, n_features=8, random_state=0)
    grid = {"num_leaves": [4, 8], "n_estimators": [10, 20]}

    def search(n_jobs: int):
        model = lightgbm.LGBMClassifier(verbose=-1, n_jobs=1, random_state=0)
        return GridSearchCV(model, grid, cv=3, n_jobs=n_jobs).fit(X, y)

    sequential = search(1)
    try:
        with parallel_backend("cloud", **_settings("lgbm", n=1)):
            remote = search(-1)
    finally:
        registry.close_all()
    assert remote.best_params_ == sequential.best_params_
    np.testing.assert_allclose(remote.cv_results_["mean_test_score"],
                               sequential.cv_results_["mean_test_score"])
    (guest,) = guest_ec2.guests.values()
    site = f"{userdata.VENV}/lib/python3.11/site-packages"
    assert guest.file(f"{site}/lightgbm-{version('lightgbm')}.dist-info/METADATA")


def test_a_budget_stops_the_machine_itself_with_a_client_attached(guest_ec2):
    """budget= buys about five and a half minutes of one machine (its boot and idle_timeout
    must fit, so no less): at that time the machine is off and the call fails with
    BudgetExceededError instead of running on."""
    from joblib_cloud.errors import BudgetExceededError
    from joblib_cloud.providers.aws import budget, instance_types

    price = instance_types.hourly_price("c6i.large", 2)  # moto: the built-in price
    seconds = budget.BOOT_SECONDS + 30
    settings = _settings("budget", n=1, idle_timeout=20, budget=price * seconds / 3600)
    try:
        with pytest.raises(BudgetExceededError, match="reached its budget"):
            with parallel_backend("cloud", **settings):
                Parallel()(delayed(time.sleep)(900) for _ in range(2))
    finally:
        registry.close_all()
        budget.exhausted.discard("budget")
    (guest,) = guest_ec2.guests.values()
    guest.wait(lambda: guest.powered_off, 90, "power-off at the budget")
    lived = guest.exited_at - guest.started_at
    assert seconds - 15 <= lived <= seconds + 60, lived
    # Its own kill switch had the cap: the deadline its share buys, from its launch.
    deadline = int(re.search(r"--deadline (\d+)", guest.user_data).group(1))
    assert guest.started_at - 15 <= deadline - seconds <= guest.started_at, deadline


def test_an_idle_client_does_not_keep_the_machine_and_the_next_call_works(guest_ec2, caplog):
    """A notebook that ran one call and stays open: the machine powers itself off within
    idle_timeout + a minute of the last work, the client notices, and its next call
    launches again with one line saying so."""
    settings = _settings("idleclient", n=1, idle_timeout=30)
    try:
        with parallel_backend("cloud", **settings):
            assert Parallel()(delayed(_square)(i) for i in range(6)) == [i * i for i in range(6)]
            worked = time.time()
            (first,) = guest_ec2.guests.values()
            first.wait(lambda: first.powered_off, 30 + 60 + 30,
                       "the idle power-off with the client still open")
            stopped = first.exited_at - worked
            print(f"the guest powered off {stopped:.1f}s after the last work")
            assert 30 - 1 <= stopped <= 30 + 60, stopped
            wait_until(lambda: not cluster_instances(guest_ec2_client(), "idleclient",
                                                     states=("pending", "running")),
                       30, "terminated")
            with caplog.at_level("WARNING", logger="joblib_cloud"):
                assert Parallel()(delayed(_square)(i) for i in range(6)) == [
                    i * i for i in range(6)]
    finally:
        registry.close_all()
    again = [r.getMessage() for r in caplog.records if "connecting again" in r.getMessage()]
    assert len(again) == 1 and "without work" in again[0], again
    assert len(guest_ec2.guests) == 2  # a fresh machine took the second call
    assert "idle for" in first.console(), first.console()[-2000:]
