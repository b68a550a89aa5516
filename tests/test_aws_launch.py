"""The aws provider's launch call: tagged, locked down, self-terminating (moto, in-process)."""

from __future__ import annotations

import os
import stat
import time

import paramiko
import pytest
from awsmock import (  # noqa: F401  (fixtures)
    CIDR,
    api_calls_fixture,
    aws_fixture,
    cluster_instances,
    launch,
    stored_user_data,
    written_file,
)

from joblib_cloud import provisioner
from joblib_cloud.host import watchdog
from joblib_cloud.providers.aws import (
    addresses,
    ec2api,
    instance_types,
    network,
    sshkeys,
    userdata,
)
from joblib_cloud.providers.aws.ec2api import TAG_KEY, AWSError


def _tags(resource) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in resource.get("Tags", [])}


def test_launch_is_tagged_locked_down_and_self_terminating(aws, api_calls):
    handle = launch(n=2, spot=True)
    ec2 = aws

    found = cluster_instances(ec2)
    assert sorted(i["InstanceId"] for i in found) == sorted(handle.instance_ids)
    assert len(found) == 2
    for inst in found:
        assert _tags(inst)[TAG_KEY] == "test"
        assert inst["InstanceType"] == "c6i.large"
        assert inst["MetadataOptions"]["HttpTokens"] == "required"  # IMDSv2 only
        assert inst.get("InstanceLifecycle") == "spot"
        attr = ec2.describe_instance_attribute(InstanceId=inst["InstanceId"],
                                               Attribute="instanceInitiatedShutdownBehavior")
        assert attr["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"
        assert all(m["Ebs"]["DeleteOnTermination"] for m in inst["BlockDeviceMappings"])
    volumes = ec2.describe_volumes(Filters=[{"Name": "attachment.instance-id",
                                             "Values": handle.instance_ids}])["Volumes"]
    assert len(volumes) == 2 and all(_tags(v)[TAG_KEY] == "test" for v in volumes)

    # One security group, tagged at creation, port 22 from the client's CIDR only.
    groups = {g["GroupId"] for i in found for g in i["SecurityGroups"]}
    assert len(groups) == 1
    group = ec2.describe_security_groups(GroupIds=list(groups))["SecurityGroups"][0]
    assert _tags(group)[TAG_KEY] == "test"
    rules = [(p["IpProtocol"], p.get("FromPort"), p.get("ToPort"),
              [r["CidrIp"] for r in p["IpRanges"]], p.get("Ipv6Ranges"))
             for p in group["IpPermissions"]]
    assert rules == [("tcp", 22, 22, [CIDR], [])]

    # Tags were part of the launch call itself, with an idempotency token per launch.
    runs = api_calls.of("RunInstances")
    assert len(runs) == 2
    for run in runs:
        kinds = {spec["ResourceType"] for spec in run.params["TagSpecifications"]}
        assert kinds == {"instance", "volume"}
        assert run.params["ClientToken"]
        assert run.params["InstanceMarketOptions"]["MarketType"] == "spot"
    assert len({r.params["ClientToken"] for r in runs}) == 2
    create_sg = api_calls.of("CreateSecurityGroup")
    assert create_sg[0].params["TagSpecifications"][0]["ResourceType"] == "security-group"


def test_user_data_carries_host_key_client_key_watchdog_and_client_versions(aws):
    handle = launch(n=2, idle_timeout=321, max_lifetime=7200, packages=["tqdm==4.66.1"])
    key_path, client_pub = sshkeys.client_key("us-east-1", "test")
    assert str(key_path) == handle.ssh_key
    assert stat.S_IMODE(os.stat(handle.ssh_key).st_mode) == 0o600
    host_keys = set()
    for spec, iid in zip(handle.specs, handle.instance_ids, strict=True):
        doc = stored_user_data(aws, iid)
        # The host key EC2 will install is the one the client verifies against...
        assert doc["ssh_keys"]["ed25519_public"] == spec.host_key
        private = paramiko.Ed25519Key.from_private_key(
            __import__("io").StringIO(doc["ssh_keys"]["ed25519_private"]))
        assert f"{private.get_name()} {private.get_base64()}" == spec.host_key
        assert doc["ssh_deletekeys"] is True and "ssh_genkeytypes" not in doc
        assert written_file(doc, "/etc/ssh/sshd_config.d/01-joblib-cloud.conf").splitlines()[
            0] == "HostKey /etc/ssh/ssh_host_ed25519_key"
        host_keys.add(spec.host_key)
        # ...and the client's key is authorised only at the end of the boot script.
        assert written_file(doc, userdata.CLIENT_KEY_PATH).strip() == client_pub
        boot = written_file(doc, "/opt/joblib-cloud/boot.sh")
        lines = boot.splitlines()
        authorise = lines.index(next(x for x in lines if x.startswith(
            f"cat {userdata.CLIENT_KEY_PATH}")))
        assert authorise > max(i for i, x in enumerate(lines) if "uv pip install" in x)
        import joblib
        import sklearn
        assert f"joblib=={joblib.__version__}" in boot
        assert f"scikit-learn=={sklearn.__version__}" in boot
        assert "tqdm==4.66.1" in boot
        import platform
        assert "python" + ".".join(platform.python_version_tuple()[:2]) in boot
        unit = written_file(doc, "/etc/systemd/system/joblib-cloud-watchdog.service")
        assert "--idle-timeout 321 " in unit and "--no-client-timeout 120 " in unit
        deadline = int(unit.split("--deadline ")[1].split()[0])
        assert time.time() + 7200 - 120 < deadline <= time.time() + 7200
        assert f"--ready-file {userdata.READY_FILE} " in unit
        assert written_file(doc, "/opt/joblib-cloud/watchdog.py") == (
            __import__("pathlib").Path(watchdog.__file__).read_text())
        assert doc["bootcmd"] == [userdata.hard_stop_command(deadline)]
        assert "AWS_SECRET" not in str(doc) and "testing" not in str(doc)  # no credentials
    assert len(host_keys) == 2  # each host its own key
    assert all(s.user == "ec2-user" and s.port == 22 for s in handle.specs)
    assert stat.S_IMODE(os.stat(handle.known_hosts).st_mode) == 0o600


def test_address_hook_decides_where_ssh_goes(aws):
    seen = []

    def hook(instance):
        seen.append(instance["InstanceId"])
        return "127.0.0.77", 2200 + len(seen)

    provisioner.set_address_hook(hook)
    handle = launch(n=2)
    assert seen == handle.instance_ids
    assert [(s.address, s.port) for s in handle.specs] == [("127.0.0.77", 2201),
                                                            ("127.0.0.77", 2202)]
    known = open(handle.known_hosts).read().splitlines()
    assert known == [f"[127.0.0.77]:{2201 + i} {s.host_key}" for i, s in enumerate(handle.specs)]
    provisioner.set_address_hook(None)
    inst = cluster_instances(aws)[0]
    assert provisioner.hook("aws", "address") is None  # back to the provider's own rule
    assert addresses.address_of(inst) == (inst["PublicIpAddress"], 22)


def test_second_program_reattaches_by_tag_instead_of_launching(aws, api_calls):
    first = launch(n=2)
    assert len(api_calls.of("RunInstances")) == 2
    again = launch(n=2)
    assert sorted(again.instance_ids) == sorted(first.instance_ids)
    assert again.launched_ids == [] and not again.fresh
    keys = {s.label: s.host_key for s in first.specs}
    assert {s.label: s.host_key for s in again.specs} == keys
    assert len(api_calls.of("RunInstances")) == 2  # nothing new launched
    grown = launch(n=3)
    assert sorted(grown.instance_ids[:2]) == sorted(first.instance_ids)
    assert len(grown.launched_ids) == 1
    assert len(cluster_instances(aws)) == 3


def test_reattach_refuses_a_cluster_of_another_type(aws):
    launch(n=1, instance="C2")
    with pytest.raises(AWSError, match=r"already runs c6i.large .*joblib-cloud down --cluster"):
        launch(n=1, instance="M4")


def test_unknown_alias_lists_the_valid_ones(aws, api_calls):
    with pytest.raises(ValueError, match=r"unknown instance alias 'C5'.*C2, C4, C8, C16"):
        launch(instance="C5")
    with pytest.raises(ValueError, match=r"'c6i.5xlarge'.*not offered.*Valid aliases: C2"):
        launch(instance="c6i.5xlarge")
    assert api_calls.of("RunInstances") == []
    assert instance_types.resolve_name("r32") == ("r6i.8xlarge", "R32")
    assert launch(instance="t3.micro", n=1).specs


def test_cost_is_shown_before_launching(aws, api_calls, caplog):
    caplog.set_level("INFO", logger="joblib_cloud")
    order = []
    api_calls.inject = lambda op, params, n: order.append(
        ("run", len(caplog.records))) if op == "RunInstances" else None
    launch(n=3, instance="C16")
    lines = [r.getMessage() for r in caplog.records]
    cost = next(i for i, line in enumerate(lines)
                if "$2.04/h (estimate: built-in us-east-1 list price)" in line)
    assert "3 x C16 = c6i.4xlarge (16 vCPU, 32 GiB)" in lines[cost]
    assert order and order[0][1] > cost


def test_no_credentials_says_how_to_set_them(monkeypatch):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                "AWS_SECURITY_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(AWSError, match=r"no AWS credentials.*aws configure.*AWS_PROFILE"
                                       r".*AWS_ACCESS_KEY_ID"):
        launch()
    with pytest.raises(AWSError, match="no AWS region"):
        ec2api.session(None)


def test_client_address_unknown_asks_for_ingress_cidr(aws, api_calls, monkeypatch):
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(network, "CHECKIP_URL", f"http://127.0.0.1:{port}/")
    with pytest.raises(AWSError, match=r"ingress_cidr='203.0.113.7/32'.*JOBLIB_CLOUD_INGRESS"):
        launch(ingress_cidr=None)
    assert api_calls.of("RunInstances") == []
    assert aws.describe_security_groups(
        Filters=ec2api.cluster_filter("test"))["SecurityGroups"] == []


@pytest.mark.parametrize("python, prepared", [
    ("/opt/python3.11/bin/python3", True),
    ("python3", True),
    ("env OMP_PROC_BIND=true /opt/joblib-cloud/venv/bin/python", False),
    (userdata.HOST_PYTHON, False),
])
def test_python_on_aws_is_the_interpreter_the_boot_installs_into(aws, python, prepared):
    """python= naming one interpreter of the image: the boot checks its minor, installs the
    client's packages into it and makes no venv; a command line or the venv's own
    interpreter keeps the venv."""
    handle = launch(n=1, python=python)
    boot = written_file(stored_user_data(aws, handle.instance_ids[0]),
                        "/opt/joblib-cloud/boot.sh")
    makes_venv = f"uv venv --quiet --python \"$PYTHON\" {userdata.VENV}" in boot
    assert makes_venv is not prepared, boot
    if prepared:
        import shlex
        assert f"GIVEN={shlex.quote(python)}\n" in boot
        assert 'uv pip install --quiet --python "$PYTHON" --break-system-packages ' in boot
        assert f"chown -R ec2-user: {userdata.VENV}" not in boot
    else:
        assert f"uv pip install --quiet --python {userdata.HOST_PYTHON} " in boot


@pytest.mark.parametrize("variant", [{}, {"packages": ("xgboost==2.1.0", "tqdm")},
                                     {"python": "/usr/bin/python3.11"},
                                     {"image": "python:3.11-slim"}], ids=str)
def test_every_user_data_variant_leaves_room_under_ec2s_limit(tmp_path, variant):
    """EC2 takes 16 KiB of user-data: what the provider writes itself (the shipped
    scripts go compressed) leaves at least 4 KiB for a requirements file."""
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("".join(f"package-number-{i:04d}==1.0.0\n" for i in range(152)))
    assert len(requirements.read_bytes()) >= 4096
    keys = sshkeys.generate_ed25519()
    text = userdata.build(user="ec2-user", host_private_key=keys[0], host_public_key=keys[1],
                          client_public_key=keys[1], idle_timeout=600, max_lifetime=43200,
                          shutdown_command="sudo shutdown -h now",
                          requirements_path=str(requirements), **variant)
    assert len(text.encode()) <= userdata.MAX_USER_DATA
