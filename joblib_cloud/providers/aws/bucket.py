"""joblib-cloud's S3 bucket: one per account and region, made on first use.

It holds large arguments staged for a cluster's hosts (``objects/<digest>``, content
addressed, so the same ``X`` is uploaded once while it is there, whatever the call,
cluster or day), which clusters use each one (``clusters/<cluster>/objects/<digest>``,
empty markers: ``down`` removes a cluster's objects by them), and what jobs keep.

The name is predictable, so anyone could make it first: every call names the owner it
expects (``ExpectedBucketOwner``, and the source's on copies), so S3 refuses a bucket of
another account instead of taking this one's data, and joblib-cloud says so.

Made private: public access blocked, requests without TLS denied by its policy,
encrypted by default (SSE-S3), tagged, with a
lifecycle rule that expires staged objects after :data:`OBJECT_DAYS` days (an object in
use is renewed: see :meth:`Bucket.renew_if_old`), jobs' saved outputs after
:data:`JOB_DAYS`, and aborts unfinished uploads.  The shared directories
(``shared/<cluster>/``) stay until ``joblib-cloud shared rm`` or ``down --all``.  Hosts
never get credentials for it, only presigned URLs for one object (GET) or one key prefix
(POST).
"""

from __future__ import annotations

import datetime
import io
import json
import logging
import threading
from collections.abc import Iterator
from typing import Any, Literal, overload

from . import ec2api
from .ec2api import AWSError, call, error_code, unless

OBJECT_DAYS = 7
#: A finished job's saved outputs (``joblib-cloud pull``) are kept this long.
JOB_DAYS = 30
#: An object older than this is copied onto itself when used, restarting its expiry.
RENEW_AFTER = datetime.timedelta(days=1)
TAG = {"Key": "joblib-cloud:bucket", "Value": "staging"}
#: Multipart: parts of this size, this many in flight.
PART_SIZE = 16 * 2**20
CONCURRENCY = 8

log = logging.getLogger("joblib_cloud")
_buckets: dict[str, Bucket] = {}
_lock = threading.Lock()


def bucket_name(account: str, region: str) -> str:
    return f"joblib-cloud-{account}-{region}"


class SegmentReader(io.RawIOBase):
    """A seekable file over a list of byte buffers, read without joining them."""

    def __init__(self, segments: list[bytes | memoryview]) -> None:
        self._views = [memoryview(s).cast("B") for s in segments]
        self._starts, total = [], 0
        for view in self._views:
            self._starts.append(total)
            total += len(view)
        self._size = total
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(base + offset, 0)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        out = memoryview(buffer).cast("B")
        written = 0
        for start, view in zip(self._starts, self._views, strict=True):
            if written == len(out) or start > self._pos:
                break
            inner = self._pos - start
            if inner >= len(view):
                continue
            n = min(len(view) - inner, len(out) - written)
            out[written : written + n] = view[inner : inner + n]
            written += n
            self._pos += n
        return written


def _s3_client(sess: Any, region: str) -> Any:
    """An S3 client whose presigned URLs name the region's own endpoint: through the
    global one, a bucket made minutes ago answers with a redirect, which a signed URL
    does not survive.  An endpoint configured by the user (``AWS_ENDPOINT_URL_S3``, a
    profile) is kept."""
    from botocore.config import Config

    config = Config(signature_version="s3v4", retries={"mode": "standard"},
                    s3={"addressing_style": "virtual"})
    client = sess.client("s3", region_name=region, config=config)
    default = client.meta.endpoint_url.rstrip("/")
    if default in ("https://s3.amazonaws.com", f"https://s3.{region}.amazonaws.com"):
        client = sess.client("s3", region_name=region, config=config,
                             endpoint_url=f"https://s3.{region}.amazonaws.com")
    return client


def expect_owner(client: Any, account: str) -> None:
    """Make every call of ``client`` name ``account`` as the bucket's owner (and as the
    source's owner on copies), where the operation takes it.  Presigned URLs are left
    alone: the header would be part of their signature, which the machines do not send;
    they are signed only for a bucket already checked to be the account's."""

    def add(params: dict[str, Any], model: Any, context: dict[str, Any], **_: Any) -> None:
        if context.get("is_presign_request") or model.input_shape is None:
            return
        for name in ("ExpectedBucketOwner", "ExpectedSourceBucketOwner"):
            if name in model.input_shape.members:
                params.setdefault(name, account)

    client.meta.events.register("before-parameter-build.s3", add)


def tls_only_policy(name: str) -> str:
    """A bucket policy that denies every request made without TLS."""
    return json.dumps({"Version": "2012-10-17", "Statement": [{
        "Sid": "TLSOnly", "Effect": "Deny", "Principal": "*", "Action": "s3:*",
        "Resource": [f"arn:aws:s3:::{name}", f"arn:aws:s3:::{name}/*"],
        "Condition": {"Bool": {"aws:SecureTransport": "false"}}}]})


class Bucket:
    """The bucket of one region, with the calls joblib-cloud makes on it."""

    def __init__(self, client: Any, name: str, region: str, owner: str | None = None) -> None:
        self.client = client
        self.name = name
        self.region = region
        if owner is not None:
            expect_owner(client, owner)

    @overload
    @classmethod
    def for_region(cls, region: str, *, create: Literal[True] = True) -> Bucket: ...

    @overload
    @classmethod
    def for_region(cls, region: str, *, create: bool) -> Bucket | None: ...

    @classmethod
    def for_region(cls, region: str, *, create: bool = True) -> Bucket | None:
        """This account's bucket in ``region``: made if missing (``create``), else None."""
        with _lock:
            if region in _buckets:
                return _buckets[region]
            sess = ec2api.session(region)
            account = call(sess.client("sts", region_name=region).get_caller_identity,
                           "look up the AWS account")["Account"]
            client = _s3_client(sess, region)
            bucket = cls(client, bucket_name(account, region), region, owner=account)
            if not bucket._there():
                if not create:
                    return None
                bucket._create()
            _buckets[region] = bucket
            return bucket

    def _there(self) -> bool:
        try:
            self.client.head_bucket(Bucket=self.name)
            return True
        except Exception as exc:
            if error_code(exc) in ("404", "NoSuchBucket", "NotFound"):
                return False
            if error_code(exc) in ("403", "AccessDenied"):
                raise AWSError(
                    f"S3 bucket {self.name} exists but does not belong to this AWS account, "
                    "or this account may not list it (s3:ListBucket): joblib-cloud puts "
                    "nothing in a bucket it does not own. If the bucket is this account's, "
                    "allow s3:ListBucket on it; if another account made it, staging goes "
                    "over SSH and jobs' outputs stay on their machines "
                    "(`joblib-cloud pull JOB` while they run).") from exc
            raise

    def _create(self) -> None:
        s3, name = self.client, self.name
        where = ({} if self.region == "us-east-1" else
                 {"CreateBucketConfiguration": {"LocationConstraint": self.region}})
        try:
            call(s3.create_bucket, "create the joblib-cloud S3 bucket", Bucket=name, **where)
        except Exception as exc:
            unless(exc, "BucketAlreadyOwnedByYou")
        call(s3.put_public_access_block, "block public access to the bucket", Bucket=name,
             PublicAccessBlockConfiguration={
                 "BlockPublicAcls": True, "IgnorePublicAcls": True,
                 "BlockPublicPolicy": True, "RestrictPublicBuckets": True})
        call(s3.put_bucket_policy, "allow only TLS requests to the bucket", Bucket=name,
             Policy=tls_only_policy(name))
        call(s3.put_bucket_encryption, "encrypt the bucket", Bucket=name,
             ServerSideEncryptionConfiguration={"Rules": [
                 {"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]})
        call(s3.put_bucket_lifecycle_configuration, "set the bucket's lifecycle", Bucket=name,
             LifecycleConfiguration={"Rules": [
                 {"ID": "staged-objects-expire", "Status": "Enabled",
                  "Filter": {"Prefix": "objects/"}, "Expiration": {"Days": OBJECT_DAYS}},
                 {"ID": "job-outputs-expire", "Status": "Enabled",
                  "Filter": {"Prefix": "jobs/"}, "Expiration": {"Days": JOB_DAYS}},
                 {"ID": "abort-unfinished-uploads", "Status": "Enabled",
                  "Filter": {"Prefix": ""},
                  "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1}}]})
        call(s3.put_bucket_tagging, "tag the bucket", Bucket=name,
             Tagging={"TagSet": [TAG]})

    # -- objects ---------------------------------------------------------------------
    def head(self, key: str) -> dict[str, Any] | None:
        try:
            return self.client.head_object(Bucket=self.name, Key=key)
        except Exception as exc:
            unless(exc, "404", "NoSuchKey", "NotFound")
            return None

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    def renew_if_old(self, key: str, head: dict[str, Any]) -> None:
        """Restart the expiry of an object in use, by copying it onto itself (a managed
        copy: objects over 5 GB are copied in parts).  Failing that, the object is used
        as it is: it may only expire sooner."""
        modified = head.get("LastModified")
        if modified is None or (datetime.datetime.now(datetime.timezone.utc) - modified
                                <= RENEW_AFTER):
            return
        from boto3.s3.transfer import TransferConfig

        try:  # one CopyObject up to its 5 GB limit
            self.client.copy({"Bucket": self.name, "Key": key}, self.name, key,
                             ExtraArgs={"MetadataDirective": "REPLACE"},
                             Config=TransferConfig(multipart_threshold=5 * 2**30))
        except Exception as exc:  # noqa: BLE001 - renewing is a nicety
            log.warning("could not renew s3://%s/%s (%s); it expires %d days after it was "
                        "uploaded", self.name, key, exc, OBJECT_DAYS)

    def upload(self, key: str, segments: list[bytes | memoryview]) -> None:
        """Managed multipart upload (parallel parts) straight from memory."""
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE,
                                max_concurrency=CONCURRENCY)
        self.client.upload_fileobj(SegmentReader(segments), self.name, key, Config=config)

    def upload_file(self, key: str, path: str) -> None:
        self.client.upload_file(path, self.name, key)

    def put_empty(self, key: str) -> None:
        call(self.client.put_object, "write to the bucket", Bucket=self.name, Key=key,
             Body=b"")

    def presign_get(self, key: str, expires: float) -> str:
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.name, "Key": key}, ExpiresIn=int(expires))

    def presign_post(self, key: str, expires: float, max_bytes: int, exact: bool = False
                     ) -> dict[str, Any]:
        """A form upload (``url`` and ``fields``; the host adds ``key`` and ``file``) of at
        most ``max_bytes``, allowed only for ``key`` itself (``exact``) or for keys under
        it (a prefix)."""
        where = {"key": key} if exact else ["starts-with", "$key", key]
        return self.client.generate_presigned_post(
            self.name, key if exact else key + "${filename}",
            Conditions=[where, ["content-length-range", 0, int(max_bytes)]],
            ExpiresIn=int(expires))

    def listing(self, prefix: str) -> Iterator[dict[str, Any]]:
        """Every object under ``prefix``, as ListObjectsV2 describes it (all pages)."""
        for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.name, Prefix=prefix):
            yield from page.get("Contents") or ()

    def keys(self, prefix: str) -> Iterator[str]:
        return (item["Key"] for item in self.listing(prefix))

    def delete_keys(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            chunk = [{"Key": k} for k in keys[start : start + 1000]]
            call(self.client.delete_objects, "delete from the bucket", Bucket=self.name,
                 Delete={"Objects": chunk, "Quiet": True})

    def delete_prefix(self, prefix: str) -> int:
        keys = list(self.keys(prefix))
        self.delete_keys(keys)
        return len(keys)

    def delete_bucket(self) -> None:
        self.delete_prefix("")
        call(self.client.delete_bucket, "delete the bucket", Bucket=self.name)
        with _lock:
            _buckets.pop(self.region, None)


def forget_buckets() -> None:
    """Forget the buckets found so far (tests: a fresh moto account)."""
    with _lock:
        _buckets.clear()
