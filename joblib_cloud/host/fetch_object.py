"""Downloads of cached objects from presigned URLs, run beside the agent's event loop.

On a cluster with an object store (S3 on ``aws``) a large argument leaves the client once:
the client stages it and sends each host a FETCH with a presigned GET URL instead of the
bytes.  The host downloads it with parallel ranged GETs (the standard library only, no
credentials: the URL is the permission), checks that the file's SHA-256 is its name, and
moves it into the cache, where workers map it as if it had been uploaded.

Each download runs in threads of its own; the answer goes back through a pipe the event
loop watches, so only the loop writes to the client.  Ranges already on disk survive an
expired URL: the client sends a fresh one and the download goes on where it stopped.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import queue
import selectors
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from ..wire.cached import DIGEST_CHARS
from ..wire.protocol import FetchedMeta, FetchMeta

#: A part that fails for a reason that may pass (a reset, 500, 503 SlowDown) is tried
#: this many times, backing off.
TRIES = 4
READ = 1 << 20
TIMEOUT = 60.0

Answer = Callable[[FetchedMeta], None]


class UrlExpired(Exception):
    pass


class FetchFailed(Exception):
    pass


def file_digest(path: str | Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            hasher.update(block)
    return hasher.hexdigest()[:DIGEST_CHARS]


def _refusal(exc: urllib.error.HTTPError) -> Exception:
    try:
        body = exc.read(2000).decode(errors="replace")
    except Exception:  # noqa: BLE001 - the reason is the status then
        body = ""
    if exc.code == 403 and "expired" in body.lower():
        return UrlExpired(body)
    code = body.partition("<Code>")[2].partition("</Code>")[0]
    return FetchFailed(f"HTTP {exc.code}{f' {code}' if code else ''} from the object store")


def _get_range(url: str, fd: int, start: int, length: int) -> None:
    """Bytes ``start`` .. ``start + length`` of the object into the file at the same place."""
    for attempt in range(TRIES):
        pos, end = start, start + length
        try:
            request = urllib.request.Request(url, headers={"Range": f"bytes={pos}-{end - 1}"})
            with urllib.request.urlopen(request, timeout=TIMEOUT) as resp:  # noqa: S310
                if resp.status == 200 and start:
                    raise FetchFailed("the object store ignored the byte range")
                while pos < end and (chunk := resp.read(min(READ, end - pos))):
                    os.pwrite(fd, chunk, pos)
                    pos += len(chunk)
            if pos != end:
                raise ConnectionError(f"the download stopped {end - pos} bytes short")
            return
        except urllib.error.HTTPError as exc:
            error = _refusal(exc)
            if isinstance(error, UrlExpired) or exc.code < 500 or attempt == TRIES - 1:
                raise error from None
        except (ConnectionError, TimeoutError, urllib.error.URLError) as exc:
            if attempt == TRIES - 1:
                raise FetchFailed(f"{type(exc).__name__}: {exc}") from None
        time.sleep(0.2 * 2**attempt)


class _Download:
    """One object under way: the ranges on disk so far, kept across a renewed URL."""

    def __init__(self, part: Path, size: int) -> None:
        self.part = part
        self.size = size
        self.done: set[int] = set()


class Fetcher:
    """The agent's downloads (FETCH frames), answered through ``answer`` on its loop."""

    def __init__(self, selector: selectors.BaseSelector, cache_dir: Path,
                 answer: Answer) -> None:
        self.cache_dir = cache_dir
        self.answer = answer
        self._answers: queue.SimpleQueue[FetchedMeta] = queue.SimpleQueue()
        self._downloads: dict[str, _Download] = {}
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        selector.register(self._wake_r, selectors.EVENT_READ, self._drain)

    def request(self, meta: FetchMeta) -> None:
        threading.Thread(target=self._run, args=(meta,), daemon=True,
                         name=f"fetch-{meta['digest'][:8]}").start()

    def _drain(self, _fd: int) -> None:
        os.read(self._wake_r, 4096)
        while True:
            try:
                self.answer(self._answers.get_nowait())
            except queue.Empty:
                return

    def _run(self, meta: FetchMeta) -> None:
        digest, start = meta["digest"], time.monotonic()
        answer: FetchedMeta = {"digest": digest, "ok": False, "expired": False, "error": "",
                               "seconds": 0.0}
        try:
            self._fetch(meta)
            answer["ok"] = True
        except UrlExpired:
            answer["expired"] = True
            answer["error"] = "the URL expired"
        except Exception as exc:  # noqa: BLE001 - the client falls back to sending it
            answer["error"] = str(exc) or type(exc).__name__
            self._forget(digest)
        answer["seconds"] = time.monotonic() - start
        self._answers.put(answer)
        os.write(self._wake_w, b"!")

    def _fetch(self, meta: FetchMeta) -> None:
        digest = meta["digest"]
        final = self.cache_dir / digest
        with self._lock:
            download = self._downloads.get(digest)
            if download is None or download.size != meta["size"]:
                download = self._downloads[digest] = _Download(
                    self.cache_dir / f".{digest}.fetch", meta["size"])
        for attempt in range(2):  # a file that fails its digest is fetched once more
            self._get_missing(meta, download)
            if file_digest(download.part) == digest:
                os.replace(download.part, final)
                self._forget(digest)
                return
            download.done.clear()
            if attempt:
                raise FetchFailed(f"the downloaded object does not match its digest {digest} "
                                  "(twice)")

    def _get_missing(self, meta: FetchMeta, download: _Download) -> None:
        part_size = max(meta["part_size"], 1)
        todo = [off for off in range(0, download.size, part_size) if off not in download.done]
        fd = os.open(download.part, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, download.size)

            def get(off: int) -> int:
                _get_range(meta["url"], fd, off, min(part_size, download.size - off))
                return off

            with concurrent.futures.ThreadPoolExecutor(max(meta["streams"], 1)) as pool:
                futures = [pool.submit(get, off) for off in todo]
                error: BaseException | None = None
                for future in concurrent.futures.as_completed(futures):
                    try:
                        download.done.add(future.result())
                    except BaseException as exc:  # noqa: BLE001 - stop the rest, raise one
                        error = error or exc
                        for other in futures:
                            other.cancel()
                if error is not None:
                    raise error
        finally:
            os.close(fd)

    def _forget(self, digest: str) -> None:
        with self._lock:
            download = self._downloads.pop(digest, None)
        if download is not None:
            download.part.unlink(missing_ok=True)

    def close(self) -> None:
        for digest in list(self._downloads):
            self._forget(digest)
