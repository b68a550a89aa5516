"""``budget=``: refused before a launch when it cannot cover a boot and the idle time,
held by each machine's own kill switch, and by the client, which stops the machines and
fails the call at the cap (moto; the hosts are loopback sshd servers)."""

from __future__ import annotations

import getpass
import sys
import time
from datetime import datetime, timedelta, timezone

import pytest
from awsmock import (  # noqa: F401  (fixtures)
    CIDR,
    REGION,
    api_calls_fixture,
    aws_fixture,
    client_error,
    cluster_instances,
    launch,
    loopback_ec2_fixture,
    stored_user_data,
    written_file,
)
from joblib import Parallel, delayed, parallel_backend

from joblib_cloud.client import registry
from joblib_cloud.errors import BudgetExceededError
from joblib_cloud.providers.aws import budget, instance_types
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


def _deadline(doc: dict) -> float:
    """The absolute end of a machine's lifetime, as its user-data holds it: the kill
    switch's ``--deadline``, and the same in the bootcmd's hard stop."""
    unit = written_file(doc, "/etc/systemd/system/joblib-cloud-watchdog.service")
    deadline = int(unit.split("--deadline ")[1].split()[0])
    assert f"left=$(({deadline} - $(date +%s)))" in doc["bootcmd"][0][-1]
    return deadline


def test_each_machine_s_kill_switch_gets_the_lifetime_its_share_buys(aws):
    start = time.time()
    handle = launch(n=2, budget=1.0)
    seconds = 1.0 / (2 * PRICE) * 3600  # each machine's half, at its price
    for iid in handle.instance_ids:
        assert start + seconds - 1 <= _deadline(stored_user_data(aws, iid)) <= \
            time.time() + seconds
    assert handle.usd_per_hour == {iid: PRICE for iid in handle.instance_ids}


SPOT = PRICE / 4


def _spot_history(operation, params, response):
    if operation == "DescribeSpotPriceHistory":
        response["SpotPriceHistory"] = [
            {"AvailabilityZone": f"{REGION}a", "InstanceType": params["InstanceTypes"][0],
             "ProductDescription": "Linux/UNIX", "SpotPrice": f"{SPOT:.6f}",
             "Timestamp": datetime.now(timezone.utc)}]
    return response


def test_an_on_demand_fallback_gets_the_lifetime_of_the_on_demand_price(aws, api_calls):
    """No spot capacity: the on-demand machines' kill switches hold the budget at the
    on-demand price (not the 4x longer lifetime the spot price would buy)."""
    api_calls.after = _spot_history
    api_calls.inject = lambda op, params, n: client_error(
        "InsufficientInstanceCapacity", op, "no spot capacity") \
        if op == "RunInstances" and "InstanceMarketOptions" in params else None
    start = time.time()
    handle = launch(n=2, spot=True, budget=1.0)
    seconds = 1.0 / (2 * PRICE) * 3600
    for iid in handle.instance_ids:
        assert start + seconds - 1 <= _deadline(stored_user_data(aws, iid)) <= \
            time.time() + seconds
    assert handle.usd_per_hour == {iid: PRICE for iid in handle.instance_ids}


def test_a_re_attached_cluster_s_spend_comes_off_the_budget(aws, api_calls):
    first = launch(n=1, budget=1.0).instance_ids[0]
    hours = 0.5 / PRICE  # so that machine has spent $0.50 of the $1.00
    launched = datetime.now(timezone.utc) - timedelta(hours=hours)

    def older(operation, params, response):
        for reservation in response.get("Reservations", []) if operation == \
                "DescribeInstances" else []:
            for inst in reservation["Instances"]:
                if inst["InstanceId"] == first:
                    inst["LaunchTime"] = launched
        return response

    api_calls.after = older
    start = time.time()
    handle = launch(n=2, budget=1.0)
    new = [i for i in handle.instance_ids if i != first]
    assert len(new) == 1
    seconds = 0.5 / 2 / PRICE * 3600  # the $0.50 left, shared by the 2 machines
    assert start + seconds - 1 <= _deadline(stored_user_data(aws, new[0])) <= \
        time.time() + seconds


def test_a_budget_on_the_built_in_estimate_says_so_before_launching(aws, api_calls, caplog):
    said_at_launch = []

    def note(operation, params, n):
        if operation == "RunInstances":
            said_at_launch.append([r.getMessage() for r in caplog.records
                                   if "built-in estimate" in r.getMessage()])

    api_calls.inject = note
    with caplog.at_level("WARNING", logger="joblib_cloud"):
        launch(n=1, budget=1.0)  # moto answers no Price List request
    assert len(said_at_launch) == 1 and len(said_at_launch[0]) == 1, said_at_launch
    assert "c6i.large" in said_at_launch[0][0] and "bill may differ" in said_at_launch[0][0]


def test_the_client_stops_the_machines_and_fails_the_call_at_the_cap(
        aws, loopback_ec2, monkeypatch, caplog):
    monkeypatch.setattr(budget, "POLL", 0.2)
    monkeypatch.setattr(budget, "BOOT_SECONDS", 1.0)
    cap = PRICE * 6 / 3600  # six seconds of one machine
    settings = dict(provider="aws", n=1, instance="C2", cluster="capped", region=REGION,
                    ingress_cidr=CIDR, user=getpass.getuser(), python=sys.executable,
                    workers_per_host=2, budget=cap, idle_timeout=4)
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
