"""``joblib_cloud.status()``: the cluster as an object.  Its views (text and HTML) show the
machines as ``joblib-cloud status`` lists them, what this program runs there and the
clocks; ``scale`` and ``down`` act on the real machines."""

from __future__ import annotations

import getpass
import re
import sys

from awsmock import (  # noqa: F401  (fixtures)
    CIDR,
    REGION,
    aws_fixture,
    cluster_instances,
    loopback_ec2_fixture,
)
from joblib import Parallel, delayed, parallel_backend

import joblib_cloud
from joblib_cloud import cli
from joblib_cloud.client import registry


def _pid(_):
    import os

    return os.getpid()


def test_local_cluster_shows_its_hosts_scales_and_goes_down():
    settings = {"provider": "local", "n": 1, "cluster": "handle", "workers_per_host": 1}
    handle = joblib_cloud.status(**settings)
    assert "this program is not connected to it" in repr(handle)
    try:
        with parallel_backend("cloud", **settings):
            Parallel(n_jobs=-1)(delayed(_pid)(i) for i in range(4))
        html = handle._repr_html_()
        assert "local-0" in html and "connected" in html
        assert "1 workers on 1 hosts" in html
        assert handle.scale(n=2) is handle
        assert sorted(h.name for h in handle.connected().alive_hosts) == ["local-0", "local-1"]
        with parallel_backend("cloud", **{**settings, "n": 2}):
            pids = set(Parallel(n_jobs=-1, batch_size=1)(delayed(_pid)(i) for i in range(40)))
        assert len(pids) == 2  # one worker on each of the two hosts
        assert "local-1" in repr(handle) and "2 workers on 2 hosts" in repr(handle)
        assert handle.down() == 0
        assert handle.connected() is None
    finally:
        registry.close_all()


def test_aws_cluster_view_matches_the_cli_status_and_scales_the_machines(aws, loopback_ec2,
                                                                        capsys):
    settings = {"provider": "aws", "n": 1, "instance": "C2", "cluster": "handle",
                "region": REGION, "ingress_cidr": CIDR, "user": getpass.getuser(),
                "python": sys.executable, "workers_per_host": 2, "budget": 5.0}
    handle = joblib_cloud.status(**settings)
    try:
        with parallel_backend("cloud", **settings):
            assert Parallel(n_jobs=-1)(delayed(abs)(-i) for i in range(8)) == list(range(8))
        (machine,) = cluster_instances(aws, "handle", states=("running",))
        iid = machine["InstanceId"]
        html = handle._repr_html_()
        (row,) = handle.machines()
        assert row["instance"] == iid and row["state"] == "running"
        assert row["type"] == "c6i.large" and row["workers"] == "2"
        for value in (iid, "running", "c6i.large", row["usd_per_hour"], row["usd_so_far"]):
            assert value in html
        assert re.search(r"budget \$5\.00: \$0\.\d+ spent so far", html), html
        assert "stops by" in html and "600s without work" in html
        capsys.readouterr()
        assert cli.main(["status", "--cluster", "handle", "--region", REGION]) == 0
        (cli_row,) = [line.split() for line in capsys.readouterr().out.splitlines()
                      if line.startswith("handle ")]
        assert [row[c] for c in ("instance", "state", "type", "usd_per_hour")] == \
            [cli_row[2], cli_row[3], cli_row[4], cli_row[8]]

        handle.scale(n=2)
        running = cluster_instances(aws, "handle", states=("running",))
        assert len(running) == 2 and len(handle.connected().alive_hosts) == 2
        handle.scale(n=1)
        assert [i["InstanceId"] for i in
                cluster_instances(aws, "handle", states=("running",))] == [iid]
        assert [h.name for h in handle.connected().alive_hosts] == [iid]
        assert handle.down() == 0
        assert cluster_instances(aws, "handle", states=("pending", "running")) == []
    finally:
        registry.close_all()
