"""``aws``: what jobs keep in joblib-cloud's S3 bucket (``providers/aws/bucket.py``).

- ``jobs/<job>/outputs.tar.gz``: a finished job's outputs, saved by its machine before it
  says the job ended (so before its idle timer may stop it): ``pull`` works after the
  machine is gone.
- ``shared/<cluster>/...``: the cluster's shared directory.  A job's machine mirrors it
  into ``$JOBLIB_CLOUD_SHARED`` at the start and saves what changed at the end
  (``host/jobstore.py``); ``joblib-cloud shared`` works on the prefix directly, no
  machine needed.

The machines get no credentials: the client gives the job presigned GETs for the shared
objects (valid :data:`GET_EXPIRY`, used at the start) and presigned POST policies valid
for the machine's lifetime: the outputs' for their one key, the shared directory's for
keys under its prefix, each with a size cap (``--max-output``).

Whatever a job wrote is untrusted here: a key becomes a local path only when every part
of it is a plain name (:func:`local_path`), and what ``pull`` takes from the bucket is
capped before it is unpacked.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

from ...config import CloudConfig
from ...errors import ConfigError, JobError
from ...host.jobfiles import human
from ...jobs.outputs import DEFAULT_MAX_OUTPUT, unpack
from ...wire.archive import UnsafeArchiveError, safe_path
from . import ec2api
from .bucket import Bucket

#: Seconds the start's presigned GETs stay valid: they are used while the job starts.
GET_EXPIRY = 3600.0


def job_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/"


def shared_prefix(cluster: str) -> str:
    return f"shared/{cluster}/"


def outputs_key(job_id: str) -> str:
    return job_prefix(job_id) + "outputs.tar.gz"


class SharedPathError(JobError, ValueError):
    """A path in the shared directory that is not there, or would lead outside it."""


def local_path(root: Path, rel: str) -> Path:
    """``root / rel`` for a name that came from the bucket or a machine, by the rule every
    such name follows (``wire/archive.py``): relative, no ``..`` or empty part, and
    inside ``root`` once resolved through the links already there."""
    try:
        return Path(safe_path(str(root), rel, what="from the shared directory"))
    except UnsafeArchiveError as exc:
        raise SharedPathError(f"{exc}. Remove it with `joblib-cloud shared rm`.") from None


def region_of(config: CloudConfig) -> str:
    return config.region or ec2api.session(None).region_name


def objects(bucket: Bucket, prefix: str) -> dict[str, dict[str, Any]]:
    """Relative key -> {etag, size, mtime} under ``prefix``."""
    return {item["Key"][len(prefix):]: {"etag": item["ETag"], "size": item["Size"],
                                        "mtime": item["LastModified"].timestamp()}
            for item in bucket.listing(prefix)}


def start_options(region: str, job_id: str, cluster: str, lifetime: float,
                  max_output: int) -> dict[str, Any]:
    """What the job's machine needs to mirror the shared prefix and save its outputs."""
    bucket = Bucket.for_region(region)
    shared = shared_prefix(cluster)
    gets = {rel: {"url": bucket.presign_get(shared + rel, GET_EXPIRY), "etag": info["etag"]}
            for rel, info in objects(bucket, shared).items()}
    return {"outputs": {"post": bucket.presign_post(outputs_key(job_id), lifetime,
                                                    max_output, exact=True),
                        "prefix": job_prefix(job_id), "max_bytes": max_output},
            "shared": {"post": bucket.presign_post(shared, lifetime, max_output),
                       "prefix": shared, "get": gets, "max_bytes": max_output}}


def fetch_outputs(region: str | None, job_id: str, path: str, into: Path,
                  max_bytes: int = DEFAULT_MAX_OUTPUT) -> tuple[Path, list[str], int]:
    """A job's outputs from the bucket (its machine may be gone).  The archive and what
    it unpacks to are held to ``max_bytes`` (a small archive may unpack to a disk's worth)
    before anything is written here."""
    bucket = Bucket.for_region(region, create=False) if region else None
    key = outputs_key(job_id)
    head = bucket.head(key) if bucket is not None else None
    if bucket is None or head is None:
        raise JobError(f"job {job_id}'s machine cannot be reached and no outputs of it "
                           "were saved to S3 (it may still be running, or ended without "
                           "outputs, or they were over the size cap)")
    if head["ContentLength"] > max_bytes:
        raise JobError(_over(job_id, f"its saved archive is {human(head['ContentLength'])}",
                                 max_bytes))
    body = bucket.client.get_object(Bucket=bucket.name, Key=key)["Body"].read(max_bytes + 1)
    archive = _only(body, path.strip("/"), job_id, max_bytes)
    names = unpack(archive, into, max_bytes)
    return into, names, sum((into / n).stat().st_size for n in names)


def _over(job_id: str, what: str, max_bytes: int) -> str:
    return (f"job {job_id}'s outputs were not copied: {what}, over --max-output "
            f"({human(max_bytes)}). Give a PATH to pull part of them, or a larger "
            "--max-output if you expect that much.")


def _only(archive: bytes, path: str, job_id: str, max_bytes: int) -> bytes:
    """The archive's regular files (below ``path``), their sizes summed as the headers
    are read: over ``max_bytes`` nothing is unpacked."""
    out, total = io.BytesIO(), 0
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as src, \
            tarfile.open(fileobj=out, mode="w:gz") as dst:
        for member in src:
            if not member.isfile() or (path and member.name != path
                                       and not member.name.startswith(path + "/")):
                continue
            total += member.size
            if total > max_bytes:
                raise JobError(_over(job_id, f"they unpack to more than {human(total)}",
                                         max_bytes))
            dst.addfile(member, src.extractfile(member))
    return out.getvalue()


class S3Shared:
    """``joblib-cloud shared`` on aws: the bucket's ``shared/<cluster>/`` prefix."""

    def __init__(self, config: CloudConfig) -> None:
        self.bucket = Bucket.for_region(region_of(config))
        self.prefix = shared_prefix(config.cluster)

    def _key(self, rel: str) -> str:
        parts = [p for p in rel.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise SharedPathError(f"{rel!r} is outside the shared directory")
        return self.prefix + "/".join(parts)

    def _under(self, rel: str) -> dict[str, dict[str, Any]]:
        key = self._key(rel)[len(self.prefix):]
        return {r: i for r, i in objects(self.bucket, self.prefix).items()
                if not key or r == key or r.startswith(key + "/")}

    def ls(self, path: str = "") -> list[dict[str, Any]]:
        return [{"path": r, "size": i["size"], "mtime": i["mtime"]}
                for r, i in sorted(self._under(path).items())]

    def put(self, local: Path, dest: str = "") -> None:
        if not local.exists():
            raise ConfigError(f"{local} does not exist")
        base = self._key(dest)
        base = base if base.endswith("/") else base + "/"
        files = [local] if local.is_file() else sorted(
            p for p in local.rglob("*") if p.is_file() and not p.is_symlink())
        for path in files:
            rel = path.name if path == local else \
                f"{local.resolve().name}/{path.relative_to(local).as_posix()}"
            self.bucket.upload_file(base + rel, str(path))

    def get(self, path: str, into: Path) -> list[str]:
        found = self._under(path)
        if not found:
            raise SharedPathError(f"no {path!r} in the shared directory")
        key = self._key(path)[len(self.prefix):]
        strip = key.rsplit("/", 1)[0] + "/" if "/" in key else ""
        targets = {rel: local_path(into, rel[len(strip):]) for rel in sorted(found)}
        names = []
        for rel, target in targets.items():
            name = rel[len(strip):]
            target.parent.mkdir(parents=True, exist_ok=True)
            self.bucket.client.download_file(self.bucket.name, self.prefix + rel, str(target))
            names.append(name)
        return names

    def rm(self, path: str) -> None:
        found = self._under(path)
        if not path.strip("/") or not found:
            raise SharedPathError(f"no {path!r} in the shared directory" if path.strip("/") else
                             "give a path inside the shared directory to remove")
        self.bucket.delete_keys([self.prefix + r for r in found])

    def close(self) -> None:
        pass
