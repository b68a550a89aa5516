"""The framed message protocol spoken between the client and a host's agent.

One frame = 13-byte header (kind, meta length, data length) + ``meta`` (a small pickled
dict) + ``data`` (raw bytes: a cloudpickled batch, a result, an upload chunk, output).
Keeping the bulk bytes out of the meta pickle means a 200 MB upload is never copied into
a pickle on either side.  The same code runs on both ends, over an SSH channel or a pipe.
"""

from __future__ import annotations

import enum
import pickle
import struct
from collections.abc import Callable, Mapping
from typing import Any, TypedDict

HEADER = struct.Struct("!BIQ")
#: Largest frame we accept: protects against reading garbage as a length.
MAX_FRAME = 1 << 40
#: Sent by the agent before any frame, so that noise from a login shell (motd, rc files)
#: before it is skipped rather than parsed as a header.
AGENT_MAGIC = b"\x00JOBLIB-CLOUD-AGENT\x00"
PROTOCOL_VERSION = 1


class Kind(enum.IntEnum):
    """Every frame's kind, with the meta it carries (the ``...Meta`` types below)."""

    HELLO = 1  # agent -> client: HelloMeta
    CONFIG = 2  # client -> agent: ConfigMeta
    BATCH = 3  # client -> agent (-> worker): BatchMeta, data = the pickled batch
    RESULT = 4  # worker (-> agent) -> client: ResultMeta, data = pickled result or error
    PUT = 5  # client -> agent: PutMeta, data = one chunk of a cached object
    EVICT = 6  # client -> agent: EvictMeta
    ABORT = 7  # client -> agent: AbortMeta (kill the workers running these batches)
    PING = 8  # both ways: "still here"; the agent's may carry a BootInstallMeta
    OUTPUT = 10  # agent -> client: OutputMeta, data = what tasks printed
    BYE = 11  # client -> agent, no meta: exit now
    READY = 12  # agent -> client: ReadyMeta; worker -> agent: WorkerReadyMeta
    INSTALL = 13  # client -> agent: InstallMeta (install into the agent's own Python)
    INSTALLED = 14  # agent -> client: InstalledMeta, how one INSTALL ended
    FETCH = 15  # client -> agent: FetchMeta (download a cached object from a URL)
    FETCHED = 16  # agent -> client: FetchedMeta, how one FETCH ended
    IDLE = 17  # agent -> client: IdleMeta, then the agent exits (no work for idle_timeout)


class Status(str, enum.Enum):
    """How a batch ended (``ResultMeta["status"]``; the wire carries the value)."""

    OK = "ok"  # data is the pickled result
    ERROR = "error"  # the task raised: data is the pickled exception, if it pickles
    TOO_LARGE = "too_large"  # the pickled result is over max_result_size
    CRASHED = "crashed"  # the worker process died running it
    BROKEN = "broken"  # the host cannot start worker processes at all
    CANCELLED = "cancelled"  # aborted by the client


class BootInstallMeta(TypedDict, total=False):
    """What the host's boot is still installing (``host/background.py``): in HELLO, and
    in a PING whenever it changed."""

    installing: list[str]  # distribution names; empty: nothing (any more)
    install_failed: bool


class HelloMeta(BootInstallMeta):
    protocol: int
    versions: dict[str, str | None]
    cpu_count: int
    pid: int
    home: str


class ConfigMeta(TypedDict):
    workers: int | None
    max_result_size: int
    heartbeat_timeout: float
    idle_timeout: float  # the agent exits after this long without work


class IdleMeta(TypedDict):
    seconds: float  # how long the agent had no work


class ReadyMeta(TypedDict):
    workers: int
    cores_per_worker: int


class WorkerReadyMeta(TypedDict):
    pid: int


class BatchMeta(TypedDict):
    id: int
    threads: int | None


class ResultMeta(TypedDict, total=False):
    id: int  # always present
    status: str  # always present: a Status value
    message: str  # CRASHED, BROKEN, ERROR: what happened
    exc_type: str  # ERROR: module.qualname of the exception
    traceback: str  # ERROR: the remote traceback
    unpicklable: str  # ERROR: why the exception itself could not be sent
    missing_module: str  # ERROR: the module the batch needed and the host lacks
    size: int  # TOO_LARGE
    limit: int  # TOO_LARGE


class PutMeta(TypedDict):
    digest: str
    offset: int
    last: bool


class FetchMeta(TypedDict):
    digest: str
    url: str  # a presigned GET: the host holds no credentials
    size: int
    part_size: int  # ranged GETs of this size...
    streams: int  # ...this many at a time


class FetchedMeta(TypedDict):
    digest: str
    ok: bool
    expired: bool  # the URL expired before the download was done: send a fresh one
    error: str  # why it failed (empty when ok)
    seconds: float


class EvictMeta(TypedDict):
    digests: list[str]


class AbortMeta(TypedDict):
    ids: list[int]


class OutputMeta(TypedDict):
    stream: str  # "stdout" or "stderr"


class InstallMeta(TypedDict):
    id: int  # the client's, echoed in the answer
    requirements: list[str]  # pip requirement strings, e.g. "scikit-learn==1.5.2"
    requirements_file: str | None  # the text of a requirements file (may hold options)


class InstalledMeta(TypedDict):
    id: int
    ok: bool
    command: str  # the installer that ran
    output: str  # the last lines it printed (stdout and stderr), or why it did not run


#: ``Kind(n)`` goes through the enum machinery (~1 µs); frames are read six times per task.
_KIND_BY_VALUE = {int(kind): kind for kind in Kind}

#: Frames with at most this much data go out as one buffer: one write, one SSH packet.
#: Three small writes cost three syscalls (three encrypted packets over SSH) and were
#: most of the per-task cost at ``batch_size=1`` (measured with bench/tiny_tasks.py).
JOIN_BELOW = 1 << 16
_EMPTY_META = pickle.dumps({}, protocol=pickle.HIGHEST_PROTOCOL)


def encode(kind: Kind, meta: Mapping[str, Any] | None = None, data: bytes | memoryview = b""
           ) -> list[bytes | memoryview]:
    """Frame parts, ready for a sequential write: one part for a small frame; large data
    is never copied."""
    meta_bytes = pickle.dumps(meta, protocol=pickle.HIGHEST_PROTOCOL) if meta else _EMPTY_META
    size = len(data) if isinstance(data, bytes) else memoryview(data).nbytes
    header = HEADER.pack(int(kind), len(meta_bytes), size)
    if size <= JOIN_BELOW:
        return [b"".join((header, meta_bytes, data))]
    return [header + meta_bytes, data]


class ProtocolError(ConnectionError):
    pass


#: A frame this large is collected in pieces and joined once, not appended to a buffer.
_LARGE_FRAME = 1 << 20

#: (kind, the whole frame as it came, length of its meta)
RawFrame = tuple[Kind, "bytes | memoryview", int]


def frame_meta(frame: RawFrame) -> dict[str, Any]:
    _, raw, meta_len = frame
    return pickle.loads(raw[HEADER.size : HEADER.size + meta_len]) if meta_len else {}


def frame_data(frame: RawFrame) -> memoryview:
    _, raw, meta_len = frame
    return memoryview(raw)[HEADER.size + meta_len :]


class FrameBuffer:
    """Frames cut from bytes fed as they arrive, for an event loop that never blocks on a
    partial frame.  Each frame comes out whole and unparsed, so it can be forwarded as it
    is; ``frame_meta``/``frame_data`` parse the parts that are needed."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._pieces: list[bytes] = []  # a large frame being collected
        self._have = 0
        self._need = 0

    def want(self) -> int:
        """How much to ask the next read for: all the rest of the frame under way."""
        if self._need:
            return max(self._need - self._have, 1 << 16)
        buf, pos = self._buf, self._pos
        if len(buf) - pos >= HEADER.size:
            _, meta_len, data_len = HEADER.unpack_from(buf, pos)
            rest: int = HEADER.size + meta_len + data_len - (len(buf) - pos)
            return max(rest, 1 << 16)
        return 1 << 16

    def feed(self, chunk: bytes) -> None:
        if self._need:
            self._pieces.append(chunk)
            self._have += len(chunk)
            return
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos > _LARGE_FRAME:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += chunk

    def pop(self) -> RawFrame | None:
        """The next whole frame, or None until more bytes come."""
        if self._need:
            if self._have < self._need:
                return None
            joined = self._pieces[0] if len(self._pieces) == 1 else b"".join(self._pieces)
            raw: bytes | memoryview = memoryview(joined)[: self._need]
            self._buf = bytearray(memoryview(joined)[self._need :])
            self._pos = 0
            self._pieces, self._have, self._need = [], 0, 0
            return self._cut(raw)
        buf, pos = self._buf, self._pos
        if len(buf) - pos < HEADER.size:
            return None
        _, meta_len, data_len = HEADER.unpack_from(buf, pos)
        if meta_len > MAX_FRAME or data_len > MAX_FRAME:
            raise ProtocolError(f"corrupt frame header (meta {meta_len}, data {data_len})")
        size = HEADER.size + meta_len + data_len
        if len(buf) - pos >= size:
            with memoryview(buf) as view:
                raw = bytes(view[pos : pos + size])
            self._pos = pos + size
            return self._cut(raw)
        if size > _LARGE_FRAME:
            with memoryview(buf) as view:
                self._pieces = [bytes(view[pos:])]
            self._have, self._need = len(buf) - pos, size
            buf.clear()
            self._pos = 0
        return None

    @staticmethod
    def _cut(raw: bytes | memoryview) -> RawFrame:
        kind, meta_len, _ = HEADER.unpack_from(raw, 0)
        try:
            return _KIND_BY_VALUE[kind], raw, meta_len
        except KeyError:
            raise ProtocolError(f"unknown frame kind {kind}") from None


class FrameReader:
    """Blocking reads of whole frames from a ``recv(n) -> bytes`` callable (``b''`` means
    end of stream), cut by a :class:`FrameBuffer` (``frames``, which can go on from here
    when the stream switches to being fed)."""

    def __init__(self, recv: Callable[[int], bytes]) -> None:
        self._recv = recv
        self.frames = FrameBuffer()

    def _more(self, n: int) -> bytes:
        chunk = self._recv(n)
        if not chunk:
            raise EOFError("connection closed")
        return chunk

    def skip_to_magic(self, limit: int = 1 << 20) -> bytes:
        """Discard bytes up to and including AGENT_MAGIC; return what was discarded."""
        seen = bytearray()
        while (idx := seen.find(AGENT_MAGIC)) < 0:
            if len(seen) > limit:
                raise ProtocolError(
                    "the agent did not start: its output was "
                    f"{bytes(seen[:400])!r}..."
                )
            chunk = self._recv(1 << 16)
            if not chunk:
                raise EOFError(seen.decode(errors="replace"))
            seen += chunk
        self.frames.feed(bytes(seen[idx + len(AGENT_MAGIC) :]))
        return bytes(seen[:idx])

    def read(self) -> tuple[Kind, dict[str, Any], bytes | memoryview]:
        while (frame := self.frames.pop()) is None:
            self.frames.feed(self._more(self.frames.want()))
        return frame[0], frame_meta(frame), frame_data(frame)
