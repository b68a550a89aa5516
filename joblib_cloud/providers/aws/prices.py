"""What a machine costs per hour where it launches.

On-demand prices come from the AWS Price List API for the region in use (cached on disk
for a day: they change a few times a year), spot prices from the spot price history of the
zones the machines may land in.  When neither can be asked (no ``pricing:GetProducts``
permission, no network), the built-in table of us-east-1 list prices stands in, and every
figure shown from it says it is an estimate.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import time
from datetime import datetime, timezone
from typing import Any

from ...config import home_dir, write_private
from . import instance_types
from .ec2api import call

log = logging.getLogger("joblib_cloud")

#: The Price List API answers from a few regions only; its prices cover every region.
PRICING_REGION = "us-east-1"
CACHE_SECONDS = 24 * 3600
LIST = "AWS Price List"
ESTIMATE = "estimate: built-in us-east-1 list price"


@dataclasses.dataclass(frozen=True)
class Price:
    usd_per_hour: float | None
    source: str

    @property
    def estimate(self) -> bool:
        return self.source == ESTIMATE

    def text(self, count: int = 1) -> str:
        if self.usd_per_hour is None:
            return "price unknown"
        note = f" ({ESTIMATE})" if self.estimate else ""
        return f"${self.usd_per_hour * count:.2f}/h{note}"


def on_demand(sess: Any, region: str, type_name: str, vcpus: int | None = None) -> Price:
    """The on-demand hourly price of ``type_name`` (Linux, shared tenancy) in ``region``."""
    key = f"{region}/{type_name}"
    cache = _read_cache()
    hit = cache.get(key)
    if hit and time.time() - hit[1] < CACHE_SECONDS:
        return Price(hit[0], LIST)
    try:
        usd = _price_list(sess, region, type_name)
    except Exception as exc:  # noqa: BLE001 - no permission, no network: the estimate
        log.info("no Price List answer for %s in %s (%s): using the built-in estimate",
                 type_name, region, exc)
        usd = None
    if usd is None:
        estimate = (instance_types.hourly_price(type_name, vcpus) if vcpus
                    else instance_types.type_price(type_name))
        return Price(estimate, ESTIMATE)
    cache[key] = [usd, time.time()]
    write_private(home_dir() / "prices.json", json.dumps(cache))
    return Price(usd, LIST)


def spot(ec2: Any, type_name: str, zones: list[str] | None = None) -> Price | None:
    """The median current spot price of ``type_name`` over ``zones`` (all zones when
    None), from the spot price history; None when EC2 lists none."""
    try:
        history = call(ec2.describe_spot_price_history, "look up spot prices",
                       InstanceTypes=[type_name], ProductDescriptions=["Linux/UNIX"],
                       StartTime=datetime.now(timezone.utc))["SpotPriceHistory"]
    except Exception as exc:  # noqa: BLE001 - shown as unknown, the launch goes on
        log.info("no spot price history for %s (%s)", type_name, exc)
        return None
    latest: dict[str, float] = {}
    for entry in sorted(history, key=lambda e: e["Timestamp"]):
        if zones is None or entry["AvailabilityZone"] in zones:
            latest[entry["AvailabilityZone"]] = float(entry["SpotPrice"])
    if not latest:
        return None
    return Price(statistics.median(latest.values()), "spot price history")


def _price_list(sess: Any, region: str, type_name: str) -> float | None:
    pricing = sess.client("pricing", region_name=PRICING_REGION)
    terms = {"instanceType": type_name, "regionCode": region, "operatingSystem": "Linux",
             "tenancy": "Shared", "preInstalledSw": "NA", "capacitystatus": "Used",
             "licenseModel": "No License required"}
    response = call(pricing.get_products, "look up on-demand prices", ServiceCode="AmazonEC2",
                    Filters=[{"Type": "TERM_MATCH", "Field": field, "Value": value}
                             for field, value in terms.items()], MaxResults=10)
    for item in response.get("PriceList", []):
        product = json.loads(item) if isinstance(item, str) else item
        for term in product.get("terms", {}).get("OnDemand", {}).values():
            for dimension in term.get("priceDimensions", {}).values():
                usd = float(dimension.get("pricePerUnit", {}).get("USD", 0) or 0)
                if usd > 0:
                    return usd
    return None


def _read_cache() -> dict[str, list[float]]:
    try:
        return json.loads((home_dir() / "prices.json").read_text())
    except (OSError, ValueError):
        return {}
