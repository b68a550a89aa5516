"""The per-host cache of large arguments, observed on a real loopback sshd fleet.

What is asserted is behaviour, never timing: which bytes cross the wire (the client's
``uploads.bytes_sent`` counter and the TCP byte count of each host's socket), what each host
holds, and what a task on the host actually receives.
"""

from __future__ import annotations

import mmap
import os
import socket
import struct

import numpy as np
import pytest
from joblib import Parallel, delayed, parallel_backend

from joblib_cloud.client import registry
from joblib_cloud.config import resolve_config
from joblib_cloud.wire.serialization import StoredObject

MB = 2**20


def _tcp_bytes_acked(sock: socket.socket) -> int:
    """Bytes this socket sent that the peer acknowledged (Linux ``tcp_info``)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return struct.unpack_from("Q", info, 120)[0]  # tcpi_bytes_acked


def _cluster(kwargs: dict):
    """The connected cluster, every host joined (they join as they come up)."""
    cluster = registry.get_cluster(resolve_config(**kwargs))
    assert cluster.wait_until_settled(60) and not cluster.failures
    return cluster


def _sent(cluster) -> dict[str, int]:
    return {h.name: h.uploads.bytes_sent for h in cluster.hosts}


def _wire(cluster) -> dict[str, int]:
    return {h.name: _tcp_bytes_acked(h.connection.transport.sock) for h in cluster.hosts}


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


def _data(seed: int, mb: float = 4) -> np.ndarray:
    """Content unique to each test: the cache is content-addressed and shared."""
    return np.random.default_rng(seed).random(int(mb * MB) // 8)


def _total(x: np.ndarray, i: int) -> float:
    return float(x.sum()) + i


def _total_pair(x: np.ndarray, view: np.ndarray) -> tuple[float, float]:
    return float(x.sum()), float(view.sum())


def _fold_mean(x: np.ndarray, idx: np.ndarray) -> float:
    return float(x[idx].mean())


def _describe(x: np.ndarray) -> dict:
    """How a task sees its cached argument: read-only, backed by which mapped file."""
    base, mapped = x, None
    while base is not None:
        if isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap):
            mapped = base.obj
            break
        base = getattr(base, "base", None) if not isinstance(base, memoryview) else base.obj
    files = set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split()
            if len(parts) >= 6 and os.sep + "cache" + os.sep in parts[5]:
                files.add(parts[5])
    return {"pid": os.getpid(), "writeable": bool(x.flags.writeable),
            "mmap": mapped is not None, "files": sorted(files), "sum": float(x.sum())}


@pytest.fixture(scope="module")
def cache_kwargs(fleet):
    """Two hosts, two workers each, a cluster of this module's own."""
    kwargs = fleet.kwargs(hosts=fleet.hosts[:2], workers_per_host=2, cluster="test-cache")
    yield kwargs
    _cluster(kwargs).close()


def test_each_host_receives_a_large_argument_once_across_batches_calls_and_blocks(
        cache_kwargs):
    x = _data(1)
    stored = StoredObject(x)
    expected = [float(x.sum()) + i for i in range(24)]
    with parallel_backend("cloud", **cache_kwargs):
        cluster = _cluster(cache_kwargs)
        sent0, wire0 = _sent(cluster), _wire(cluster)
        # batch_size=1: 24 batches, so every host gets many batches that all need x.
        assert Parallel(batch_size=1)(delayed(_total)(x, i) for i in range(24)) == expected
        first = _delta(_sent(cluster), sent0)
        assert all(v in (0, stored.nbytes) for v in first.values()), first
        assert sum(first.values()) >= stored.nbytes
        for name, nbytes in _delta(_wire(cluster), wire0).items():
            # Counted at the socket: one copy plus SSH framing, not one per batch.
            assert nbytes < 1.1 * first[name] + MB, (name, nbytes)

        sent1, wire1 = _sent(cluster), _wire(cluster)
        assert Parallel(batch_size=1)(delayed(_total)(x, i) for i in range(24)) == expected
        assert _sent(cluster) == sent1  # second Parallel call: references only
        assert all(v < MB for v in _delta(_wire(cluster), wire1).values())

    with parallel_backend("cloud", **cache_kwargs):  # a second `with` block
        sent2 = _sent(cluster)
        assert Parallel(batch_size=2)(delayed(_total)(x, i) for i in range(24)) == expected
        assert _cluster(cache_kwargs) is cluster
        assert _sent(cluster) == sent2


def test_view_of_a_cached_array_is_not_sent_again(cache_kwargs):
    x = _data(2)
    stored = StoredObject(x)
    views = [x[: len(x) // 2], x[len(x) // 4:], x[::3], x[10:20]]
    with parallel_backend("cloud", **cache_kwargs):
        cluster = _cluster(cache_kwargs)
        sent0 = _sent(cluster)
        caches0 = {h.name: set(h.uploads.cache) for h in cluster.hosts}
        out = Parallel(batch_size=1)(delayed(_total_pair)(x, v) for v in views * 3)
        assert out == [(float(x.sum()), float(v.sum())) for v in views * 3]
        sent = _delta(_sent(cluster), sent0)
        assert all(v in (0, stored.nbytes) for v in sent.values()), sent
        for host in cluster.hosts:  # only the base entered the caches, not the views
            assert set(host.uploads.cache) - caches0[host.name] <= {stored.digest}


def test_small_per_fold_arguments_travel_inline(cache_kwargs):
    x = _data(3)
    stored = StoredObject(x)
    rng = np.random.default_rng(0)
    folds = [np.sort(rng.choice(len(x), 5000, replace=False)) for _ in range(10)]
    with parallel_backend("cloud", **cache_kwargs):
        cluster = _cluster(cache_kwargs)
        caches0 = {h.name: set(h.uploads.cache) for h in cluster.hosts}
        sent0 = _sent(cluster)
        out = Parallel(batch_size=1)(delayed(_fold_mean)(x, idx) for idx in folds)
        assert out == [float(x[idx].mean()) for idx in folds]
        assert sum(_delta(_sent(cluster), sent0).values()) <= 2 * stored.nbytes
        for host in cluster.hosts:
            assert set(host.uploads.cache) - caches0[host.name] <= {stored.digest}


def test_mid_sized_argument_repeated_across_batches_is_sent_once_per_host(cache_kwargs):
    # Like GridSearchCV's per-fold indices: below the threshold, passed to every candidate.
    fold = np.random.default_rng(6).integers(0, 10**9, 32 * 1024)  # 256 kB
    tiny = np.random.default_rng(7).integers(0, 10**9, 1024)  # 8 kB: always inline
    stored = StoredObject(fold)
    with parallel_backend("cloud", **cache_kwargs):
        cluster = _cluster(cache_kwargs)
        caches0 = {h.name: set(h.uploads.cache) for h in cluster.hosts}
        sent0 = _sent(cluster)
        out = Parallel(batch_size=1)(delayed(_total_pair)(fold, tiny) for _ in range(16))
        assert out == [(float(fold.sum()), float(tiny.sum()))] * 16
        sent = _delta(_sent(cluster), sent0)
        assert all(v in (0, stored.nbytes) for v in sent.values()), sent
        assert sum(sent.values()) >= stored.nbytes
        for host in cluster.hosts:
            assert set(host.uploads.cache) - caches0[host.name] <= {stored.digest}


def test_stream_of_fresh_mid_sized_arguments_stays_inline(cache_kwargs):
    # Each array is new (and freed after dispatch, so ids get reused): none is a repeat.
    def fresh():
        for i in range(24):
            yield delayed(_total)(np.full(32 * 1024, float(i)), i)

    with parallel_backend("cloud", **cache_kwargs):
        cluster = _cluster(cache_kwargs)
        caches0 = {h.name: set(h.uploads.cache) for h in cluster.hosts}
        sent0 = _sent(cluster)
        out = Parallel(batch_size=1)(fresh())
        assert out == [float(i) * 32 * 1024 + i for i in range(24)]
        assert _sent(cluster) == sent0
        assert {h.name: set(h.uploads.cache) for h in cluster.hosts} == caches0


def test_workers_on_a_host_share_one_read_only_mapped_copy(cache_kwargs):
    x = _data(4)
    digest = StoredObject(x).digest
    with parallel_backend("cloud", **cache_kwargs):
        seen = Parallel(batch_size=1)(delayed(_describe)(x) for _ in range(16))
    assert all(s["sum"] == float(x.sum()) for s in seen)
    assert all(not s["writeable"] and s["mmap"] for s in seen), seen
    by_file: dict[str, set[int]] = {}
    for s in seen:
        mine = [f for f in s["files"] if f.endswith(os.sep + digest)]
        assert len(mine) == 1, s  # the cache file itself is mapped, exactly once
        by_file.setdefault(mine[0], set()).add(s["pid"])
    # One file per host at most (2 hosts), each mapped by whichever workers ran tasks.
    assert 1 <= len(by_file) <= 2
    assert len({pid for pids in by_file.values() for pid in pids}) >= 2


def test_array_mutated_in_place_between_calls_gives_new_results(cache_kwargs):
    x = _data(5)
    with parallel_backend("cloud", **cache_kwargs):
        cluster = _cluster(cache_kwargs)
        first = Parallel(batch_size=1)(delayed(_total)(x, i) for i in range(4))
        sent0 = _sent(cluster)
        x[:1000] += 1.0  # same object, new content
        second = Parallel(batch_size=1)(delayed(_total)(x, i) for i in range(4))
    assert second == [float(x.sum()) + i for i in range(4)]
    assert second != first
    assert sum(_delta(_sent(cluster), sent0).values()) >= x.nbytes  # the new content went


def test_lru_eviction_at_cache_size_and_resend_when_needed(fleet):
    arrays = [_data(10 + i, mb=2) for i in range(3)]
    size = StoredObject(arrays[0]).nbytes
    kwargs = fleet.kwargs(hosts=fleet.hosts[:1], workers_per_host=2, cluster="test-cache-lru",
                          cache_size=int(2.5 * size))
    try:
        with parallel_backend("cloud", **kwargs):
            cluster = _cluster(kwargs)
            host = cluster.hosts[0]
            cache_dir = os.path.join(host.hello["home"], "cache", str(host.hello["pid"]))
            digests = [StoredObject(a).digest for a in arrays]
            for a in arrays:
                assert Parallel(n_jobs=2)(delayed(_total)(a, 0) for _ in range(2)) == [
                    float(a.sum())] * 2
            # the oldest went: 3 do not fit in 2.5
            assert list(host.uploads.cache) == digests[1:]
            assert host.uploads.cache_bytes <= 2.5 * size
            on_disk = sorted(f for f in os.listdir(cache_dir) if not f.startswith("."))
            assert on_disk == sorted(digests[1:])

            before = host.uploads.bytes_sent
            assert Parallel(n_jobs=2)(delayed(_total)(arrays[0], 1) for _ in range(2)) == [
                float(arrays[0].sum()) + 1] * 2
            assert host.uploads.bytes_sent - before == size  # evicted, so sent again
            assert digests[0] in host.uploads.cache and digests[1] not in host.uploads.cache
            assert sorted(f for f in os.listdir(cache_dir) if not f.startswith(".")) == \
                sorted([digests[0], digests[2]])
    finally:
        _cluster(kwargs).close()


def test_batches_of_named_functions_and_small_values_skip_cloudpickle():
    """The fast path is plain pickle, and only where that gives what cloudpickle would."""
    import json
    import pickle

    from joblib.parallel import BatchedCalls

    from joblib_cloud.host.nested import HostThreadingBackend
    from joblib_cloud.wire.cached import loads_batch
    from joblib_cloud.wire.serialization import (
        ObjectStore,
        dumps_batch,
        plain_payload,
        register_local_modules,
    )

    store = ObjectStore(threshold=MB)
    register_local_modules([os.path.dirname(__file__)])

    def batch(*items):
        return BatchedCalls(list(items), (HostThreadingBackend(nesting_level=1), 1))

    plain = batch(delayed(json.dumps)({"a": [1, 2.5, None]}, sort_keys=True),
                  delayed(abs)(-3), delayed(divmod)(7, 120))
    payload, refs = dumps_batch(plain, store)
    assert payload == pickle.dumps(plain, protocol=pickle.HIGHEST_PROTOCOL) and not refs
    assert loads_batch(payload, "/nonexistent")() == plain() == ['{"a": [1, 2.5, null]}', 3,
                                                                 (0, 7)]

    slow_paths = [
        batch(delayed(lambda x: x + 1)(1)),  # defined by value
        batch(delayed(abs)(np.int64(-3))),  # not a builtin value
        batch(delayed(_total)(_data(99, mb=2), 0)),  # large: a cache reference
        batch(delayed(abs)(-1), delayed(len)("x" * MB)),  # a long string: cached
        batch(delayed(_total)(1, 2)),  # from this module, which hosts get by value
    ]
    assert all(plain_payload(other, MB) is None for other in slow_paths)
