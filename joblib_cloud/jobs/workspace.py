"""The working directory that ``joblib-cloud run`` copies to the machine.

What is copied is what git would commit: ``git ls-files -co --exclude-standard`` in a git
work tree (so ``.gitignore``d data, virtualenvs and build output stay home), and outside
git a walk that honours the directory's own ``.gitignore`` files in a simple way.  A size
cap stops an accidental upload of a dataset before it starts.
"""

from __future__ import annotations

import fnmatch
import io
import logging
import os
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from ..host.jobfiles import human

log = logging.getLogger("joblib_cloud")

DEFAULT_MAX_UPLOAD = 100 * 2**20
#: Never worth copying, with or without a .gitignore.
ALWAYS_SKIP = frozenset({".git", "__pycache__", ".venv", "venv", ".mypy_cache",
                         ".pytest_cache", ".ruff_cache", ".ipynb_checkpoints", "node_modules",
                         ".tox", ".DS_Store"})


class WorkspaceTooLargeError(ValueError):
    """The directory to upload is over the size cap."""


@dataclass(frozen=True)
class Workspace:
    root: Path
    files: tuple[str, ...]  # POSIX paths relative to root
    nbytes: int
    archive: bytes  # tar.gz of files


def git_files(root: Path) -> list[str] | None:
    """Tracked and untracked-but-not-ignored files under ``root``; None outside git."""
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"],
                             cwd=root, capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return [p for p in out.stdout.decode(errors="surrogateescape").split("\0") if p]


def _read_patterns(directory: Path) -> list[str]:
    try:
        lines = (directory / ".gitignore").read_text(errors="replace").splitlines()
    except OSError:
        return []
    # Negations ("!keep.txt") are beyond this simple fallback: they are ignored.
    return [s for line in lines if (s := line.strip()) and not s.startswith(("#", "!"))]


def _ignored(rel: str, is_dir: bool, patterns: list[tuple[str, str]]) -> bool:
    name = rel.rsplit("/", 1)[-1]
    for base, pattern in patterns:
        if base and not rel.startswith(base + "/"):
            continue
        local = rel[len(base) + 1:] if base else rel
        dir_only = pattern.endswith("/")
        pat = pattern.rstrip("/")
        if dir_only and not is_dir:
            continue
        if "/" in pat:  # anchored to the .gitignore's directory
            if fnmatch.fnmatchcase(local, pat.lstrip("/")):
                return True
        elif fnmatch.fnmatchcase(name, pat):
            return True
    return False


def walk_files(root: Path) -> list[str]:
    """Files under ``root`` minus what its ``.gitignore`` files exclude (fallback)."""
    out: list[str] = []
    patterns: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir
        patterns.extend((rel_dir, p) for p in _read_patterns(Path(dirpath)))

        def rel(name: str, base: str = rel_dir) -> str:
            return f"{base}/{name}" if base else name

        dirnames[:] = sorted(d for d in dirnames if d not in ALWAYS_SKIP
                             and not _ignored(rel(d), True, patterns))
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        dirnames[:] = [d for d in dirnames if d not in links]
        filenames = filenames + links  # copied as links, as git would
        out.extend(rel(f) for f in sorted(filenames)
                   if f not in ALWAYS_SKIP and not f.endswith(".pyc")
                   and not _ignored(rel(f), False, patterns))
    return out


def list_files(root: Path) -> list[str]:
    files = git_files(root)
    if files is None:
        return walk_files(root)
    # Tracked files deleted from disk are still listed by git: skip them.
    return sorted(f for f in files if os.path.lexists(root / f))


def _escapes(root: Path, rel: str) -> bool:
    """A symlink whose target is outside ``root`` (the host refuses to extract those)."""
    path = root / rel
    if not path.is_symlink():
        return False
    target = (path.parent / os.readlink(path)).resolve()
    return target != root and root not in target.parents


def pack(root: Path, max_bytes: int = DEFAULT_MAX_UPLOAD) -> Workspace:
    """Collect and tar the files of ``root``; refuse (with what to do) over ``max_bytes``."""
    root = root.resolve()
    files = list_files(root)
    outside = [f for f in files if _escapes(root, f)]
    if outside:
        log.warning("not copying %d symlink(s) that point outside %s: %s", len(outside),
                    root, ", ".join(outside[:5]))
        files = [f for f in files if f not in set(outside)]
    sizes = {f: (root / f).lstat().st_size for f in files}
    total = sum(sizes.values())
    if total > max_bytes:
        largest = sorted(sizes, key=sizes.__getitem__, reverse=True)[:5]
        listing = ", ".join(f"{f} ({human(sizes[f])})" for f in largest)
        raise WorkspaceTooLargeError(
            f"{root} holds {human(total)} to upload ({len(files)} files), over the "
            f"{human(max_bytes)} cap. Largest: {listing}. Add data files to .gitignore "
            "(the job can download them on the machine), run from a smaller directory, "
            "or raise the cap with --max-upload.")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=6) as tar:
        for rel in files:
            tar.add(root / rel, arcname=rel, recursive=False)
    return Workspace(root, tuple(files), total, buffer.getvalue())
