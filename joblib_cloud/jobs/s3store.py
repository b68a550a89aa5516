"""``aws``: what jobs keep in joblib-cloud's S3 bucket (``providers/aws/bucket.py``).

- ``jobs/<job>/outputs.tar.gz``: a finished job's outputs, saved by its machine before it
  says the job ended (so before its idle timer may stop it): ``pull`` works after the
  machine is gone.
- ``shared/<cluster>/...``: the cluster's shared directory.  A job's machine mirrors it
  into ``$JOBLIB_CLOUD_SHARED`` at the start and saves what changed at the end
  (``host/jobstore.py``); ``joblib-cloud shared`` works on the prefix directly, no
  machine needed.

The machines get no credentials: the client gives the job presigned GETs for the shared
objects (valid :data:`GET_EXPIRY`, used at the start) and presigned POST policies, each
allowed only under one key prefix, valid for the machine's lifetime.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

from ..config import CloudConfig
from ..providers.aws import ec2api
from ..providers.aws.bucket import Bucket
from .outputs import unpack

#: Seconds the start's presigned GETs stay valid: they are used while the job starts.
GET_EXPIRY = 3600.0


def job_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/"


def shared_prefix(cluster: str) -> str:
    return f"shared/{cluster}/"


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
    return {"outputs": {"post": bucket.presign_post(job_prefix(job_id), lifetime),
                        "prefix": job_prefix(job_id), "max_bytes": max_output},
            "shared": {"post": bucket.presign_post(shared, lifetime), "prefix": shared,
                       "get": gets}}


def fetch_outputs(region: str | None, job_id: str, path: str, into: Path
                  ) -> tuple[Path, list[str], int]:
    """A job's outputs from the bucket (its machine may be gone)."""
    bucket = Bucket.for_region(region, create=False) if region else None
    key = job_prefix(job_id) + "outputs.tar.gz"
    if bucket is None or not bucket.exists(key):
        raise RuntimeError(f"job {job_id}'s machine cannot be reached and no outputs of it "
                           "were saved to S3 (it may still be running, or ended without "
                           "outputs, or they were over the size cap)")
    archive = bucket.client.get_object(Bucket=bucket.name, Key=key)["Body"].read()
    if path:
        archive = _only(archive, path.strip("/"))
    names = unpack(archive, into)
    return into, names, sum((into / n).stat().st_size for n in names)


def _only(archive: bytes, path: str) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as src, \
            tarfile.open(fileobj=out, mode="w:gz") as dst:
        for member in src.getmembers():
            if member.isfile() and (member.name == path or member.name.startswith(path + "/")):
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
            raise ValueError(f"{rel!r} is outside the shared directory")
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
            raise ValueError(f"{local} does not exist")
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
            raise ValueError(f"no {path!r} in the shared directory")
        key = self._key(path)[len(self.prefix):]
        strip = key.rsplit("/", 1)[0] + "/" if "/" in key else ""
        names = []
        for rel in sorted(found):
            name = rel[len(strip):]
            target = into / name
            target.parent.mkdir(parents=True, exist_ok=True)
            self.bucket.client.download_file(self.bucket.name, self.prefix + rel, str(target))
            names.append(name)
        return names

    def rm(self, path: str) -> None:
        found = self._under(path)
        if not path.strip("/") or not found:
            raise ValueError(f"no {path!r} in the shared directory" if path.strip("/") else
                             "give a path inside the shared directory to remove")
        self.bucket.delete_keys([self.prefix + r for r in found])

    def close(self) -> None:
        pass
