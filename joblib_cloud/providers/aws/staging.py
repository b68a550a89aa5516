"""Large arguments staged in S3 for a cluster's machines (``client/staging.py`` decides
which; this puts them there and signs the URLs the machines download them from)."""

from __future__ import annotations

import threading
from collections.abc import Callable

from .bucket import Bucket
from .ec2api import error_code

OBJECTS = "objects/"
#: Objects this large are looked for before they are uploaded.
LOOK_FIRST = 8 * 2**20


def marker_prefix(cluster: str) -> str:
    """Where the cluster's markers are: one empty key per object it used."""
    return f"clusters/{cluster}/objects/"


class S3Objects:
    """:class:`provisioner.ObjectStoreAccess` over this account's bucket in ``region``,
    made on the first object staged (a call that stages nothing never touches S3)."""

    def __init__(self, region: str, cluster: str) -> None:
        self.region = region
        self.cluster = cluster
        self.where = f"S3 ({region})"
        self._marked: set[str] = set()
        self._lock = threading.Lock()

    def _bucket(self) -> Bucket:
        bucket = Bucket.for_region(self.region)
        assert bucket is not None
        self.where = f"s3://{bucket.name}"
        return bucket

    def ensure(self, digest: str, segments: list[bytes | memoryview], nbytes: int) -> bool:
        bucket = self._bucket()
        key = OBJECTS + digest
        # A small object is put again rather than looked for: one round trip, not two.
        head = bucket.head(key) if nbytes >= LOOK_FIRST else None
        upload = head is None or head.get("ContentLength") != nbytes
        if head is None or upload:
            bucket.upload(key, segments)
        else:
            bucket.renew_if_old(key, head)
        with self._lock:
            mark = digest not in self._marked
            self._marked.add(digest)
        if mark:
            bucket.put_empty(marker_prefix(self.cluster) + digest)
        return upload

    def url(self, digest: str, expires: float) -> str:
        return self._bucket().presign_get(OBJECTS + digest, expires)


def remove_cluster_objects(bucket: Bucket, markers: list[str]) -> int:
    """Delete a cluster's ``markers`` and the objects they name that no other cluster
    marked (those stay: the other cluster's hosts may still fetch them).  The number of
    objects deleted."""
    ours = set(markers)
    digest = lambda key: key.rsplit("/", 1)[1]  # noqa: E731
    others = {digest(k) for k in bucket.keys("clusters/")
              if k not in ours and k.split("/")[2:3] == ["objects"]}
    gone = [OBJECTS + d for d in {digest(k) for k in markers} - others]
    bucket.delete_keys(gone + markers)
    return len(gone)


def sweep(region: str, cluster: str | None, dry_run: bool, out: Callable[[str], None],
          shared: bool = False) -> bool:
    """``down``'s part in S3: a cluster's staged objects (its shared directory too when
    ``shared``), or (``cluster`` None, ``--all``) the whole bucket.  False when something
    could not be deleted."""
    try:
        bucket = Bucket.for_region(region, create=False)
    except Exception as exc:  # noqa: BLE001 - no S3 permission: nothing of ours there
        if error_code(exc) in ("AccessDenied", "403"):
            return True
        out(f"{region}: ERROR: could not look for the joblib-cloud bucket: {exc}")
        return False
    if bucket is None:
        return True
    verb = "would " if dry_run else ""
    try:
        if cluster is None:
            out(f"{region}: {verb}delete S3 bucket {bucket.name} and everything in it")
            if not dry_run:
                bucket.delete_bucket()
            return True
        if markers := list(bucket.keys(marker_prefix(cluster))):
            out(f"{region}: {verb}delete the objects cluster {cluster!r} staged in "
                f"s3://{bucket.name} ({len(markers)}, less any another cluster uses)")
            if not dry_run:
                remove_cluster_objects(bucket, markers)
        if shared and (files := list(bucket.keys(f"shared/{cluster}/"))):
            out(f"{region}: {verb}delete cluster {cluster!r}'s shared directory "
                f"({len(files)} files)")
            if not dry_run:
                bucket.delete_keys(files)
    except Exception as exc:  # noqa: BLE001 - report; down exits 1
        out(f"{region}: ERROR: could not clean S3 bucket {bucket.name}: {exc}")
        return False
    return True
