"""The byte streams under the protocol: frames cut from arbitrary pieces, and SSH
channels whose data is delivered from paramiko's transport thread (window grants, key
re-exchanges) on a real loopback sshd fleet."""

from __future__ import annotations

import random

import paramiko
import pytest
from joblib import Parallel, delayed, parallel_backend

from joblib_cloud.client import paramiko_fast, registry, ssh
from joblib_cloud.config import resolve_config
from joblib_cloud.wire.protocol import FrameBuffer, Kind, encode, frame_data, frame_meta

MB = 2**20


def test_frame_buffer_cuts_frames_fed_in_any_pieces():
    rng = random.Random(7)
    sent = [(Kind.RESULT, {"id": i}, rng.randbytes(rng.choice([0, 5, 70_000, 3 * MB])))
            for i in range(40)]
    stream = b"".join(b"".join(map(bytes, encode(*frame))) for frame in sent)
    frames, received, pos = FrameBuffer(), [], 0
    while pos < len(stream):
        size = rng.choice([1, 13, 4096, frames.want(), 5 * MB])
        frames.feed(stream[pos : pos + size])
        pos += size
        while (frame := frames.pop()) is not None:
            received.append((frame[0], frame_meta(frame), bytes(frame_data(frame))))
    assert received == sent


def _block(i: int, size: int) -> bytes:
    return bytes([i % 251]) * size


def test_results_larger_than_the_ssh_window_keep_coming(fleet, monkeypatch):
    """Data delivered by paramiko's thread bypasses ``Channel.recv``, which is what
    re-opens the window: without our own grants the agent would stall after 256 KiB."""
    monkeypatch.setattr(ssh, "WINDOW_SIZE", 256 * 1024)
    kwargs = fleet.kwargs(hosts=fleet.hosts[:1], workers_per_host=2, cluster="small-window")
    try:
        with parallel_backend("cloud", **kwargs):
            out = Parallel(n_jobs=-1, timeout=60)(delayed(_block)(i, MB) for i in range(24))
        assert out == [_block(i, MB) for i in range(24)]
        cluster = registry.get_cluster(resolve_config(**kwargs))
        channel = cluster.hosts[0].stream.channel
        assert channel.in_window_size == 256 * 1024  # the window really was that small
    finally:
        registry.get_cluster(resolve_config(**kwargs)).close()


def test_key_re_exchanges_during_many_tiny_tasks(fleet, monkeypatch):
    """paramiko re-keys every few hundred packets here.  Mid key exchange only the
    transport thread can finish it, so a result callback running on that thread must
    not send on its own connection then (it would wait for itself)."""
    exchanges = []
    real = paramiko.Transport._negotiate_keys

    def counting(self, m):
        exchanges.append(self)
        return real(self, m)

    monkeypatch.setattr(paramiko.Transport, "_negotiate_keys", counting)
    monkeypatch.setattr(paramiko.packet.Packetizer, "REKEY_PACKETS", 150)
    kwargs = fleet.kwargs(hosts=fleet.hosts[:2], workers_per_host=1, cluster="rekey")
    try:
        with parallel_backend("cloud", **kwargs):
            out = Parallel(n_jobs=-1, batch_size=1, timeout=20)(
                delayed(abs)(-i) for i in range(3000))
        assert out == list(range(3000))
        assert len(exchanges) >= 10
        cluster = registry.get_cluster(resolve_config(**kwargs))
        assert [h.lost_reason for h in cluster.hosts] == ["", ""]
    finally:
        registry.get_cluster(resolve_config(**kwargs)).close()


@pytest.mark.parametrize("size", [0, 1, 200_000])
def test_results_of_any_size_arrive_intact(fleet, size):
    kwargs = fleet.kwargs(hosts=fleet.hosts[:2], workers_per_host=1)
    with parallel_backend("cloud", **kwargs):
        out = Parallel(n_jobs=-1)(delayed(_block)(i, size) for i in range(50))
    assert out == [_block(i, size) for i in range(50)]


def test_without_paramiko_internals_a_reader_thread_takes_over(fleet, monkeypatch):
    """Delivering from paramiko's thread needs two private paramiko methods; a paramiko
    without them must still work, read by a thread of ours."""
    import threading

    monkeypatch.setattr(paramiko_fast, "AVAILABLE", False)
    kwargs = fleet.kwargs(hosts=fleet.hosts[:2], workers_per_host=1, cluster="no-deliver")
    try:
        with parallel_backend("cloud", **kwargs):
            out = Parallel(n_jobs=-1, batch_size=1)(delayed(_block)(i, 70_000)
                                                    for i in range(40))
        assert out == [_block(i, 70_000) for i in range(40)]
        cluster = registry.get_cluster(resolve_config(**kwargs))
        readers = {t.name for t in threading.enumerate() if t.name.startswith(
            "joblib-cloud-read-")}
        assert {f"joblib-cloud-read-{h.name}" for h in cluster.hosts} <= readers
    finally:
        registry.get_cluster(resolve_config(**kwargs)).close()
