"""Which Python a guest's boot gives the agent, on both guest families (tests/support/guests.py):
Debian 12 (bookworm: Python 3.11) and Debian 13 (trixie: Python 3.13 only).

A client on 3.13 takes the distribution's Python on Debian 13.  A client on another minor
has no ``python3.X`` package to install there: the boot asks uv for its standalone Python,
whose download (from GitHub) cannot succeed on this machine, and the boot must then stop
within about a minute with a line that names the fix, not wait for ``boot_timeout``.
``python=`` names an interpreter the image has: the boot checks its minor, then installs
the client's packages into it.
"""

from __future__ import annotations

import socket
import sys
import time

import pytest
from awsmock import CIDR, REGION, aws_fixture, cluster_instances  # noqa: F401  (fixtures)
from guest_ec2 import SELF_SHUTDOWN, guest_ec2_fixture  # noqa: F401  (fixture)
from guests import IMAGE_UV_CONFIG
from helpers import assert_grid_search_matches_sequential
from joblib import Parallel, delayed, parallel_backend

from joblib_cloud.client import registry
from joblib_cloud.errors import HostPythonError
from joblib_cloud.providers.aws import sshkeys, userdata

pytestmark = pytest.mark.slow

CLIENT_MINOR = f"{sys.version_info[0]}.{sys.version_info[1]}"
#: The Pythons Debian 13 packages (what the boot's line must list).
TRIXIE_MINORS = "3.13"


def _settings(cluster: str, image_id: str | None, **extra) -> dict:
    settings = {"provider": "aws", "instance": "C2", "region": REGION, "ingress_cidr": CIDR,
                "cluster": cluster, "workers_per_host": 2, "n": 1, "boot_timeout": 600,
                **extra}
    return settings if image_id is None else {**settings, "image_id": image_id}


def _fails_fast(guest_ec2, settings: dict) -> tuple[str, float]:
    """Run a call that must fail at boot: (the error's message, seconds it took)."""
    started = time.monotonic()
    try:
        with pytest.raises(HostPythonError) as info:
            with parallel_backend("cloud", **settings):
                Parallel()(delayed(pow)(i, 2) for i in range(2))
    finally:
        registry.close_all()
    elapsed = time.monotonic() - started
    (guest,) = guest_ec2.guests.values()
    assert guest.family == "trixie"
    guest.wait(lambda: guest.powered_off, 60, "power-off after the failed boot")
    assert cluster_instances(_ec2(), settings["cluster"], states=("pending", "running")) == []
    return str(info.value), elapsed


def _ec2():
    import boto3

    return boto3.client("ec2", region_name=REGION)


@pytest.mark.skipif(CLIENT_MINOR == TRIXIE_MINORS, reason="Debian 13 has this client's Python")
def test_a_client_on_a_minor_the_image_lacks_fails_fast_naming_the_fix(guest_ec2):
    """Debian 13 has no python3.11 package and uv's standalone Python cannot be downloaded
    here: the guest powers itself off within about a minute, its console names the image's
    Pythons and the fixes, and the client raises HostPythonError carrying that line."""
    image_id = guest_ec2.register_image("trixie")
    message, elapsed = _fails_fast(guest_ec2, _settings("nopython", image_id))
    assert elapsed < 90, elapsed  # boot_timeout is 600 s
    (guest,) = guest_ec2.guests.values()
    console = guest.console()
    assert f"no python{CLIENT_MINOR} package here: uv's standalone Python" in console
    line = (f"{userdata.NO_PYTHON} {CLIENT_MINOR} for the agent: uv's standalone Python "
            f"{CLIENT_MINOR} could not be downloaded. This image has Python {TRIXIE_MINORS}: "
            f"run the client on one of those, pass image_id= of an image that has "
            f"python{CLIENT_MINOR}, or python= with the path of a Python {CLIENT_MINOR} on it")
    assert line in console, console[-3000:]
    assert line.removeprefix("joblib-cloud: ") + "." in message.splitlines()[0], message
    assert SELF_SHUTDOWN[0] in message and "joblib-cloud: boot failed" in message, message
    # What uv said about the download is on the console too (the cause, for the user).
    assert "Failed to download" in console or "python-build-standalone" in console, console
    assert guest.exited_at - guest.started_at < 80, guest.exited_at - guest.started_at


@pytest.mark.skipif(CLIENT_MINOR == TRIXIE_MINORS, reason="Debian 13 has this client's Python")
def test_a_standalone_download_that_never_answers_is_cut_short(guest_ec2):
    """The image's uv configuration sends the standalone Python's download to a server
    that accepts connections and never answers (a black hole): uv's bounded wait ends it,
    and the boot stops with the same line about a minute after it started."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        mirror = f"http://127.0.0.1:{silent.getsockname()[1]}/mirror"
        guest_ec2.image_files["/etc/uv/uv.toml"] = (
            f'{IMAGE_UV_CONFIG}python-install-mirror = "{mirror}"\n')
        image_id = guest_ec2.register_image("trixie")
        message, elapsed = _fails_fast(guest_ec2, _settings("blackhole", image_id))
    (guest,) = guest_ec2.guests.values()
    console = guest.console()
    assert f"Failed to download `{mirror}/" in console and "timed out" in console, console
    assert "could not be downloaded. This image has Python 3.13" in message, message
    lived = guest.exited_at - guest.started_at
    assert 40 <= lived <= 100, lived  # uv waited (20 s twice), then the boot stopped
    assert elapsed < 130, elapsed


@pytest.mark.skipif(CLIENT_MINOR == TRIXIE_MINORS, reason="Debian 13 has this client's Python")
def test_python_at_another_minor_than_the_clients_fails_fast_naming_it(guest_ec2):
    """python= names an interpreter the image has, at another minor than the client's:
    the boot checks it before installing anything and says which minor it is."""
    image_id = guest_ec2.register_image("trixie")
    settings = _settings("otherpy", image_id, python="/usr/bin/python3.13")
    message, elapsed = _fails_fast(guest_ec2, settings)
    assert elapsed < 75, elapsed
    assert (f"no Python {CLIENT_MINOR} for the agent: python=/usr/bin/python3.13 is Python "
            f"3.13. This image has Python {TRIXIE_MINORS}") in message, message
    (guest,) = guest_ec2.guests.values()
    assert "joblib-cloud: installing" not in guest.console()


@pytest.mark.compat
@pytest.mark.skipif(sys.version_info[:2] != (3, 13), reason="Debian 13's Python is 3.13")
def test_a_313_client_on_debian_13_takes_the_distributions_python(guest_ec2):
    """A 3.13 client on Debian 13: the boot makes its venv from /usr/bin/python3.13 (no uv
    standalone Python), and a GridSearchCV and a Parallel map equal the sequential runs."""
    image_id = guest_ec2.register_image("trixie")
    settings = _settings("py313", image_id)
    try:
        assert_grid_search_matches_sequential(settings)
        with parallel_backend("cloud", **settings):
            squares = Parallel()(delayed(pow)(i, 2) for i in range(20))
        assert squares == [i * i for i in range(20)]
    finally:
        registry.close_all()
    (guest,) = guest_ec2.guests.values()
    assert guest.family == "trixie"
    # sshd offers the injected key only (Debian 13's sshd-keygen stays off under cloud-init).
    injected = sshkeys.host_keys(REGION, "py313")[guest.instance_id]
    assert guest.offered_host_keys() == [" ".join(injected.split()[:2])]
    log = guest.file(userdata.BOOT_LOG) or ""
    assert "joblib-cloud: host ready" in log, log
    assert "uv's standalone Python" not in log and "no Python" not in log, log
    cfg = guest.file(f"{userdata.VENV}/pyvenv.cfg") or ""
    assert "home = /usr/bin" in cfg and "version_info = 3.13" in cfg, cfg
    assert "Invalid cloud-config" not in (guest.file("/var/log/cloud-init.log") or "")


@pytest.mark.skipif(CLIENT_MINOR != "3.11", reason="Debian 12's Python is 3.11")
def test_python_the_image_has_takes_the_clients_packages_and_runs_the_agent(guest_ec2):
    """python=/usr/bin/python3.11 on Debian 12 (the client's minor): the boot makes no
    venv, installs the client's packages into that interpreter, and the agent runs it."""
    settings = _settings("syspy", None, python="/usr/bin/python3.11")
    try:
        with parallel_backend("cloud", **settings):
            where = Parallel()(delayed(_interpreter)() for _ in range(4))
    finally:
        registry.close_all()
    assert {w[0] for w in where} == {"/usr/bin/python3.11"}, where
    assert all(w[1].startswith("/usr/local/lib/python3.11/dist-packages/") for w in where)
    (guest,) = guest_ec2.guests.values()
    assert guest.family == "bookworm"
    assert guest.file(f"{userdata.VENV}/pyvenv.cfg") is None
    assert "joblib-cloud: host ready" in (guest.file(userdata.BOOT_LOG) or "")


def _interpreter() -> tuple[str, str]:
    import joblib

    return sys.executable, joblib.__file__
