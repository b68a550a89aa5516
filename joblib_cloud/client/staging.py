"""Large arguments staged once in the cluster's object store, for every host to fetch.

Sent directly, an object crosses the client's link once per host; staged, once in all.
Per object the client picks the cheaper (:meth:`Staging.worth_it`): with ``n`` hosts
still to get it, direct costs ``n * size / R`` on the client's link (rate ``R``), staged
``size / R + size / D`` (``D``: how fast a host downloads from the store).  So staging
wins when ``R < (n - 1) * D``: always for a laptop, not for a client inside the cloud on
a 10 Gbit/s link feeding two hosts.  Both rates are measured as objects move (the
defaults assume a laptop and an in-region download).  Objects under ``STAGE_MIN`` go
directly: a round trip to the store costs more than they do.

The store is the provider's (:class:`provisioner.ObjectStoreAccess`; S3 on ``aws``).  When
it fails (no permission, a bucket policy, throttling), the cluster sends directly from
then on, after one warning that says why.
"""

from __future__ import annotations

import threading
import time
import warnings

from ..provisioner import ObjectStoreAccess
from ..wire.serialization import StoredObject

#: Smaller objects go over SSH: a store round trip costs more than sending them.
STAGE_MIN = 8 * 2**20
#: How long a presigned URL is good for, and the least a reused one must have left.
URL_TTL = 3600.0
URL_MARGIN = 600.0
#: Until measured: a laptop's uplink (100 Mbit/s), an in-region download (100 MB/s).
ASSUMED_LINK = 12.5e6
ASSUMED_FETCH = 100e6
#: Transfers shorter than this say little about a rate.
MIN_SAMPLE_SECONDS = 0.2


class LinkRates:
    """Measured rates of the client's link and of hosts' downloads, bytes per second."""

    def __init__(self) -> None:
        self.link = ASSUMED_LINK
        self.fetch = ASSUMED_FETCH
        self.measured_link = False

    def sent(self, nbytes: int, seconds: float) -> None:
        """``nbytes`` left the client in ``seconds`` (to a host or to the store)."""
        if seconds >= MIN_SAMPLE_SECONDS:
            rate = nbytes / seconds
            self.link = rate if not self.measured_link else 0.5 * (self.link + rate)
            self.measured_link = True

    def fetched(self, nbytes: int, seconds: float) -> None:
        if seconds >= MIN_SAMPLE_SECONDS:
            self.fetch = 0.5 * (self.fetch + nbytes / seconds)


class Staging:
    """One cluster's staged objects: each uploaded once, with a URL per object that hosts
    download it from."""

    #: Hosts download in parts of this size, this many at a time.
    part_size = 16 * 2**20
    streams = 8

    def __init__(self, store: ObjectStoreAccess, mode: str = "auto") -> None:
        self.store = store
        self.mode = mode
        self.where = store.where
        self.link = LinkRates()
        self.failed: str | None = None
        self.bytes_staged = 0
        self._urls: dict[str, tuple[str, float]] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def worth_it(self, stored: StoredObject, hosts_without: int) -> bool:
        """Whether the hosts should fetch ``stored`` from the store rather than get it over
        SSH, ``hosts_without`` of them (this one included) still lacking it."""
        if self.failed is not None or self.mode == "never":
            return False
        if self.mode == "always":
            return True
        if stored.nbytes < STAGE_MIN or hosts_without < 2:
            return False
        return self.link.link < (hosts_without - 1) * self.link.fetch

    def url_for(self, stored: StoredObject, renew: bool = False) -> str | None:
        """A URL the hosts can download ``stored`` from, uploading it first if the store
        lacks it (once, whatever the number of hosts asking); None once staging failed."""
        digest = stored.digest
        with self._lock:
            lock = self._locks.setdefault(digest, threading.Lock())
        with lock:
            if self.failed is not None:
                return None
            known = self._urls.get(digest)
            if known is not None and not renew and known[1] - time.time() > URL_MARGIN:
                return known[0]
            try:
                if known is None:
                    start = time.monotonic()
                    if self.store.ensure(digest, stored.segments, stored.nbytes):
                        self.bytes_staged += stored.nbytes
                        self.link.sent(stored.nbytes, time.monotonic() - start)
                url = self.store.url(digest, URL_TTL)
            except Exception as exc:  # noqa: BLE001 - any store failure: send directly
                self.give_up(f"{type(exc).__name__}: {exc}")
                return None
            self._urls[digest] = (url, time.time() + URL_TTL)
            return url

    def give_up(self, why: str) -> None:
        """Send directly from now on, and say why, once."""
        with self._lock:
            if self.failed is not None:
                return
            self.failed = why
        warnings.warn(f"joblib-cloud: staging large arguments in {self.where} failed "
                      f"({why}); each host gets them over SSH instead, which sends them once "
                      "per host over this computer's link.", RuntimeWarning, stacklevel=2)
