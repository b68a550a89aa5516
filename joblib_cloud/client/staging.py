"""Large arguments staged once in the cluster's object store, for every host to fetch.

Sent directly, an object crosses the client's link once per host; staged, once in all.
Per object the client picks the cheaper (:meth:`Staging.worth_it`): with ``n`` hosts
still to get an object of ``s`` bytes, direct costs ``n * s / R`` (``R``: the client's
link to the hosts), staged ``s / U + s / D + L`` (``U``: the upload to the store, ``D``: a
host's download from it, ``L``: the round trips).  For a laptop on 100 Mbit/s and 3
hosts that stages everything from about 130 kB up; a client inside the cloud feeding two
hosts over 10 Gbit/s sends directly.  The rates are estimated, then measured as objects
move (``link_rates.py``).  An object the store holds already costs the link nothing.

``n`` counts the hosts still joining (booting, installing), not only those connected: a
fleet is a target, and the first host to be ready usually works alone for a while.  It
stages what the whole fleet will need (and fetches it itself once the upload is done), so
the hosts that join later find it in the store and it leaves the client once.  A fleet
of one host gets its arguments directly.

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
from .link_rates import LinkRates

#: Seconds that staging one object costs besides moving its bytes: the round trips to the
#: store and to the host, weighted low because they delay only the host waiting for that
#: object, while link time is what every host's data shares (the scarce resource).
STORE_LATENCY = 0.02
#: How long a presigned URL is good for, and the least a reused one must have left.
URL_TTL = 3600.0
URL_MARGIN = 600.0


class Staging:
    """One cluster's staged objects: each uploaded once, with a URL per object that hosts
    download it from."""

    #: Hosts download in parts of this size, this many at a time.
    part_size = 16 * 2**20
    streams = 8

    def __init__(self, store: ObjectStoreAccess, mode: str = "auto") -> None:
        self.store = store
        self.mode = mode
        self.link = LinkRates()
        self.failed: str | None = None
        self.bytes_staged = 0
        self._urls: dict[str, tuple[str, float]] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    @property
    def where(self) -> str:
        return self.store.where

    def worth_it(self, stored: StoredObject, hosts_without: int) -> bool:
        """Whether the hosts should fetch ``stored`` from the store rather than get it over
        SSH, ``hosts_without`` of them still lacking it: this one, the others connected,
        and those still joining (``Cluster.joining``), which find it staged when they come."""
        if self.failed is not None or self.mode == "never":
            return False
        if self.mode == "always":
            return True
        if stored.digest in self._urls:  # staged already: fetching costs the link nothing
            return True
        if hosts_without < 2:
            return False
        rates, size = self.link, stored.nbytes
        direct = hosts_without * size / rates.link_for(hosts_without)
        staged = size / rates.store_for(hosts_without) + size / rates.fetch + STORE_LATENCY
        return staged < direct

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
                        self.link.stored(stored.nbytes, time.monotonic() - start)
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
