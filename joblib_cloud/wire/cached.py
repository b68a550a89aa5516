"""The per-host cache of large arguments: its file format, and reading it on the host.

The client (``serialization.py``) writes each large argument once as a file: a header
(the pickle with its buffers out of band) then each buffer, aligned.  On the host, the
agent stores the upload as that file and workers resolve references with
:func:`load_cached`, which memory-maps it, so all workers on a host share one copy of
``X`` in the page cache instead of holding one copy each.
"""

from __future__ import annotations

import collections
import importlib
import io
import mmap
import os
import pickle
import struct
from typing import Any

ALIGN = 64
#: A cached object's name: this many hex digits of the SHA-256 of its file.
DIGEST_CHARS = 32


_LEN = struct.Struct("!Q")


def _pad(n: int) -> int:
    return (-n) % ALIGN


_stand_ins: dict[tuple[str, str], type] = {}


def _warning_category(module: str, qualname: str) -> type:
    """Host side of :func:`_host_may_lack_warning`: the category, or a stand-in."""
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        if isinstance(obj, type):
            return obj
    except (ImportError, AttributeError):
        pass
    key = (module, qualname)
    if key not in _stand_ins:
        _stand_ins[key] = type(qualname.rpartition(".")[2], (Warning,), {
            "__module__": module, "__qualname__": qualname,
            "__doc__": f"Stands in for {module}.{qualname}, not installed on this host."})
    return _stand_ins[key]


_loaded: collections.OrderedDict[str, Any] = collections.OrderedDict()


_LOADED_MAX = 64


def load_cached(cache_dir: str, digest: str) -> Any:
    """The cached object ``digest``, memory-mapped read-only (shared between workers)."""
    hit = _loaded.get(digest)
    if hit is not None:
        _loaded.move_to_end(digest)
        return hit
    with open(os.path.join(cache_dir, digest), "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    (hlen,) = _LEN.unpack_from(mm, 0)
    header = pickle.loads(mm[_LEN.size : _LEN.size + hlen])
    start = _LEN.size + hlen + _pad(_LEN.size + hlen)
    view = memoryview(mm)
    buffers = [view[start + off : start + off + length] for off, length in header["buffers"]]
    obj = pickle.loads(header["meta"], buffers=buffers)
    _loaded[digest] = obj
    if len(_loaded) > _LOADED_MAX:
        _loaded.popitem(last=False)
    return obj


class CachedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, cache_dir: str) -> None:
        super().__init__(file)
        self.cache_dir = cache_dir

    def persistent_load(self, pid: Any) -> Any:
        if pid[0] == "c":
            return load_cached(self.cache_dir, pid[1])
        if pid[0] == "v":
            import numpy as np

            _, digest, offset, shape, strides, dtype = pid
            base = load_cached(self.cache_dir, digest)
            return np.ndarray(shape, dtype=np.dtype(dtype), buffer=base, offset=offset,
                              strides=strides)
        raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")


def loads_batch(payload: bytes | memoryview, cache_dir: str) -> Any:
    return CachedUnpickler(io.BytesIO(payload), cache_dir).load()

