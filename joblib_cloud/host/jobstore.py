"""Host side of a job's S3 on ``aws``: the shared directory's mirror and the outputs
saved before the machine may stop, through presigned URLs only.

The machine holds no AWS credentials.  At the start the client hands it a presigned GET
per object of the cluster's shared prefix (``shared/<cluster>/``), and two presigned POST
policies valid for the machine's lifetime: one for the outputs' single key
(``jobs/<job>/outputs.tar.gz``), one for keys under the shared prefix (an S3
``starts-with`` condition), each with a ``content-length-range`` (``--max-output``).  Only what
changed moves: a download when the object's ETag differs from the one last seen here, an
upload when a file's size or mtime differ from when the job started.  Files a job deletes
are not deleted from the bucket (``joblib-cloud shared rm`` does that).

Shipped with ``jobhost.py`` as source; standard library only.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import urllib.request
import uuid

STATE = ".s3-etags.json"  # beside the mirror: what each file's object was when last seen


def post_file(post: dict, key: str, path: str) -> str | None:
    """Upload ``path`` as ``key`` with a presigned POST policy; the object's ETag."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
             f"{value}\r\n" for name, value in {**post["fields"], "key": key}.items()]
    head = ("".join(parts) + f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="{os.path.basename(key)}"\r\nContent-Type: application/octet-stream'
            "\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    size = os.path.getsize(path)
    digest = hashlib.md5(usedforsecurity=False)

    def body():  # noqa: ANN202 - streamed, not read into memory
        yield head
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
                yield chunk
        yield tail

    request = urllib.request.Request(
        post["url"], data=body(), method="POST",
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}",
                 "Content-Length": str(len(head) + size + len(tail))})
    with urllib.request.urlopen(request, timeout=900) as response:
        # S3 answers with the ETag; a single-part SSE-S3 object's is its MD5 anyway.
        return response.headers.get("ETag") or f'"{digest.hexdigest()}"'


def download(url: str, path: str) -> None:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.part"
    with urllib.request.urlopen(url, timeout=900) as response, open(tmp, "wb") as out:
        while chunk := response.read(1 << 20):
            out.write(chunk)
    os.replace(tmp, path)


def _state_path(mirror: str) -> str:
    return os.path.join(os.path.dirname(mirror), f".{os.path.basename(mirror)}{STATE}")


def _load_state(mirror: str) -> dict:
    try:
        with open(_state_path(mirror)) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def _save_state(mirror: str, state: dict) -> None:
    tmp = _state_path(mirror) + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(state, fh)
    os.replace(tmp, _state_path(mirror))


def sync_down(mirror: str, objects: dict) -> None:
    """Bring the mirror up to date with the bucket: ``objects`` = relative path ->
    {url, etag}.  A file the bucket no longer has, and that was seen there, goes."""
    state = _load_state(mirror)
    for rel, info in objects.items():
        path = os.path.normpath(os.path.join(mirror, rel))
        if not path.startswith(mirror + os.sep):
            continue  # a key that would land outside: never written
        if state.get(rel) != info["etag"] or not os.path.exists(path):
            download(info["url"], path)
            state[rel] = info["etag"]
    for rel in [r for r in state if r not in objects]:
        try:
            os.unlink(os.path.join(mirror, rel))
        except OSError:
            pass
        del state[rel]
    _save_state(mirror, state)


def sync_up(mirror: str, before: dict, after: dict, post: dict, prefix: str,
            max_bytes: int) -> int:
    """Upload the files that changed (``before``/``after``: path -> [size, mtime]); a file
    over ``max_bytes`` (the policy's cap) is not sent, and said after the others are."""
    state = _load_state(mirror)
    sent, over = 0, []
    for rel, stamp in sorted(after.items()):
        if before.get(rel) == stamp:
            continue
        if stamp[0] > max_bytes:
            over.append(f"{rel} ({stamp[0]} bytes)")
            continue
        state[rel] = post_file(post, prefix + rel, os.path.join(mirror, rel))
        sent += 1
    _save_state(mirror, state)
    if over:
        raise ValueError(f"not saved: {', '.join(over)}: a shared file may be at most "
                         f"{max_bytes} bytes (--max-output)")
    return sent


def save_outputs(directory: str, names: list[str], post: dict, prefix: str) -> None:
    """The job's outputs as one tar.gz object, ``<prefix>outputs.tar.gz``."""
    archive = os.path.join(directory, "outputs.tar.gz")
    workspace = os.path.join(directory, "workspace")
    with tarfile.open(archive, "w:gz") as tar:
        for rel in sorted(names):
            try:
                tar.add(os.path.join(workspace, rel), arcname=rel, recursive=False)
            except OSError:
                continue
    try:
        post_file(post, prefix + "outputs.tar.gz", archive)
    finally:
        os.unlink(archive)


def _files():  # noqa: ANN202 - jobfiles, shipped beside this module
    import sys

    return sys.modules["jobfiles"]


def on_start(directory: str, spec: dict) -> None:
    """Before the job: the shared mirror brought up to date, and its state recorded."""
    s3 = spec.get("s3") or {}
    mirror = spec.get("shared_dir")
    if mirror and s3.get("shared"):
        sync_down(mirror, s3["shared"]["get"])
        with open(os.path.join(directory, "shared_manifest.json"), "w") as fh:
            json.dump(_files().walk(mirror), fh)


def on_end(directory: str, spec: dict) -> list[str]:
    """After the job, before anything says it ended (so before the machine may stop):
    changed shared files and the outputs saved to the bucket.  Problems, as messages."""
    s3 = spec.get("s3") or {}
    problems = []
    mirror = spec.get("shared_dir")
    if mirror and s3.get("shared"):
        try:
            with open(os.path.join(directory, "shared_manifest.json")) as fh:
                before = json.load(fh)
            sync_up(mirror, before, _files().walk(mirror), s3["shared"]["post"],
                    s3["shared"]["prefix"], int(s3["shared"]["max_bytes"]))
        except Exception as exc:  # noqa: BLE001 - reported in the job's stderr
            problems.append(f"saving the shared directory to S3 failed: {exc}")
    if s3.get("outputs"):
        try:
            sizes = _files().changed(directory, spec.get("output") or "")
            _files().check_cap(sizes, int(s3["outputs"]["max_bytes"]), "the job's outputs",
                               "They stay on the machine while it runs: `joblib-cloud "
                               "pull JOB PATH`.")
            save_outputs(directory, list(sizes), s3["outputs"]["post"],
                         s3["outputs"]["prefix"])
        except Exception as exc:  # noqa: BLE001 - reported in the job's stderr
            problems.append(f"saving the outputs to S3 failed: {exc}")
    return problems
