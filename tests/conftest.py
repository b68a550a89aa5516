"""Test-wide set-up: loopback-only network guard, fake AWS credentials, the sshd fleet."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

# Before anything imports boto3: never probe the instance-metadata address, never find
# real credentials.
for _var in [v for v in os.environ if v.startswith("JOBLIB_CLOUD_")]:
    del os.environ[_var]
os.environ.update({
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "JOBLIB_CLOUD_HOME": tempfile.mkdtemp(prefix="joblib-cloud-test-home-"),
})
sys.path.insert(0, str(Path(__file__).parent / "support"))  # what tests share

import netguard  # noqa: E402

#: Fixtures more than one test module uses, from tests/support/.
pytest_plugins = ["runjobs", "stagedruns"]
from sshfleet import SSHFleet  # noqa: E402

import joblib_cloud  # noqa: E402,F401  (registers the backend)
from joblib_cloud.client import registry  # noqa: E402

# --------------------------------------------------------------------- network guard

netguard.install()


@pytest.fixture(autouse=True)
def loopback_only():
    """Fail any test whose sockets tried to leave loopback (even from a thread)."""
    start = len(netguard.violations)
    yield
    new = netguard.violations[start:]
    assert not new, f"non-loopback network access attempted: {new}"


# --------------------------------------------------------------------- fleets


def _require_sshd() -> None:
    from sshfleet import SSHD

    if not os.path.exists(SSHD):
        pytest.fail("OpenSSH server not installed: apt-get install openssh-server "
                    "(.ci/run does this)")


@pytest.fixture(scope="session")
def fleet(tmp_path_factory):
    """Three long-lived loopback SSH hosts shared by non-destructive tests."""
    _require_sshd()
    fleet = SSHFleet(tmp_path_factory.mktemp("fleet"), n=3).start()
    yield fleet
    registry.close_all()
    fleet.stop()


@pytest.fixture
def fresh_fleet(tmp_path):
    """A private fleet for tests that kill, stop or re-key hosts."""
    _require_sshd()
    fleet = SSHFleet(tmp_path / "fleet", n=3).start()
    yield fleet
    fleet.stop()


@pytest.fixture(params=["local", "ssh"])
def cloud_kwargs(request, fleet):
    """Backend settings for each provider that runs here: ``local`` and the sshd fleet."""
    if request.param == "local":
        return {"provider": "local", "n": 2, "workers_per_host": 2}
    return fleet.kwargs(workers_per_host=2)


@pytest.fixture(autouse=True)
def _compat_row(request, record_property):
    """Tests of the compatibility set say so in the JUnit file (.ci/matrix.py counts them)."""
    if request.node.get_closest_marker("compat"):
        record_property("compat", "1")
