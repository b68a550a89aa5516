"""What one host holds of the cluster's large arguments, and getting there the rest.

Each large argument (``wire/serialization.py``) reaches a host once: sent over the host's
own SSH stream (PUT frames), or, where the cluster has an object store and the object goes
to several hosts, fetched by the host from the store (FETCH) after the client staged it
once (``staging.py``).  Either way the host ends with the same file in its cache.  Only
the host's sender thread, holding the writer, runs this: it sends through the host's
``Outbound`` and asks the scheduler (``scheduling.Scheduler``) what the other hosts hold.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from ..wire.protocol import EvictMeta, FetchedMeta, FetchMeta, Kind, PutMeta
from ..wire.serialization import StoredObject

if TYPE_CHECKING:
    from .batch import Batch
    from .outbound import Outbound
    from .scheduling import Scheduler

UPLOAD_CHUNK = 4 * 2**20
T = TypeVar("T")
#: A renewed URL that expires again is not renewed forever.
MAX_RENEWALS = 3


class HostUploads:
    """The client's view of one host's cache (digest -> size, least recently used first)."""

    def __init__(self, out: Outbound, scheduler: Scheduler[Any], host: object,
                 cache_size: int) -> None:
        self.out = out
        self.scheduler = scheduler
        self.host = host  # this host, as the scheduler knows it
        self.cache_size = cache_size
        self.cache: collections.OrderedDict[str, int] = collections.OrderedDict()
        self.cache_bytes = 0
        #: Bytes this client sent the host itself (PUT), and bytes the host fetched.
        self.bytes_sent = 0
        self.bytes_fetched = 0
        self._answers: dict[str, FetchedMeta] = {}
        self._answered = threading.Condition()

    def has_all(self, digests: Iterable[str]) -> bool:
        return all(digest in self.cache for digest in digests)

    def provide(self, job: Batch) -> None:
        """Make sure the host holds every object ``job`` refers to."""
        for digest in job.refs:
            if digest in self.cache:
                self.cache.move_to_end(digest)
                continue
            stored = self.scheduler.store.get(digest)
            self._make_room(stored.nbytes, job)
            if not self._fetch(stored):
                self._put(stored)
            self.cache[digest] = stored.nbytes
            self.cache_bytes += stored.nbytes

    # -- sent by the client ----------------------------------------------------------
    def _put(self, stored: StoredObject) -> None:
        start, offset = time.monotonic(), 0
        for chunk in stored.chunks(UPLOAD_CHUNK):
            offset += len(chunk)
            put: PutMeta = {"digest": stored.digest, "offset": offset - len(chunk),
                            "last": offset == stored.nbytes}
            self.out.send(Kind.PUT, put, chunk)
        self.bytes_sent += stored.nbytes
        staging = self.scheduler.staging
        if staging is not None:
            staging.link.sent(stored.nbytes, time.monotonic() - start)

    # -- fetched by the host ---------------------------------------------------------
    def _fetch(self, stored: StoredObject) -> bool:
        """Have the host fetch ``stored`` from the object store, where that is cheaper;
        False: send it directly (not cheaper, or the store failed: said once)."""
        staging = self.scheduler.staging
        if staging is None or not staging.worth_it(stored,
                                                   self.scheduler.hosts_without(stored.digest)):
            return False
        url = self._pinging(lambda: staging.url_for(stored))
        for _ in range(MAX_RENEWALS + 1):
            if url is None:
                return False
            meta: FetchMeta = {"digest": stored.digest, "url": url, "size": stored.nbytes,
                               "part_size": staging.part_size, "streams": staging.streams}
            answer = self._ask(meta)
            if answer["ok"]:
                self.bytes_fetched += stored.nbytes
                staging.link.fetched(stored.nbytes, answer["seconds"])
                return True
            if not answer["expired"]:
                staging.give_up(f"host {self.out.name} could not download "
                                f"{staging.where}: {answer['error']}")
                return False
            url = self._pinging(lambda: staging.url_for(stored, renew=True))
        return False

    def _pinging(self, work: Callable[[], T]) -> T:
        """``work()`` (an upload to the store that may take minutes on a slow link, the
        wait for another host's, or for this host's download), pinging this host
        meanwhile, from this thread, which holds the writer: its agent stops when the
        client is silent for ``heartbeat_timeout``."""
        out = self.out
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="joblib-cloud-stage")
        future = pool.submit(work)
        pool.shutdown(wait=False)
        while True:
            try:
                return future.result(timeout=out.ping_every)
            except concurrent.futures.TimeoutError:
                if not out.alive:
                    raise ConnectionError(f"host {out.name} was lost") from None
                out.send(Kind.PING)

    def _ask(self, meta: FetchMeta) -> FetchedMeta:
        """Send FETCH and wait for the answer (pinging meanwhile).  A host lost
        meanwhile raises, as a failed send does."""
        self.out.send(Kind.FETCH, meta)
        return self._pinging(lambda: self._answer_to(meta["digest"]))

    def _answer_to(self, digest: str) -> FetchedMeta:
        with self._answered:
            while digest not in self._answers:
                if not self.out.alive:
                    raise ConnectionError(f"host {self.out.name} was lost during a "
                                          "download")
                self._answered.wait(1.0)
            return self._answers.pop(digest)

    def on_fetched(self, answer: FetchedMeta) -> None:
        """From the reader: how a FETCH ended."""
        with self._answered:
            self._answers[answer["digest"]] = answer
            self._answered.notify_all()

    def on_lost(self) -> None:
        with self._answered:
            self._answered.notify_all()

    # -- room ------------------------------------------------------------------------
    def _make_room(self, nbytes: int, job: Batch) -> None:
        """Evict least recently used objects that no queued batch on this host needs."""
        limit = self.cache_size
        if self.cache_bytes + nbytes <= limit:
            return
        needed = set(job.refs) | self.scheduler.refs_running_on(self.host)
        victims = []
        for digest, size in self.cache.items():
            if self.cache_bytes + nbytes <= limit:
                break
            if digest not in needed:
                victims.append(digest)
                self.cache_bytes -= size
        for digest in victims:
            del self.cache[digest]
        if victims:
            evict: EvictMeta = {"digests": victims}
            self.out.send(Kind.EVICT, evict)
