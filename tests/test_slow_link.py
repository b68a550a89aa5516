"""On a shaped link (``slowlink.py``: the client in its own namespace, 100 Mbit/s up),
a large argument leaves the client once for three hosts with ``staging='auto'``, and once
per host without staging."""

from __future__ import annotations

import pytest
import slowlink

pytestmark = pytest.mark.slow  # root and iproute2 (.ci/run installs it)


@pytest.fixture(scope="module")
def link():
    link = slowlink.SlowLink("100mbit").start()
    try:
        yield link, slowlink.start_object_store(link)
    finally:
        link.stop()


def test_auto_sends_x_once_for_three_hosts_where_direct_sends_it_three_times(link):
    link, endpoint = link
    staged = slowlink.run_client(link, endpoint, staging="auto", mb=30, candidates=4,
                                 cluster="slow-auto")
    direct = slowlink.run_client(link, endpoint, staging="never", mb=30, candidates=4,
                                 cluster="slow-never")
    # X, y and the folds' indices, each once, plus TCP, SSH and HTTP framing
    assert staged["hosts_fetched"] == 3 and staged["ratio"] < 1.25, staged
    assert staged["staged_bytes"] >= staged["size"]
    assert direct["hosts_fetched"] == 0 and direct["ratio"] > 2.9, direct
