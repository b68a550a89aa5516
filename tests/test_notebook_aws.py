"""The notebook display of an ``aws`` fleet shows the money: the price line before the
launch, ``$ so far`` while it runs and the call's cost in its summary.  EC2 is moto and
each instance a loopback sshd (``awsmock``); the display is what ``IPython.display``
is asked to show, recorded by a stand-in for it (this process is no kernel)."""

from __future__ import annotations

import getpass
import re
import sys
import time

from awsmock import (  # noqa: F401  (fixtures)
    CIDR,
    REGION,
    aws_fixture,
    loopback_ec2_fixture,
)
from displays import Shown
from joblib import Parallel, delayed, parallel_backend

from joblib_cloud.client import registry
from joblib_cloud.client.progress import Progress


def _square(i):
    time.sleep(0.3)  # 20 tasks on 4 workers: the call lasts long enough to cost $0.0001
    return i * i


def test_an_aws_call_shows_its_price_its_spend_and_its_cost(aws, loopback_ec2, monkeypatch,
                                                            tmp_path):
    shown = Shown().install(monkeypatch)
    states: list[tuple[str, str]] = []  # every state each host was reported in
    real_host = Progress.host

    def host(self, name, state, *args, **kwargs):
        states.append((name, state))
        return real_host(self, name, state, *args, **kwargs)

    monkeypatch.setattr(Progress, "host", host)
    settings = {"provider": "aws", "n": 2, "instance": "C2", "cluster": "money",
                "region": REGION, "ingress_cidr": CIDR, "user": getpass.getuser(),
                "python": sys.executable, "workers_per_host": 2}
    try:
        with parallel_backend("cloud", **settings):
            assert Parallel(n_jobs=-1)(delayed(_square)(i) for i in range(20)) == \
                [i * i for i in range(20)]
    finally:
        registry.close_all()
    pages = [b["text/html"] for b in shown.bundles]
    assert any("launching 2 x C2 = c6i.large" in p and "/h" in p for p in pages), pages[:3]
    ids = sorted(loopback_ec2)
    def seen(iid: str, state: str) -> bool:
        return any(re.search(re.escape(iid) + r"</code></td><td[^>]*>" + state, p)
                   for p in pages)

    # Each host is reported booting, then ready; the display (refreshed a few times a
    # second, so a short state may pass between two pictures) ends showing each ready.
    assert len(ids) == 2 and all((i, "booting") in states and (i, "ready") in states
                                 for i in ids), states
    assert any(seen(i, "booting") or seen(i, "ready") for i in ids)  # hosts in the view
    assert all(states.index((i, "booting")) < states.index((i, "ready")) for i in ids)
    spent = [float(m.group(1)) for p in pages if (m := re.search(r"\$(0\.\d{4}) so far", p))]
    assert spent == sorted(spent) and spent[-1] > 0, spent  # 2 x $0.17/h, for seconds
    summary = shown.bundles[-1]
    assert "joblib-cloud-summary" in summary["text/html"]
    cost = re.fullmatch(r"joblib-cloud: 20 tasks in [\d.]+s on [12] of 2 hosts, \$(0\.\d{4})",
                        summary["text/plain"])
    assert cost and 0 < float(cost.group(1)) < 0.01, summary["text/plain"]
    # a picture of the live view with its money, next to the summary (CI artifact)
    live = [p for p in pages if "joblib-cloud-live" in p and "so far" in p]
    page = tmp_path / "aws-display.html"
    page.write_text(f"<html><body>{live[len(live) // 2]}<br>{pages[-1]}</body></html>")
    from kernel import photograph

    assert photograph(page, tmp_path / "aws-display.png", tmp_path / "chromium",
                      size="900,600").stat().st_size > 10_000


def test_in_ci_only_the_price_line_shows_once(aws, loopback_ec2, capfd):
    """stderr is no terminal here and no kernel runs: the launch says what it costs, once,
    and nothing else (no stage lines, no summary)."""
    settings = {"provider": "aws", "n": 2, "instance": "C2", "cluster": "quiet",
                "region": REGION, "ingress_cidr": CIDR, "user": getpass.getuser(),
                "python": sys.executable, "workers_per_host": 1}
    try:
        for _ in range(2):  # the second call reuses the machines: no launch, no line
            with parallel_backend("cloud", **settings):
                assert Parallel(n_jobs=-1)(delayed(_square)(i) for i in range(6)) == \
                    [i * i for i in range(6)]
    finally:
        registry.close_all()
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("joblib-cloud: launching 2 x C2"), lines
    assert "/h" in lines[0]
