"""How fast data leaves this computer, to the hosts and to the object store, and how fast
hosts download from the store: what ``staging.py`` weighs per object.

Each rate starts from an estimate and follows measurements of real transfers.  The first
estimate of the client's link comes before any large transfer, from the kernel: once a
host's agent has been sent (about 200 kB over its SSH connection), Linux's ``TCP_INFO``
holds the connection's measured delivery rate, which on a 100 Mbit/s uplink reads about
12 MB/s and inside a data centre hundreds.  Where that is not available (another OS, a
proxy command) the rate stays at a laptop's until measured.

Machines come up apart (on EC2, tens of seconds), so the first large argument is often
weighed when one host of several is connected, on that one connection's reading.  A
short burst can read high, and sending directly on a reading that was wrong costs a
crossing of the link per host still to come (or, once the transfer corrects the rate,
one more crossing to stage it for them), while staging on a link that was fast in fact
costs no link bytes, only the first host's wait for its download.  So a host not read
yet counts as a laptop's link (:meth:`LinkRates.link_for`): direct sends to a fleet
still joining need most of its hosts, or a measured transfer, to say the link is fast.
"""

from __future__ import annotations

import socket
import statistics
import struct
import sys
import threading

#: Until estimated: a laptop's uplink (100 Mbit/s), an in-region download (100 MB/s).
ASSUMED_LINK = 12.5e6
ASSUMED_FETCH = 100e6
#: Transfers shorter or smaller than this say little about a rate (round trips, and on
#: the first object the store's set-up, would dominate).
MIN_SAMPLE_SECONDS = 0.2
MIN_SAMPLE_BYTES = 4 * 2**20
#: ``struct tcp_info`` (linux/tcp.h): ``tcpi_delivery_rate``, bytes per second.
_DELIVERY_RATE_OFFSET = 160


def delivery_rate(sock: object) -> float | None:
    """The kernel's measured delivery rate of a connected TCP socket (Linux), or None."""
    option = getattr(socket, "TCP_INFO", None)
    # The struct's layout (and so the offset) is Linux's: other systems differ or lack it.
    if option is None or not sys.platform.startswith("linux") or \
            not isinstance(sock, socket.socket):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, option, 256)
    except OSError:
        return None
    if len(info) < _DELIVERY_RATE_OFFSET + 8:
        return None
    rate = struct.unpack_from("Q", info, _DELIVERY_RATE_OFFSET)[0]
    return float(rate) or None


class LinkRates:
    """Bytes per second: this computer to the hosts over SSH (``link``), to the store
    (``store``; until measured, the same link), and a host's download from the store."""

    def __init__(self) -> None:
        self.link = ASSUMED_LINK
        self.fetch = ASSUMED_FETCH
        self._store: float | None = None
        self._readings: list[float] = []
        self._measured = False
        self._lock = threading.Lock()

    @property
    def readings(self) -> list[float]:
        """The kernel's readings so far, one per host connection (bytes per second)."""
        with self._lock:
            return list(self._readings)

    @property
    def store(self) -> float:
        return self.link if self._store is None else self._store

    def link_for(self, hosts: int) -> float:
        """The client's link to count on for an object ``hosts`` hosts still need: the
        measured rate once a transfer was measured; before, the (lower) median of the
        kernel's readings with each of those hosts not read yet (still joining) counted
        as :data:`ASSUMED_LINK`."""
        with self._lock:
            missing = hosts - len(self._readings)
            if self._measured or missing <= 0 or not self._readings:
                return self.link
            return statistics.median_low(self._readings + [ASSUMED_LINK] * missing)

    def store_for(self, hosts: int) -> float:
        """The upload rate to the store: measured, or the link's (:meth:`link_for`)."""
        return self.link_for(hosts) if self._store is None else self._store

    def estimated(self, rate: float | None) -> None:
        """The kernel's reading on one host's connection.  Until a transfer is measured,
        the link is the median reading: one connection's short burst can read high."""
        if rate:
            with self._lock:
                self._readings.append(rate)
                if not self._measured:
                    self.link = statistics.median(self._readings)

    def sent(self, nbytes: int, seconds: float) -> None:
        """``nbytes`` went to one host over SSH in ``seconds``."""
        if seconds >= MIN_SAMPLE_SECONDS and nbytes >= MIN_SAMPLE_BYTES:
            with self._lock:
                rate = nbytes / seconds
                self.link = 0.5 * (self.link + rate) if self._measured else rate
                self._measured = True

    def stored(self, nbytes: int, seconds: float) -> None:
        """``nbytes`` were uploaded to the store in ``seconds``."""
        if seconds >= MIN_SAMPLE_SECONDS and nbytes >= MIN_SAMPLE_BYTES:
            with self._lock:
                rate = nbytes / seconds
                self._store = rate if self._store is None else 0.5 * (self._store + rate)

    def fetched(self, nbytes: int, seconds: float) -> None:
        if seconds >= MIN_SAMPLE_SECONDS and nbytes >= MIN_SAMPLE_BYTES:
            with self._lock:
                self.fetch = 0.5 * (self.fetch + nbytes / seconds)
