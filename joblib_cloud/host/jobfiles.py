"""Host side of a job's files: what it changed (its outputs), the cluster's shared
directory, and the short-lived credentials a job gets to reach its sibling machines.

Shipped with ``jobhost.py`` as source (see ``jobs/targets.py``) and run without the
package, so it needs nothing but the standard library.  It knows paths only; ``jobhost``
resolves job ids and cluster names to directories.  Errors are ``ValueError`` with the
message the user sees.

Outputs are found by difference, not declared: right after the workspace is unpacked,
``manifest.json`` records each file's size and mtime; a file whose size or mtime differ
at the end, or that was not there, is an output.  Nothing watches the job while it runs.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tarfile
import zipfile

#: Never outputs: caches Python writes as a side effect of importing workspace modules.
SKIP_DIRS = frozenset({"__pycache__", ".git", ".pytest_cache", ".ipynb_checkpoints"})
MANIFEST = "manifest.json"
#: The aws boot's background install (wire/contract.py INSTALLING_FILE, in the state dir).
INSTALLING_FILE = "installing"
#: Credentials and settings for the job's own backend: removed once the job ends.
CLOUD_DIR = "cloud"


def walk(root: str) -> dict[str, list[int]]:
    """Regular files under ``root`` (no symlinks followed): relative path -> [size, mtime]."""
    found: dict[str, list[int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        for name in filenames:
            if name.endswith(".pyc"):
                continue
            path = os.path.join(dirpath, name)
            try:
                info = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode):
                found[os.path.relpath(path, root)] = [info.st_size, info.st_mtime_ns]
    return found


def save_manifest(directory: str) -> None:
    with open(os.path.join(directory, MANIFEST), "w") as fh:
        json.dump(walk(os.path.join(directory, "workspace")), fh)


def changed(directory: str, under: str = "") -> dict[str, int]:
    """Files of the workspace (below ``under``) created or changed since the start:
    relative path -> size."""
    workspace = os.path.join(directory, "workspace")
    try:
        with open(os.path.join(directory, MANIFEST)) as fh:
            before = json.load(fh)
    except (OSError, ValueError):
        before = {}
    base = os.path.normpath(under).strip("/") if under else ""
    if base.startswith(".."):
        raise ValueError(f"{under!r} is outside the job's workspace")
    out = {}
    for rel, (size, mtime) in walk(workspace).items():
        if base and base != "." and not (rel == base or rel.startswith(base + "/")):
            continue
        if before.get(rel) != [size, mtime]:
            out[rel] = size
    return out


def human(nbytes: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return ""  # pragma: no cover


def check_cap(sizes: dict[str, int], max_bytes: int, what: str, advice: str) -> None:
    total = sum(sizes.values())
    if total > max_bytes:
        largest = sorted(sizes, key=sizes.__getitem__, reverse=True)[:5]
        listing = ", ".join(f"{f} ({human(sizes[f])})" for f in largest)
        raise ValueError(f"{what} hold {human(total)} ({len(sizes)} files), over the "
                         f"{human(max_bytes)} cap. Largest: {listing}. {advice}")


def write_tar(root: str, names: list[str]) -> None:
    """A tar.gz of ``names`` (relative to ``root``) on stdout."""
    with os.fdopen(os.dup(1), "wb") as out, tarfile.open(fileobj=out, mode="w|gz") as tar:
        for rel in sorted(names):
            try:
                tar.add(os.path.join(root, rel), arcname=rel, recursive=False)
            except OSError:
                continue  # removed while we packed: it is no output any more


def _archive():  # noqa: ANN202 - wire/archive.py, from the package or shipped beside this
    if __package__:
        from ..wire import archive

        return archive
    return sys.modules["archive"]


def read_tar(root: str) -> None:
    """Unpack a tar.gz from stdin into ``root`` (regular files and dirs only)."""
    os.makedirs(root, mode=0o700, exist_ok=True)
    with os.fdopen(os.dup(0), "rb") as stdin, tarfile.open(fileobj=stdin, mode="r|gz") as tar:
        _archive().extract(tar, root)


def op_outputs(directory: str, max_bytes: str, path: str = "") -> None:
    """The job's outputs (under its ``--output`` dir, then under ``path``) as a tar.gz."""
    with open(os.path.join(directory, "command.json")) as fh:
        output = json.load(fh).get("output") or ""
    sizes = changed(directory, output)
    if path:
        base = os.path.normpath(os.path.join(output, path)).strip("/")
        sizes = {k: v for k, v in sizes.items() if k == base or k.startswith(base + "/")}
    check_cap(sizes, int(max_bytes), "the job's outputs",
              "Fetch part of them with `joblib-cloud pull JOB PATH`, write big files "
              "elsewhere, or raise the cap with --max-output.")
    write_tar(os.path.join(directory, "workspace"), list(sizes))


def save_agent_zip(home: str, blob: bytes) -> str:
    """The client's joblib-cloud, kept once per version, unpacked: what the job imports.
    A directory, not the zip itself, so that the job's own backend can ship the package's
    files to the cluster's other machines as the client does."""
    agent_dir = os.path.join(home, "agent")
    os.makedirs(agent_dir, mode=0o700, exist_ok=True)
    path = os.path.join(agent_dir, hashlib.sha256(blob).hexdigest()[:16])
    if not os.path.isdir(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        with zipfile.ZipFile(io.BytesIO(blob)) as archive:
            archive.extractall(tmp)
        try:
            os.rename(tmp, path)
        except OSError:  # another job unpacked the same version meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def write_shims(bin_dir: str, python: str) -> None:
    """``python`` and ``python3`` in the job's PATH run the backend's interpreter."""
    os.makedirs(bin_dir, exist_ok=True)
    first, _, rest = python.strip().partition(" ")
    if "/" not in first:  # resolve now, or the shim named python3 would call itself
        first = shutil.which(first) or first
    for name in ("python", "python3"):
        path = os.path.join(bin_dir, name)
        with open(path, "w") as fh:
            fh.write(f'#!/bin/sh\nexec {first} {rest} "$@"\n')
        os.chmod(path, 0o755)


# ------------------------------------------------------------------ shared directory


def _inside(root: str, rel: str) -> str:
    path = os.path.normpath(os.path.join(root, rel))
    if path != root and not path.startswith(root + os.sep):
        raise ValueError(f"{rel!r} is outside the shared directory")
    return path


def op_shared_ls(root: str, rel: str = "") -> None:
    """One JSON line per file: path, size, mtime."""
    base = _inside(root, rel)
    files = walk(base) if os.path.isdir(base) else {}
    if os.path.isfile(base):
        info = os.stat(base)
        files = {"": [info.st_size, info.st_mtime_ns]}
    for name, (size, mtime) in sorted(files.items()):
        path = os.path.normpath(os.path.join(rel, name)) if name else rel
        sys.stdout.write(json.dumps({"path": path, "size": size,
                                     "mtime": mtime / 1e9}) + "\n")


def op_shared_put(root: str, rel: str = "") -> None:
    read_tar(_inside(root, rel))


def op_shared_get(root: str, rel: str = "") -> None:
    base = _inside(root, rel)
    if os.path.isfile(base):
        parent = os.path.dirname(base)
        write_tar(parent, [os.path.basename(base)])
    elif os.path.isdir(base):  # paths keep the directory's own name (none for the root)
        name = "" if base == root else os.path.basename(base)
        write_tar(os.path.dirname(base) if name else base,
                  [os.path.join(name, rel) for rel in walk(base)])
    else:
        raise ValueError(f"no {rel!r} in the shared directory")


def op_shared_rm(root: str, rel: str) -> None:
    path = _inside(root, rel)
    if path == root:
        raise ValueError("give a path inside the shared directory to remove")
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)
    else:
        raise ValueError(f"no {rel!r} in the shared directory")


def _copy_manifest(root: str, job: str) -> str:
    if not job.isalnum():
        raise ValueError(f"malformed job id {job!r}")
    return os.path.join(os.path.dirname(root), f".{os.path.basename(root)}.{job}.json")


def op_shared_replace(root: str, job: str) -> None:
    """On a sibling of a ``run -n N`` job: its copy becomes the tar.gz on stdin (the job
    machine's directory), and what it holds now is recorded for :func:`op_shared_changed`."""
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    read_tar(root)
    with open(_copy_manifest(root, job), "w") as fh:
        json.dump(walk(root), fh)


def op_shared_changed(root: str, job: str) -> None:
    """On a sibling, once the job ended: what its tasks created or changed, as a tar.gz."""
    path = _copy_manifest(root, job)
    try:
        with open(path) as fh:
            before = json.load(fh)
    except (OSError, ValueError):
        before = {}
    write_tar(root, [rel for rel, stamp in walk(root).items() if before.get(rel) != stamp])
    if os.path.exists(path):
        os.unlink(path)


SHARED_OPS = {"shared-ls": op_shared_ls, "shared-put": op_shared_put,
              "shared-get": op_shared_get, "shared-rm": op_shared_rm,
              "shared-replace": op_shared_replace, "shared-changed": op_shared_changed}


# ------------------------------------------------------------------ sibling credentials


def write_cloud_files(directory: str, files: dict[str, str]) -> str:
    """Files the job's own backend needs (known hosts, aws: the cluster's key), 0600."""
    cloud = os.path.join(directory, CLOUD_DIR)
    os.makedirs(cloud, mode=0o700, exist_ok=True)
    for name, text in files.items():
        if "/" in name or name.startswith("."):
            raise ValueError(f"malformed file name {name!r}")
        fd = os.open(os.path.join(cloud, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
    return cloud


def run_probe(env: dict, *args: str, wait: bool = True):  # noqa: ANN201
    """``python -m joblib_cloud.jobs.probe ARGS`` in the job's environment, where the
    job's machine logs in to its siblings as the job's backend will: None, or why it
    failed; without ``wait``, the process (its outcome does not matter)."""
    command = ["/bin/sh", "-c", 'exec python -m joblib_cloud.jobs.probe "$@"', "sh", *args]
    if not wait:
        return subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = subprocess.run(command, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=3600)
    if done.returncode == 0:
        return None
    return (done.stderr.strip().splitlines()[-1] if done.stderr.strip()
            else f"checking the cluster's machines failed (exit code {done.returncode})")


def remove_cloud_files(directory: str) -> None:
    """The job ended: what let it reach the siblings goes with it."""
    shutil.rmtree(os.path.join(directory, CLOUD_DIR), ignore_errors=True)


def after_boot_install(command: str, home: str) -> str:
    """``command`` once the aws boot's background install is over (its state file stays
    ``flock``-ed while it runs), as tasks wait for it, so a job's script finds numpy and
    the rest; a failed install is said first, with where its log is."""
    state = shlex.quote(os.path.join(home, INSTALLING_FILE))
    return (f'if [ -e {state} ]; then flock -s {state} true 2>/dev/null; grep -q \'"failed"\' '
            f'{state} 2>/dev/null && echo "joblib-cloud: the host\'s install of the packages '
            f'failed: see $(sed \'s/.*"log": "\\([^"]*\\)".*/\\1/\' {state})" >&2; fi\n'
            f'{command}')
