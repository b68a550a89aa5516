"""Fewer machines: ``CloudCluster.scale(n)`` terminates the newest beyond ``n`` (the
launch re-attaches to the oldest first, ``launch._existing``), then launches any missing."""

from __future__ import annotations

import logging

from ...config import CloudConfig
from . import ec2api, teardown
from .machines import LIVE_STATES

log = logging.getLogger("joblib_cloud")


def terminate_beyond(config: CloudConfig) -> list[str]:
    ec2 = ec2api.session(config.region).client("ec2")
    found = ec2api.describe_instances(ec2, config.cluster, LIVE_STATES)
    found.sort(key=lambda i: (i.get("LaunchTime") or 0, i["InstanceId"]))
    extra = [i["InstanceId"] for i in found[config.n:]]
    if extra and not teardown.terminate_ids(ec2, extra, log.info):
        raise ec2api.AWSError(f"could not terminate {', '.join(extra)}: run `joblib-cloud "
                              f"down --cluster {config.cluster}` to remove the cluster")
    return extra
