"""Bulk bytes over loopback SSH: paramiko (as joblib-cloud drives it) vs the OpenSSH client.

Measured on one loopback sshd host, same bytes, same remote sink:
  * upload (client -> host, how ``X`` travels) and download (host -> client, how results
    travel) for each cipher both sides support, paramiko and OpenSSH;
  * paramiko download for several receive window / max packet sizes (the upload window
    and packet size are set by the receiving sshd, not by us);
  * one real joblib-cloud upload: a Parallel call whose argument is a new array, minus the
    same call once the host has cached it.
Every figure is the median of ``--repeat`` runs.  Usage::

    python bench/ssh_throughput.py [--mb 256] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from typing import Any

from _fleet import MACHINE, isolated_home, load_note, ssh_fleet
from sshfleet import SSHFleet

import joblib_cloud.client.ssh as transport
from joblib_cloud.client.hosts import parse_host

CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes256-ctr")
CHUNK = 4 * 2**20


def _connect(fleet: SSHFleet, cipher: str, window: int | None = None,
             packet: int | None = None) -> transport.SSHConnection:
    """A joblib-cloud SSH connection forced to ``cipher`` (and optionally window/packet)."""
    saved = (transport.PREFERRED_CIPHERS, transport.WINDOW_SIZE, transport.MAX_PACKET_SIZE)
    transport.PREFERRED_CIPHERS = (cipher,)
    transport.WINDOW_SIZE = window or saved[1]
    transport.MAX_PACKET_SIZE = packet or saved[2]
    try:
        host = fleet.hosts[0]
        conn = transport.SSHConnection(parse_host(host.spec), key_path=str(fleet.client_key),
                                       known_hosts=str(fleet.known_hosts), connect_timeout=20)
    finally:
        transport.PREFERRED_CIPHERS, transport.WINDOW_SIZE, transport.MAX_PACKET_SIZE = saved
    got = conn.transport.local_cipher
    if got != cipher:
        raise RuntimeError(f"asked for {cipher}, negotiated {got}")
    return conn


def on_new_connection(fleet: SSHFleet, cipher: str, measure: Any, arg: Any,
                      window: int | None = None, packet: int | None = None) -> float:
    """One measured transfer on its own connection, so that no run pays paramiko's
    re-key (every 512 MiB) and all runs start from the same state."""
    conn = _connect(fleet, cipher, window, packet)
    try:
        return measure(conn, arg)
    finally:
        conn.close()


def paramiko_upload(conn: transport.SSHConnection, data: memoryview) -> float:
    channel = conn.exec("cat > /dev/null")
    start = time.perf_counter()
    for offset in range(0, len(data), CHUNK):
        channel.sendall(data[offset:offset + CHUNK])
    channel.shutdown_write()
    status = channel.recv_exit_status()
    elapsed = time.perf_counter() - start
    channel.close()
    if status != 0:
        raise RuntimeError(f"remote cat failed: {status}")
    return elapsed


def paramiko_download(conn: transport.SSHConnection, nbytes: int) -> float:
    channel = conn.exec(f"head -c {nbytes} /dev/zero")
    start = time.perf_counter()
    got = 0
    while True:
        # Ask for everything, as FrameReader does for a large frame: paramiko's buffer
        # deletes what was read from its front, so small reads of a full window are slow.
        chunk = channel.recv(nbytes)
        if not chunk:
            break
        got += len(chunk)
    elapsed = time.perf_counter() - start
    channel.close()
    if got != nbytes:
        raise RuntimeError(f"downloaded {got} of {nbytes} bytes")
    return elapsed


def _ssh_args(fleet: SSHFleet, cipher: str) -> list[str]:
    host = fleet.hosts[0]
    return ["ssh", "-T", "-i", str(fleet.client_key), "-p", str(host.port), "-c", cipher,
            "-o", f"UserKnownHostsFile={fleet.known_hosts}", "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes", "-o", "Compression=no", f"{host.user}@{host.address}"]


def openssh_upload(fleet: SSHFleet, cipher: str, data: memoryview) -> float:
    """Wall time of piping ``data`` through ``ssh host 'cat > /dev/null'``, minus the
    same command with no data (connection set-up is not throughput)."""
    def run(payload: memoryview) -> float:
        start = time.perf_counter()
        proc = subprocess.Popen([*_ssh_args(fleet, cipher), "cat > /dev/null"],
                                stdin=subprocess.PIPE)
        assert proc.stdin is not None
        for offset in range(0, len(payload), CHUNK):
            proc.stdin.write(payload[offset:offset + CHUNK])
        proc.stdin.close()
        if proc.wait() != 0:
            raise RuntimeError("ssh upload failed")
        return time.perf_counter() - start

    return max(run(data) - run(data[:0]), 1e-9)


def openssh_download(fleet: SSHFleet, cipher: str, nbytes: int) -> float:
    def run(n: int) -> float:
        start = time.perf_counter()
        subprocess.run([*_ssh_args(fleet, cipher), f"head -c {n} /dev/zero"], check=True,
                       stdout=subprocess.DEVNULL)
        return time.perf_counter() - start

    return max(run(nbytes) - run(0), 1e-9)


def joblib_cloud_upload(fleet: SSHFleet, nbytes: int, repeat: int) -> list[float]:
    """MB/s of real uploads (all hosts together): a fresh array per call, minus the same
    call once every host has it cached."""
    import numpy as np
    from joblib import Parallel, delayed, parallel_backend

    import joblib_cloud  # noqa: F401

    rates = []
    tasks = 4 * len(fleet.hosts)  # capacity is 2 x 2 batches per host: every host gets some
    # Two workers: with one, joblib would run the calls sequentially on the client.
    with parallel_backend("cloud", **fleet.kwargs(workers_per_host=2)):
        Parallel()(delayed(len)(b"x") for _ in range(2))  # connect, start the agents
        from joblib.parallel import get_active_backend

        cluster = get_active_backend()[0].cluster
        for i in range(repeat):
            arr = np.full(nbytes // 8, float(i), dtype=np.float64)
            cluster.store.new_call()
            cluster.store.add(arr)  # hash now: this bench measures the wire, not sha256
            before = [h.uploads.bytes_sent for h in cluster.hosts]
            start = time.perf_counter()
            Parallel(batch_size=1)(delayed(len)(arr) for _ in range(tasks))
            cold = time.perf_counter() - start
            sent = [h.uploads.bytes_sent - b for h, b in zip(cluster.hosts, before, strict=True)]
            if min(sent) < arr.nbytes:
                raise RuntimeError(f"not every host received the array: {sent}")
            start = time.perf_counter()
            Parallel(batch_size=1)(delayed(len)(arr) for _ in range(tasks))
            warm = time.perf_counter() - start
            rates.append(sum(sent) / max(cold - warm, 1e-9) / 1e6)
    return rates


def med(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--ciphers", default=",".join(CIPHERS))
    args = parser.parse_args()
    isolated_home()
    nbytes = args.mb * 2**20
    data = memoryview(bytes(nbytes))
    mb = nbytes / 1e6
    ciphers = args.ciphers.split(",")
    print(f"ssh throughput: {args.mb} MiB, loopback sshd, median of {args.repeat}; {MACHINE}")
    print(f"before: {load_note()}")
    results: dict[str, Any] = {}
    with ssh_fleet(1) as fleet:
        print("\n  cipher                    paramiko up  OpenSSH up   ratio | "
              "paramiko down  OpenSSH down  ratio   (MB/s)")
        for cipher in ciphers:
            p_up = med([mb / on_new_connection(fleet, cipher, paramiko_upload, data)
                        for _ in range(args.repeat)])
            p_down = med([mb / on_new_connection(fleet, cipher, paramiko_download, nbytes)
                          for _ in range(args.repeat)])
            o_up = med([mb / openssh_upload(fleet, cipher, data) for _ in range(args.repeat)])
            o_down = med([mb / openssh_download(fleet, cipher, nbytes)
                          for _ in range(args.repeat)])
            results[cipher] = (p_up, o_up, p_down, o_down)
            print(f"  {cipher:<25} {p_up:>10,.0f} {o_up:>11,.0f} {p_up / o_up:>7.2f} | "
                  f"{p_down:>12,.0f} {o_down:>13,.0f} {p_down / o_down:>6.2f}", flush=True)
        best_openssh = max(max(r[1] for r in results.values()), 1e-9)
        best_cipher = max(results, key=lambda c: results[c][0])
        print(f"\n  best paramiko upload: {best_cipher} {results[best_cipher][0]:,.0f} MB/s = "
              f"{results[best_cipher][0] / best_openssh:.2f}x the best OpenSSH upload "
              f"({best_openssh:,.0f} MB/s)")

        print("\n  paramiko download by receive window / max packet "
              f"({transport.PREFERRED_CIPHERS[0]}):")
        for window in (2 * 2**20, 64 * 2**20):
            for packet in (2**15, 2**18):
                rate = med([mb / on_new_connection(fleet, transport.PREFERRED_CIPHERS[0],
                                                   paramiko_download, nbytes, window, packet)
                            for _ in range(args.repeat)])
                mark = " <- current" if (window, packet) == (
                    transport.WINDOW_SIZE, transport.MAX_PACKET_SIZE) else ""
                print(f"    window {window >> 20:>3} MiB, packet {packet >> 10:>4} KiB: "
                      f"{rate:>6,.0f} MB/s{mark}", flush=True)

        rates = joblib_cloud_upload(fleet, nbytes, args.repeat)
        print(f"\n  joblib-cloud upload of a {args.mb} MiB array (PUT frames, agent writes "
              f"its cache file): {med(rates):,.0f} MB/s (runs "
              f"{', '.join(f'{r:,.0f}' for r in rates)}) = {med(rates) / best_openssh:.2f}x "
              "the best OpenSSH upload")
    with ssh_fleet(2) as fleet:
        rates2 = joblib_cloud_upload(fleet, nbytes, args.repeat)
    print(f"  joblib-cloud upload of the same array to 2 hosts at once (one sender thread "
          f"per host): {med(rates2):,.0f} MB/s together (runs "
          f"{', '.join(f'{r:,.0f}' for r in rates2)}) = {med(rates2) / med(rates):.2f}x one "
          "host's rate")
    print(f"after: {load_note()}")


if __name__ == "__main__":
    main()
