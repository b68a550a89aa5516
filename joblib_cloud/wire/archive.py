"""Unpacking the archives that cross between client and hosts (a job's workspace going
up, its outputs coming back), the same safe way on every Python.

``tarfile``'s extraction filters exist only from 3.10.12, 3.11.4 and 3.12 on (Debian 12's
own Python is 3.11.2), and ``extractall`` without one trusts every name and link in the
archive.  So the checks are ours, on every Python: regular files and directories only
(links, devices and FIFOs are skipped), no absolute names, no ``..``, and each path,
resolved through whatever links the target directory already holds, stays inside it.
Files are written by hand (owner read/write, the archive's execute bits, no set-id bits,
its modification time), so no version difference in ``tarfile`` reaches the result.

Shipped to hosts as source beside the job helper (``jobs/targets.py``), so it needs
nothing but the standard library.
"""

from __future__ import annotations

import os
import shutil
import tarfile


class UnsafeArchiveError(ValueError):
    """A name from an archive, a machine or a bucket would write outside its target
    directory: an absolute name, ``..``, or a link that leads out."""


def safe_path(root: str, name: str, what: str = "archive member") -> str:
    """``root/name`` resolved, if ``name`` is relative, has no ``..`` or empty part and
    resolves inside ``root``; else :class:`UnsafeArchiveError`."""
    parts = name.replace("\\", "/").split("/")
    while parts and parts[-1] in ("", "."):  # "dir/" and "dir/." name the directory
        parts.pop()
    if not name or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") \
            or any(part in ("", "..") for part in parts if part != "."):
        raise UnsafeArchiveError(f"refusing {name!r} ({what}): only relative names inside "
                                 f"{root} are allowed")
    real_root = os.path.realpath(root)
    target = os.path.realpath(os.path.join(real_root, *parts))
    if target != real_root and not target.startswith(real_root + os.sep):
        raise UnsafeArchiveError(f"refusing {name!r} ({what}): it leads outside {root} "
                                 "(through a link)")
    return target


def extract(tar: tarfile.TarFile, root: str, max_bytes: int | None = None) -> list[str]:
    """Unpack ``tar`` (a stream or a file) into ``root``: the names of the regular files.

    An unsafe name stops the extraction with :class:`UnsafeArchiveError`, and so does a
    member that would take the files past ``max_bytes`` (a small archive that unpacks to
    a disk's worth), before it is written; a member that is neither a file nor a
    directory is left out."""
    os.makedirs(root, exist_ok=True)
    names = []
    total = 0
    for member in tar:
        if not (member.isfile() or member.isdir()):
            continue
        total += member.size if member.isfile() else 0
        if max_bytes is not None and total > max_bytes:
            raise UnsafeArchiveError(f"refusing {member.name!r} (archive member): the "
                                     f"files would take more than {max_bytes} bytes")
        target = safe_path(root, member.name)
        if member.isdir():
            os.makedirs(target, exist_ok=True)
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        source = tar.extractfile(member)
        assert source is not None  # a regular file always has contents
        if os.path.lexists(target) and not os.path.isfile(target):
            raise UnsafeArchiveError(f"refusing {member.name!r} (archive member): "
                                     f"{target} exists and is not a regular file")
        mode = 0o600 | (member.mode & 0o755)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
        with source, os.fdopen(os.open(target, flags, mode), "wb") as out:
            shutil.copyfileobj(source, out, 1 << 20)
        os.chmod(target, mode)
        os.utime(target, (member.mtime, member.mtime))
        names.append(member.name)
    return names
