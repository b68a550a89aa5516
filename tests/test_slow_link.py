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


def test_hosts_booting_apart_find_x_staged_and_it_leaves_the_client_once(link):
    """The fit starts on the first host while the two others still boot (4 s apart, well
    inside the fit, which the 48 MB upload alone makes last over 6 s):
    ``X`` goes to the store once, for the whole fleet, and a host that joins mid-fit
    fetches it there.  The link's bytes also carry ``y`` and the folds' indices (4 x 8
    bytes a row of ``X``, 512 columns here), the batches, the late hosts' agents and
    framing."""
    link, endpoint = link
    got = slowlink.run_client(link, endpoint, staging="auto", mb=48, columns=512,
                              candidates=6, stagger=4, seed=1, cluster="slow-stagger")
    size = got["size"]
    late = [h for h in got["per_host"] if h[0] > 0]  # joined after the fit began
    assert late and any(fetched >= size for _, _, fetched in late), got
    assert all(sent < 0.02 * size for _, sent, _ in got["per_host"]), got  # X: no SSH
    assert size <= got["staged_bytes"] < 1.03 * size, got
    assert got["ratio"] <= 1.1, got
