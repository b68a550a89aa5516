"""``budget=``: a dollar cap for a cluster, held by the machines and by the client.

Before a launch, a budget that cannot pay for the machines to boot and then sit out their
``idle_timeout`` is refused, with the minimum it would take; what the cluster's running
machines (re-attached) already spent comes off first.  Each machine's own kill switch
gets the lifetime its share of the budget buys at the price of what was launched (spot,
or the on-demand fallback), so the cap holds even when the client is gone.  While a
client is attached, it adds up the spend (each machine's own price times its time since
launch), warns at 80 % and, at the cap, terminates the machines and fails the running
call with :class:`BudgetExceededError`.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from datetime import datetime, timezone
from typing import Any

from ...client.board import usd
from ...config import CloudConfig
from ...errors import BudgetExceededError
from . import prices, teardown
from .ec2api import AWSError
from .instance_types import InstanceType

log = logging.getLogger("joblib_cloud")

#: What a boot is allowed in the minimum a budget must cover (the install takes less).
BOOT_SECONDS = 300.0
WARN_AT = 0.8
#: Seconds between the client's spend checks (tests shorten it).
POLL = 5.0
#: Clusters that reached their budget in this program: not launched again.
exhausted: set[str] = set()


def market_price(sess: Any, ec2: Any, spot: bool, itype: InstanceType) -> prices.Price:
    """One machine's price at launch: the spot price for spot, else on-demand."""
    return (prices.spot(ec2, itype.name) if spot else None) or prices.on_demand(
        sess, sess.region_name, itype.name, itype.vcpus)


def launch_price(sess: Any, ec2: Any, spot: bool, itype: InstanceType) -> float | None:
    """One machine's USD/h at launch: the spot price for spot, else on-demand."""
    return market_price(sess, ec2, spot, itype).usd_per_hour


def hourly_price(sess: Any, ec2: Any, config: CloudConfig, itype: InstanceType) -> float:
    """:func:`launch_price` for a budget: an error when it is unknown, or when this
    cluster already spent its budget in this program; a warning when it is only the
    built-in estimate (the budget then holds at that price, not the bill's)."""
    if config.cluster in exhausted:
        raise BudgetExceededError(
            f"cluster {config.cluster!r} reached its budget earlier in this program: raise "
            "budget= (or use another cluster= name) to launch it again")
    price = market_price(sess, ec2, config.spot, itype)
    if price.usd_per_hour is None:
        raise AWSError(f"budget= needs the price of {itype.name}, and none is known: pass "
                       "an instance= of the C/M/R families, or unset budget=")
    if price.estimate:
        log.warning("budget=%s: no AWS price list answer here, so the machines' lifetimes "
                    "are computed from the built-in estimate for %s (%s): the bill may "
                    "differ. Allow pricing:GetProducts for prices of this region.",
                    usd(float(config.budget or 0)), itype.name, price.text())
    return price.usd_per_hour


def share(config: CloudConfig, itype: InstanceType, usd_per_hour: float,
          spent: float = 0.0) -> float:
    """Dollars each of ``config.n`` machines may spend, once ``spent`` (by the machines
    already running) is off the budget; an error when that cannot cover a boot and the
    idle time at ``usd_per_hour``."""
    budget, n = float(config.budget or 0), config.n
    minimum = n * usd_per_hour * (BOOT_SECONDS + config.idle_timeout) / 3600
    left = budget - spent
    if left < minimum:
        already = f" ({usd(spent)} already spent by its running machines)" if spent else ""
        raise AWSError(
            f"budget={usd(budget)}{already} cannot cover {n} x {itype.name} at "
            f"${usd_per_hour:.4f}/h booting ({BOOT_SECONDS / 60:.0f} min) and then idling "
            f"for idle_timeout ({config.idle_timeout:.0f}s): it takes at least "
            f"{usd(minimum)}. Raise budget=, lower idle_timeout=, or use fewer or smaller "
            "machines (n=, instance=).")
    return left / n


def lifetime(config: CloudConfig, dollars: float, usd_per_hour: float) -> float:
    """Seconds a machine at ``usd_per_hour`` may live on ``dollars`` (at most
    ``max_lifetime``)."""
    return min(config.max_lifetime, dollars / usd_per_hour * 3600)


def spend(usd_per_hour: dict[str, float], launched: dict[str, datetime]) -> float:
    """What machines launched at these times have cost so far, each at its own price."""
    now = datetime.now(timezone.utc)
    return sum(usd_per_hour.get(iid, 0.0) * max((now - t).total_seconds(), 0) / 3600
               for iid, t in launched.items())


class Watch:
    """The client's side of the cap, for one connected cluster."""

    def __init__(self, cluster: Any, ec2: Any, budget: float, usd_per_hour: dict[str, float],
                 launched: dict[str, datetime]) -> None:
        self.cluster, self.ec2 = cluster, ec2
        self.budget, self.usd_per_hour, self.launched = budget, usd_per_hour, launched
        self.warned = False
        threading.Thread(target=self._run, daemon=True,
                         name=f"joblib-cloud-budget-{cluster.config.cluster}").start()

    def spend(self) -> float:
        return spend(self.usd_per_hour, self.launched)

    def _run(self) -> None:
        # Stop when the next check would be past the cap: the machines' own timers fire
        # at the cap itself, and the call must end with this error, not a lost host.
        ahead = sum(self.usd_per_hour.get(i, 0.0) for i in self.launched) * POLL / 3600
        while not self.cluster.closed:
            spent = self.spend()
            if spent + ahead >= self.budget:
                self._stop(spent)
                return
            if spent >= WARN_AT * self.budget and not self.warned:
                self.warned = True
                message = (f"cluster {self.cluster.config.cluster!r} has spent "
                           f"{usd(spent)} of its {usd(self.budget)} budget: it stops at "
                           "the cap")
                log.warning(message)
                warnings.warn(message, RuntimeWarning, stacklevel=1)
            time.sleep(POLL)

    def _stop(self, spent: float) -> None:
        exhausted.add(self.cluster.config.cluster)
        ids = list(self.launched)
        try:
            teardown.terminate_ids(self.ec2, ids, log.info, timeout=60.0)
        except Exception as exc:  # noqa: BLE001 - the machines' own kill switch still holds
            log.warning("could not terminate %s at the budget cap (%s): their own kill "
                        "switch stops them; `joblib-cloud down` removes them now", ids, exc)
        hourly = sum(self.usd_per_hour.get(i, 0.0) for i in ids)
        self.cluster.fail_everything(BudgetExceededError(
            f"cluster {self.cluster.config.cluster!r} reached its budget: {usd(spent)} of "
            f"{usd(self.budget)} spent ({len(ids)} machines at ${hourly:.4f}/h together); "
            "its machines were told to stop. Raise budget= to go on."))
