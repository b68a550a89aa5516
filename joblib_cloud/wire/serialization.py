"""Pickling of batches with a per-host, content-addressed cache of large arguments.

Client side: :class:`ObjectStore` + :func:`dumps_batch` turn a batch into a small
cloudpickle payload in which every large argument (numpy array, pandas object, sparse
matrix, large bytes/str) is replaced by a reference ``('c', digest)``.  The large object
itself is encoded once (pickle protocol 5, its buffers out of band, so the array memory is
sent as is, never copied into a pickle) and uploaded to a host only if that host does not
hold it yet.

Host side: ``cached.py`` (the file format, and the memory-mapped loads).
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import site
import sys
import sysconfig
import threading
import types
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cloudpickle
from joblib.parallel import BatchedCalls, ParallelBackendBase

from .cached import _LEN, DIGEST_CHARS, _pad, _warning_category


class StoredObject:
    """A large object encoded for upload: file layout = header + aligned buffers."""

    __slots__ = ("digest", "obj", "segments", "nbytes")

    def __init__(self, obj: Any) -> None:
        buffers: list[pickle.PickleBuffer] = []
        meta = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
        raws = [b.raw() for b in buffers]
        # File layout: [header length][header pickle][pad], then each buffer aligned to
        # ALIGN bytes; buffer offsets in the header are relative to the data start.
        layout, offset = [], 0
        for raw in raws:
            layout.append((offset, raw.nbytes))
            offset += raw.nbytes + _pad(raw.nbytes)
        header = pickle.dumps({"meta": meta, "buffers": layout})
        head = _LEN.pack(len(header)) + header
        segments: list[bytes | memoryview] = [head + b"\0" * _pad(len(head))]
        for raw in raws:
            segments.append(raw)
            if _pad(raw.nbytes):
                segments.append(b"\0" * _pad(raw.nbytes))
        # The digest is the file's own, so a host can check what it downloaded.
        hasher = hashlib.sha256()
        for seg in segments:
            hasher.update(seg)
        self.digest = hasher.hexdigest()[:DIGEST_CHARS]
        self.obj = obj
        self.segments = segments
        self.nbytes = sum(len(s) if isinstance(s, bytes) else s.nbytes for s in segments)

    def chunks(self, size: int) -> Iterator[memoryview]:
        """The file's bytes in pieces of at most ``size``, without joining segments."""
        for seg in self.segments:
            view = memoryview(seg).cast("B")
            for start in range(0, len(view), size):
                yield view[start : start + size]


def _ndarray_nbytes(arr: Any) -> int:
    return -1 if arr.dtype.hasobject else arr.nbytes


def _pandas_nbytes(obj: Any) -> int:
    try:
        usage = obj.memory_usage(index=True, deep=False)
        return int(usage.sum() if hasattr(usage, "sum") else usage)
    except Exception:
        return -1


def _sparse_nbytes(obj: Any) -> int:
    if not (hasattr(obj, "data") and hasattr(obj, "nnz")):
        return -1
    return sum(getattr(getattr(obj, a, None), "nbytes", 0)
               for a in ("data", "indices", "indptr", "row", "col", "offsets"))


def _sizer_for(t: type) -> Callable[[Any], int] | None:
    """How to size objects of type ``t`` (-1: not this one), or None: never cached."""
    if t is bytes or t is bytearray or t is str:
        return len  # for str a lower bound: good enough for a threshold
    module = getattr(t, "__module__", None) or ""
    name = t.__name__
    if module == "numpy" and name in ("ndarray", "memmap"):
        return _ndarray_nbytes
    if module.startswith("pandas.") and name in ("DataFrame", "Series"):
        return _pandas_nbytes
    if module.startswith("scipy.sparse"):
        return _sparse_nbytes
    return None


#: type -> its sizer (None: never cached).  Pickle calls ``persistent_id`` for every
#: object of every task, so each object costs one dict lookup (bench/tiny_tasks.py).
_sizers: dict[type, Callable[[Any], int] | None] = {}


#: Objects of at least threshold / REPEATED_FRACTION (64 kB by default) are cached too once
#: they are passed again in another batch of the same call.
REPEATED_FRACTION = 16


class ObjectStore:
    """Client-side registry of large objects by content digest.

    Hashing 200 MB costs ~0.15 s, so within one ``Parallel`` call an object is hashed
    once and then found by identity; the identity memo is cleared between calls so that
    an array mutated in place between two calls is re-hashed, never served stale.
    """

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self._lock = threading.RLock()
        self._by_digest: dict[str, StoredObject] = {}
        self._by_id: dict[int, tuple[Any, str]] = {}
        # weak references, by id, to mid-sized objects already sent inline in this call
        self._inline_refs: dict[int, weakref.ref[Any]] = {}

    def new_call(self) -> None:
        with self._lock:
            self._by_id.clear()
            self._inline_refs.clear()

    def seen_inline(self, obj: Any) -> bool:
        """Whether ``obj`` itself already went inline in an earlier batch of this call.

        GridSearchCV passes the same per-fold index arrays (hundreds of kB each) to every
        candidate: inline, they crossed the wire once per batch, ~10% of a 240 MB ``X``
        (bench/big_data.py).  The second time one shows up it is cached like ``X``.  A
        weak reference tells the same object from a new one that reuses a freed id (a
        stream of fresh arrays must stay inline); objects without weak references
        (bytes, str) are never taken for repeats.
        """
        try:
            ref = weakref.ref(obj)
        except TypeError:
            return False
        key = id(obj)
        with self._lock:
            old = self._inline_refs.get(key)
            if old is not None and old() is obj:
                return True
            if len(self._inline_refs) > 100_000:
                self._inline_refs.clear()
            self._inline_refs[key] = ref
            return False

    def digest_of(self, obj: Any) -> str | None:
        with self._lock:
            hit = self._by_id.get(id(obj))
            return hit[1] if hit is not None and hit[0] is obj else None

    def add(self, obj: Any) -> str:
        with self._lock:
            hit = self._by_id.get(id(obj))
            if hit is not None and hit[0] is obj:
                return hit[1]
        stored = StoredObject(obj)  # hashing outside the lock: other hosts keep going
        with self._lock:
            existing = self._by_digest.get(stored.digest)
            if existing is None:
                self._by_digest[stored.digest] = stored
            self._by_id[id(obj)] = (obj, stored.digest)
            return stored.digest

    def get(self, digest: str) -> StoredObject:
        with self._lock:
            return self._by_digest[digest]

    def forget_unused(self, keep: set[str]) -> None:
        """Drop strong references to objects no host holds and no batch needs."""
        with self._lock:
            live_ids = {d for _, d in self._by_id.values()}
            for digest in list(self._by_digest):
                if digest not in keep and digest not in live_ids:
                    del self._by_digest[digest]


class _CachingPickler(cloudpickle.Pickler):
    def __init__(self, file: io.BytesIO, store: ObjectStore) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.store = store
        self.refs: set[str] = set()
        self._repeat_checked: dict[int, bool] = {}

    def persistent_id(self, obj: Any) -> Any:  # noqa: D401 - pickle hook
        t = type(obj)
        try:
            sizer = _sizers[t]
        except KeyError:
            sizer = _sizers[t] = _sizer_for(t)
        if sizer is None:
            return None
        size = sizer(obj)
        if size < 0:
            return None
        if t.__module__ == "numpy" and obj.base is not None:
            view = self._view_ref(obj)
            if view is not None:
                return view
        if size >= self.store.threshold or (
                size >= self.store.threshold // REPEATED_FRACTION and self._repeated(obj)):
            digest = self.store.add(obj)
            self.refs.add(digest)
            return ("c", digest)
        return None

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, type) and _host_may_lack_warning(obj):
            return _warning_category, (obj.__module__, obj.__qualname__)
        return super().reducer_override(obj)

    def _repeated(self, obj: Any) -> bool:
        """Asked once per object and batch (pickle asks persistent_id at every reference)."""
        key = id(obj)
        answer = self._repeat_checked.get(key)
        if answer is None:
            answer = self._repeat_checked[key] = self.store.seen_inline(obj)
        return answer

    def _view_ref(self, arr: Any) -> Any:
        """A small view of an already-cached large array travels as (base, offset)."""
        root = arr
        while type(root.base).__module__ == "numpy" and type(root.base).__name__ in (
            "ndarray", "memmap"
        ):
            root = root.base
        if root is arr or root.nbytes < self.store.threshold:
            return None
        digest = self.store.digest_of(root)
        if digest is None:
            return None
        offset = (arr.__array_interface__["data"][0]
                  - root.__array_interface__["data"][0])
        self.refs.add(digest)
        return ("v", digest, offset, arr.shape, arr.strides, arr.dtype.str)


_modules_seen: dict[tuple[Path, ...], set[tuple[str, int]]] = {}


def register_local_modules(roots: list[str] | None = None) -> None:
    """Pickle by value the modules the user has beside their script.

    A host can import what is installed there, but not ``mymodule.py`` from the client's
    working directory: such modules are sent by value with the functions that use them.
    """
    if roots is None:
        roots = [os.getcwd()]
        main_file = getattr(sys.modules.get("__main__"), "__file__", None)
        if main_file:
            roots.append(os.path.dirname(os.path.abspath(main_file)))
    roots_p = [Path(r).resolve() for r in roots]
    # Resolving every module's path took ~200 ms per Parallel call with scikit-learn
    # imported: look only at modules imported since the last call with these roots.
    _named_cache.clear()  # a module may be pickled by value from now on
    seen = _modules_seen.setdefault(tuple(roots_p), set())
    fresh = [(n, m) for n, m in list(sys.modules.items()) if (n, id(m)) not in seen]
    if not fresh:
        return
    installed = {Path(p).resolve() for p in (*site.getsitepackages(), site.getusersitepackages(),
                                             sysconfig.get_paths()["stdlib"]) if p}
    own = Path(__file__).resolve().parent.parent  # the joblib_cloud package
    for name, module in fresh:
        file = getattr(module, "__file__", None)
        if not file or name == "__main__":
            continue
        try:
            path = Path(file).resolve()
        except (OSError, RuntimeError):
            continue
        if own in path.parents or any(p in path.parents for p in installed):
            continue
        if not any(r in path.parents for r in roots_p):
            continue
        top = name.split(".")[0]
        top_module = sys.modules.get(top)
        if top_module is None:
            continue
        try:
            cloudpickle.register_pickle_by_value(top_module)
        except ValueError:
            pass
    seen.update((n, id(m)) for n, m in fresh)  # after registering: a racing call redoes


def dumps_batch(batch: Any, store: ObjectStore) -> tuple[bytes, set[str]]:
    """Cloudpickle ``batch``; large arguments become cache references."""
    payload = plain_payload(batch, store.threshold)
    if payload is not None:
        return payload, set()
    buffer = io.BytesIO()
    pickler = _CachingPickler(buffer, store)
    pickler.dump(batch)
    return buffer.getvalue(), pickler.refs


_by_name: Callable[[Any], bool] | None = getattr(
    cloudpickle.cloudpickle, "_should_pickle_by_reference", None)


class _NotPlain(Exception):
    pass


class _PlainPickler(pickle.Pickler):
    """Plain pickle (C, ~4x faster than cloudpickle's hooks, which at ``batch_size=1``
    were a tenth of the client's time per task) that gives up on anything cloudpickle or
    the cache would treat differently.

    Builtin values and containers never reach ``reducer_override``; everything else
    does, and only what plain pickle saves exactly as cloudpickle would is let through:
    functions and classes that cloudpickle itself pickles by name, and joblib's batch
    around them.  An array, an estimator, a lambda: cloudpickle and the cache take it.
    """

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, (types.BuiltinFunctionType, BatchedCalls, ParallelBackendBase)):
            return NotImplemented
        if isinstance(obj, (types.FunctionType, type)) and _named(obj) and not (
                isinstance(obj, type) and _host_may_lack_warning(obj)):
            return NotImplemented
        raise _NotPlain


_named_cache: dict[Any, bool] = {}


def _named(obj: Any) -> bool:
    """cloudpickle's own verdict, remembered until the next call registers modules."""
    if _by_name is None:  # without it the plain fast path is never taken
        return False
    try:
        return _named_cache[obj]
    except KeyError:
        if len(_named_cache) > 1000:
            _named_cache.clear()
        named = _named_cache[obj] = bool(_by_name(obj))
        return named
    except TypeError:  # unhashable
        return bool(_by_name(obj))


def _host_may_lack_warning(cls: type) -> bool:
    """A warning category from outside the standard library, pickled by name.

    scikit-learn sends the caller's ``warnings.filters`` with every task, so any module
    the client imported that registered a filter (boto3 brings urllib3's) is named in
    the batch, and a host without that module could not unpickle it.  A filter for a
    category that no module on the host can raise changes nothing there, so such a
    category travels by a name that the host resolves to a stand-in if it must.
    """
    if not issubclass(cls, Warning):
        return False
    top = cls.__module__.partition(".")[0]
    return top not in sys.stdlib_module_names and top != "builtins" and _named(cls)


def plain_payload(batch: Any, threshold: int) -> bytes | None:
    """``batch`` pickled plainly, if that is the same as cloudpickle and holds nothing the
    cache would take (a str or bytes over ``threshold``); else None."""
    if _by_name is None or type(batch) is not BatchedCalls:
        return None
    buffer = io.BytesIO()
    try:
        _PlainPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(batch)
    except Exception:  # noqa: BLE001 - _NotPlain, or anything plain pickle refuses
        return None
    return buffer.getvalue() if buffer.tell() < threshold else None

