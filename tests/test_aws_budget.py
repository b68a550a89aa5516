"""``budget=``: refused before a launch when it cannot cover a boot and the idle time,
held by each machine's own kill switch, and by the client, which stops the machines and
fails the call at the cap (moto; the hosts are loopback sshd servers)."""

from __future__ import annotations

import getpass
import sys
import time

import pytest
from awsmock import (  # noqa: F401  (fixtures)
    CIDR,
    REGION,
    api_calls_fixture,
    aws_fixture,
    cluster_instances,
    launch,
    loopback_ec2_fixture,
    stored_user_data,
    written_file,
)
from joblib import Parallel, delayed, parallel_backend

from joblib_cloud.client import registry
from joblib_cloud.errors import BudgetExceededError
from joblib_cloud.providers.aws import budget, instance_types, userdata
from joblib_cloud.providers.aws.ec2api import AWSError

PRICE = instance_types.hourly_price("c6i.large", 2)  # moto: the built-in estimate


def test_a_budget_too_small_for_a_boot_and_the_idle_time_is_refused_before_launch(
        aws, api_calls):
    need = 2 * PRICE * (budget.BOOT_SECONDS + 600) / 3600
    with pytest.raises(AWSError, match=rf"budget=\$0.0100 cannot cover 2 x c6i.large.*"
                                       rf"at least \${need:.2f}.*Raise budget="):
        launch(n=2, budget=0.01)
    assert api_calls.of("RunInstances") == []
    assert cluster_instances(aws) == []


def test_each_machine_s_kill_switch_gets_the_lifetime_its_share_buys(aws):
    handle = launch(n=2, budget=1.0)
    seconds = int(1.0 / (2 * PRICE) * 3600)  # each machine's half, at its price
    for iid in handle.instance_ids:
        doc = stored_user_data(aws, iid)
        assert f"sleep {seconds};" in doc["bootcmd"][0][-1]
        unit = written_file(doc, "/etc/systemd/system/joblib-cloud-watchdog.service")
        assert f"--max-lifetime {1.0 / (2 * PRICE) * 3600:g} " in unit
    assert userdata.hard_stop_command(43200) != doc["bootcmd"][0]


def test_the_client_stops_the_machines_and_fails_the_call_at_the_cap(
        aws, loopback_ec2, monkeypatch, caplog):
    monkeypatch.setattr(budget, "POLL", 0.2)
    monkeypatch.setattr(budget, "BOOT_SECONDS", 1.0)
    cap = PRICE * 6 / 3600  # six seconds of one machine
    settings = dict(provider="aws", n=1, instance="C2", cluster="capped", region=REGION,
                    ingress_cidr=CIDR, user=getpass.getuser(), python=sys.executable,
                    workers_per_host=2, budget=cap, idle_timeout=1)
    start = time.monotonic()
    try:
        with pytest.raises(BudgetExceededError,
                           match=r"reached its budget: \$0.000[0-9] of \$0.0001 "):
            with parallel_backend("cloud", **settings):
                Parallel()(delayed(time.sleep)(60) for _ in range(2))
    finally:
        registry.close_all()
    assert time.monotonic() - start < 30
    assert cluster_instances(aws, "capped", states=("pending", "running")) == []
    assert any("of its $0.0001 budget" in r.getMessage() for r in caplog.records)  # at 80 %
    with pytest.raises(BudgetExceededError, match="earlier in this program"):
        with parallel_backend("cloud", **settings):
            Parallel()(delayed(abs)(1) for _ in range(2))
    budget.exhausted.discard("capped")
