"""Booting on aws: a machine that dies while the client waits for SSH fails the call at
once with EC2's reason and the end of its console; the wait is ``boot_timeout`` unless
``connect_timeout`` is set; a wait that runs out names the address opened for SSH; the
root volume fits the image; the metadata endpoint is off once the hosts have booted."""

from __future__ import annotations

import getpass
import sys
import threading
import time
from typing import Any

import pytest
from awsmock import (  # noqa: F401  (fixtures)
    CIDR,
    REGION,
    api_calls_fixture,
    aws_config,
    aws_fixture,
    cluster_instances,
    dead_port,
    end_instance,
    launch,
    loopback_ec2_fixture,
    sshd_per_instance,
)

from joblib_cloud import provisioner
from joblib_cloud.client import registry
from joblib_cloud.errors import HostConnectError
from joblib_cloud.providers.aws import launch as aws_launch
from joblib_cloud.providers.aws.ec2api import BootFailedError

SELF_SHUTDOWN = ("Client.InstanceInitiatedShutdown",
                 "Client.InstanceInitiatedShutdown: Instance initiated shutdown")
#: As a Debian or Amazon Linux console shows a boot: cloud-init's output (the boot script
#: prints there) among systemd's own lines, colours included.
CONSOLE = "\r\n".join(
    [f"[  {i}.000] cloud-init[113]: step {i}" for i in range(60)]
    + ["[   61.000] cloud-init[113]: joblib-cloud: boot failed (line 9: uv pip install "
       "nonexistent-package==9); powering off",
       "\x1b[0;32m  OK  \x1b[0m] Stopped \x1b[0;1;39mssh.service\x1b[0m - OpenSSH server.",
       "[   62.000] systemd-shutdown[1]: Powering off."])


def _connect_within(seconds: float, **settings: Any) -> BaseException | None:
    """``registry.connect`` in a thread that must finish within ``seconds``."""
    box: dict[str, BaseException] = {}

    def run() -> None:
        try:
            registry.connect(aws_config(**settings)).close()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"connect still waiting after {seconds}s"
    return box.get("error")


def test_machine_that_dies_while_booting_fails_fast_with_reason_and_console(aws, api_calls):
    port = dead_port()
    ended: list[str] = []

    def hook(instance: dict) -> tuple[str, int]:
        if not ended:  # the first machine's boot script fails and powers it off
            ended.append(instance["InstanceId"])
            end_instance(instance["InstanceId"], *SELF_SHUTDOWN)
        return "127.0.0.1", port

    def console(operation: str, params: dict, response: Any) -> Any:
        if operation == "GetConsoleOutput":
            response["Output"] = CONSOLE  # as a boto3 client sees it (decoded)
        return response

    provisioner.set_address_hook(hook)
    api_calls.after = console
    start = time.monotonic()
    error = _connect_within(15.0, n=1)  # default wait: boot_timeout, 1200 s
    assert time.monotonic() - start < 10
    assert isinstance(error, BootFailedError), error
    message = str(error)
    assert ended[0] in message and "terminated" in message
    assert "Client.InstanceInitiatedShutdown: Instance initiated shutdown" in message
    assert "uv pip install nonexistent-package==9); powering off" in message
    assert "step 36" in message and "step 35" not in message  # the boot's last 25 lines
    assert "ssh.service" not in message and "\x1b" not in message
    assert "Fix what the console output shows" in message
    consoles = api_calls.of("GetConsoleOutput")
    assert consoles and consoles[0].params == {"InstanceId": ended[0], "Latest": True}
    assert cluster_instances(aws) == []


def test_a_boot_without_the_clients_python_raises_host_python_error_with_the_fix(
        aws, api_calls):
    """The boot found no Python at the client's minor (the image lacks it and uv's
    standalone Python could not be downloaded): the client raises HostPythonError (still a
    BootFailedError) whose advice is the boot's own line: the image's Pythons and the fix."""
    from joblib_cloud.errors import HostPythonError
    from joblib_cloud.providers.aws import userdata

    line = (f"{userdata.NO_PYTHON} 3.11 for the agent: uv's standalone Python 3.11 could not "
            "be downloaded. This image has Python 3.13: run the client on one of those, pass "
            "image_id= of an image that has python3.11, or python= with the path of a "
            "Python 3.11 on it")
    # After the verdict, cloud-init 25 (Debian 13) prints a traceback as the machine stops.
    noise = "".join(f"\r\n[   63.{i:03d}] cloud-init[113]:   Line number: {i}" for i in range(30))
    console = CONSOLE.replace("joblib-cloud: boot failed", line + "\r\n[   61.000] "
                              "cloud-init[113]: joblib-cloud: boot failed") + noise
    ended: list[str] = []

    def hook(instance: dict) -> tuple[str, int]:
        ended.append(instance["InstanceId"])
        end_instance(instance["InstanceId"], *SELF_SHUTDOWN)
        return "127.0.0.1", dead_port()

    def answer(operation: str, params: dict, response: Any) -> Any:
        if operation == "GetConsoleOutput":
            response["Output"] = console
        return response

    provisioner.set_address_hook(hook)
    api_calls.after = answer
    error = _connect_within(15.0, n=1)
    assert isinstance(error, HostPythonError) and isinstance(error, BootFailedError), error
    first = str(error).splitlines()[0]
    assert first.startswith(f"machine {ended[0]} stopped while booting"), first
    assert first.endswith("Instance initiated shutdown). " + line.removeprefix(
        "joblib-cloud: ") + "."), first
    assert "Fix what the console output shows" not in str(error)
    assert str(error).endswith("nonexistent-package==9); powering off"), str(error)
    assert cluster_instances(aws) == []


def test_a_machine_that_dies_while_booting_is_dropped_and_the_call_runs_on_the_others(
        aws, loopback_ec2, monkeypatch):
    """One of three machines fails its boot: the call does not fail, its share runs on the
    other two, and the dead machine is terminated (it was launched by this call)."""
    import getpass
    import sys

    from joblib import Parallel, delayed, parallel_backend

    serve = provisioner.hook("aws", "address")  # loopback_ec2's: a loopback sshd per instance
    dead: list[str] = []

    def hook(instance: dict) -> tuple[str, int]:
        if not dead or instance["InstanceId"] == dead[0]:
            if not dead:
                dead.append(instance["InstanceId"])
                end_instance(instance["InstanceId"], *SELF_SHUTDOWN)
            return "127.0.0.1", dead_port()
        return serve(instance)

    provisioner.set_address_hook(hook)
    settings = dict(provider="aws", n=3, instance="C2", cluster="test", region=REGION,
                    ingress_cidr=CIDR, user=getpass.getuser(), python=sys.executable,
                    workers_per_host=2)
    try:
        with parallel_backend("cloud", **settings):
            out = Parallel()(delayed(pow)(i, 2) for i in range(40))
        assert out == [i * i for i in range(40)]
        cluster = registry.get_cluster(aws_config(**settings))
        assert cluster.wait_until_settled(30)  # the call may end before the last one joins
        assert len(cluster.alive_hosts) == 2 and list(cluster.failures) == dead
        assert isinstance(cluster.failures[dead[0]], BootFailedError)
    finally:
        registry.close_all()
    assert sorted(i["InstanceId"] for i in cluster_instances(
        aws, states=("running",))) == sorted(loopback_ec2)


def test_console_output_without_latest_on_types_that_lack_it(aws, api_calls):
    handle = launch(n=1)
    iid = handle.instance_ids[0]
    end_instance(iid, *SELF_SHUTDOWN)
    api_calls.inject = lambda op, params, n: _unsupported(op) if params.get("Latest") else None
    with pytest.raises(BootFailedError, match=r"(?s)Instance initiated shutdown.*Linux version"):
        handle.boot_check(handle.specs[0])(False, False)
    assert [c.params.get("Latest") for c in api_calls.of("GetConsoleOutput")] == [True, None]


def _unsupported(operation: str) -> Exception:
    from awsmock import client_error

    return client_error("UnsupportedOperation", operation,
                        "This instance type does not support the latest console output")


def test_wait_is_boot_timeout_unless_connect_timeout_is_set(aws):
    assert launch(n=1).connect_timeout == 1200
    assert launch(n=1, boot_timeout=300).connect_timeout == 300
    assert launch(n=1, connect_timeout=60).connect_timeout == 60
    assert aws_config(provider="local").connect_timeout == 60


def test_ssh_wait_that_runs_out_names_the_address_opened_for_ssh(aws):
    port = dead_port()
    provisioner.set_address_hook(lambda instance: ("127.0.0.1", port))
    with pytest.raises(HostConnectError, match=rf"unreachable.*open to {CIDR} only.*"
                                               r"ingress_cidr=.*boot_timeout"):
        registry.connect(aws_config(n=1, connect_timeout=1))
    assert cluster_instances(aws) == []


def test_root_volume_is_at_least_the_image_snapshot(aws, api_calls):
    def bigger_image(operation: str, params: dict, response: Any) -> Any:
        if operation == "DescribeImages":
            for image in response["Images"]:
                for mapping in image.get("BlockDeviceMappings", []):
                    mapping["Ebs"]["VolumeSize"] = 40
        return response

    launch(n=1)
    (run,) = api_calls.of("RunInstances")
    assert run.params["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"] == \
        aws_launch.ROOT_VOLUME_GIB  # moto's image is smaller (15 GiB)
    api_calls.after = bigger_image
    launch(n=2)
    run = api_calls.of("RunInstances")[-1]
    mapping = run.params["BlockDeviceMappings"][0]
    assert mapping["DeviceName"] == "/dev/xvda" and mapping["Ebs"]["VolumeSize"] == 40


def test_metadata_endpoint_is_off_once_the_hosts_have_booted(aws, api_calls, loopback_ec2):
    settings = {"n": 2, "cluster": "imds", "user": getpass.getuser(),
                "python": sys.executable, "workers_per_host": 1}
    try:
        cluster = registry.connect(aws_config(**settings))
        assert cluster.wait_until_settled(60) and len(cluster.hosts) == 2
        found = cluster_instances(aws, "imds", states=("running",))
        assert len(found) == 2
        assert all(i["MetadataOptions"]["HttpEndpoint"] == "disabled" for i in found)
        modified = api_calls.of("ModifyInstanceMetadataOptions")
        assert sorted(c.params["InstanceId"] for c in modified) == \
            sorted(i["InstanceId"] for i in found)
        assert all(h.accepted_logins() >= 1 for h in loopback_ec2.values())
        cluster.close()
        registry.connect(aws_config(**settings)).close()  # re-attached: already off
        assert len(api_calls.of("ModifyInstanceMetadataOptions")) == 2
    finally:
        registry.close_all()


#: A boot whose package install never ends (a stuck mirror, a held apt lock).
STUCK = "\r\n".join([f"[  {i}.000] cloud-init[113]: step {i}" for i in range(5)]
                    + ["[    6.000] cloud-init[113]: joblib-cloud: installing 7 packages"])


@pytest.mark.parametrize("how", ["no progress", "out of time"])
def test_a_boot_that_hangs_is_reported_as_a_boot_with_its_console_and_stopped(
        aws, api_calls, tmp_path, monkeypatch, how):
    """The machine's sshd is up but refuses our key (the boot never got to authorise it):
    the error says it is still booting, with the console's last lines, not network advice;
    with no progress on the console it comes before boot_timeout; the machine is gone."""
    from sshfleet import SSHHost

    from joblib_cloud.providers.aws import machines, sshkeys

    monkeypatch.setattr(machines, "CONSOLE_POLL", 0.2, raising=False)
    monkeypatch.setattr(machines, "BOOT_STALL", 2.0 if how == "no progress" else 3600,
                        raising=False)
    someone_else = sshkeys.generate_ed25519()[1]
    hook = sshd_per_instance(aws, lambda index, _client_pub, **kw: SSHHost(
        tmp_path, 70 + index, someone_else, **kw))
    provisioner.set_address_hook(hook)

    def console(operation: str, params: dict, response: Any) -> Any:
        if operation == "GetConsoleOutput":
            response["Output"] = STUCK
        return response

    api_calls.after = console
    wait = {} if how == "no progress" else {"connect_timeout": 3}
    try:
        error = _connect_within(60.0, n=1, user=getpass.getuser(), python=sys.executable,
                                **wait)
    finally:
        for host in hook.hosts.values():
            host.kill()
    assert isinstance(error, BootFailedError), error
    message = str(error)
    assert ("stuck booting: its console shows no progress" if how == "no progress"
            else "still booting when the wait ran out") in message
    assert "joblib-cloud: installing 7 packages" in message
    assert "not a network problem" in message and "ingress_cidr" not in message
    assert list(hook.hosts)[0] in message  # which machine
    assert cluster_instances(aws, states=("pending", "running")) == []
