"""Prices that are true for the launch: on-demand from the Price List for the region in
use, spot from the spot price history, the built-in table only as a labelled estimate.
moto implements neither the Price List API nor real spot prices: a double around
botocore answers as AWS does."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import boto3
from awsmock import (  # noqa: F401  (fixtures)
    api_calls_fixture,
    aws_config,
    aws_fixture,
    loopback_ec2_fixture,
)

from joblib_cloud.providers.aws import instance_types, launch, prices

#: On-demand USD/h as the Price List would say, per (region, type).
LIST_PRICES = {("us-east-1", "c6i.large"): 0.085, ("eu-west-1", "c6i.large"): 0.0962,
               ("eu-west-1", "c6i.4xlarge"): 0.7696}


def price_list(operation: str, params: dict):
    """``GetProducts`` as the Price List API answers it (a JSON document per product)."""
    if operation != "GetProducts":
        return None
    terms = {f["Field"]: f["Value"] for f in params["Filters"]}
    usd = LIST_PRICES.get((terms["regionCode"], terms["instanceType"]))
    if usd is None:
        return {"PriceList": [], "FormatVersion": "aws_v1"}
    product = {"product": {"attributes": terms},
               "terms": {"OnDemand": {"T1": {"priceDimensions": {"D1": {
                   "unit": "Hrs", "pricePerUnit": {"USD": f"{usd:.10f}"}}}}}}}
    return {"PriceList": [json.dumps(product)], "FormatVersion": "aws_v1"}


def _itype(name: str) -> instance_types.InstanceType:
    vcpus = {"c6i.large": 2, "c6i.4xlarge": 16}[name]
    return instance_types.InstanceType(name, vcpus, vcpus * 2.0, alias=f"C{vcpus}")


def test_the_price_shown_is_the_region_s_price_list_price(aws, api_calls):
    api_calls.respond = price_list
    shown = {}
    for region in ("us-east-1", "eu-west-1"):
        sess = boto3.session.Session(region_name=region)
        shown[region] = launch.announcement(sess, sess.client("ec2"),
                                            aws_config(region=region), _itype("c6i.large"), 2)
    assert shown["us-east-1"] == ("2 x C2 = c6i.large (2 vCPU, 4 GiB) on-demand in "
                                  "us-east-1: $0.17/h")
    assert shown["eu-west-1"] == ("2 x C2 = c6i.large (2 vCPU, 4 GiB) on-demand in "
                                  "eu-west-1: $0.19/h")
    asked = [c.params for c in api_calls.of("GetProducts")]
    assert {f["Value"] for p in asked for f in p["Filters"]
            if f["Field"] == "regionCode"} == {"us-east-1", "eu-west-1"}
    # Cached for a day: asking again asks nobody.
    sess = boto3.session.Session(region_name="eu-west-1")
    assert prices.on_demand(sess, "eu-west-1", "c6i.large") == prices.Price(0.0962,
                                                                           prices.LIST)
    assert len(api_calls.of("GetProducts")) == 2


def test_spot_price_comes_from_the_spot_history_beside_the_on_demand_one(aws, api_calls):
    api_calls.respond = price_list
    now = datetime.now(timezone.utc)

    def history(operation, params, response):
        if operation == "DescribeSpotPriceHistory":
            response["SpotPriceHistory"] = [
                {"AvailabilityZone": zone, "InstanceType": params["InstanceTypes"][0],
                 "ProductDescription": "Linux/UNIX", "SpotPrice": price, "Timestamp": now}
                for zone, price in (("eu-west-1a", "0.2480"), ("eu-west-1b", "0.2510"),
                                    ("eu-west-1c", "0.2600"))]
        return response

    api_calls.after = history
    sess = boto3.session.Session(region_name="eu-west-1")
    text = launch.announcement(sess, sess.client("ec2"),
                               aws_config(region="eu-west-1", spot=True),
                               _itype("c6i.4xlarge"), 16)
    assert text == ("16 x C16 = c6i.4xlarge (16 vCPU, 32 GiB) spot in eu-west-1: "
                    "$4.02/h (on-demand $12.31/h)")  # median of the zones


def test_without_the_price_list_the_built_in_price_is_labelled_an_estimate(aws, api_calls):
    sess = boto3.session.Session(region_name="eu-west-1")  # moto: GetProducts fails
    price = prices.on_demand(sess, "eu-west-1", "c6i.large", 2)
    assert price.estimate and price.usd_per_hour == instance_types.hourly_price("c6i.large", 2)
    assert price.text(2) == "$0.17/h (estimate: built-in us-east-1 list price)"


def test_status_shows_spend_so_far_and_cost_adds_up_each_cluster(aws, capsys):
    import json as json_module

    from awsmock import launch as launch_cluster

    from joblib_cloud import cli
    from joblib_cloud.providers.aws import ledger

    handles = [launch_cluster(n=2, cluster="alpha"), launch_cluster(n=1, cluster="beta")]
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    assert "usd_so_far" in out and "spent on them so far" in out
    # One machine of alpha stops: EC2 records when; cost counts it up to then.
    ec2 = boto3.client("ec2", region_name="us-east-1")
    ec2.terminate_instances(InstanceIds=[handles[0].instance_ids[0]])
    assert cli.main(["cost", "--json"]) == 0
    rows = {r["cluster"]: r for r in json_module.loads(capsys.readouterr().out)}
    assert rows["alpha"]["machines"] == 2 and rows["alpha"]["running"] == 1
    assert rows["beta"]["machines"] == 1 and rows["beta"]["running"] == 1
    assert all(r["usd"] >= 0 and r["region"] == "us-east-1" for r in rows.values())
    entries = ledger.read()
    assert entries[handles[0].instance_ids[0]]["ended"] is not None
    assert entries[handles[0].instance_ids[0]]["usd_per_hour"] == \
        instance_types.hourly_price("c6i.large", 2)
    assert cli.main(["cost"]) == 0
    table = capsys.readouterr().out
    assert "alpha" in table and "beta" in table and "in the last 30 days" in table


def test_the_progress_line_shows_what_the_fleet_has_cost_so_far(aws, loopback_ec2, caplog):
    import getpass
    import sys

    from joblib_cloud.client import registry

    caplog.set_level("INFO", logger="joblib_cloud")
    settings = dict(n=2, cluster="spend", user=getpass.getuser(), python=sys.executable,
                    workers_per_host=1)
    try:
        cluster = registry.connect(aws_config(**settings))
        assert cluster.wait_until_settled(60)
    finally:
        registry.close_all()
    ready = [r.getMessage() for r in caplog.records if "hosts ready" in r.getMessage()]
    assert ready and all(line.endswith(" so far") and ", $0.00 so far" in line
                         for line in ready), ready
