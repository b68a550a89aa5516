"""Large arguments staged once in S3 for every host (aws), fetched by the hosts with
presigned URLs: moto's S3 behind a loopback HTTP server (``s3double``), the machines
loopback sshd hosts (``loopback_ec2``)."""

from __future__ import annotations

import datetime
import threading
import warnings

import numpy as np
import pytest
from awsmock import (  # noqa: F401  (fixtures)
    CIDR,
    REGION,
    api_calls_fixture,
    aws_fixture,
    loopback_ec2_fixture,
    sshd_per_instance,
)
from joblib import Parallel, delayed, parallel_backend
from s3double import s3_fixture  # noqa: F401
from sshfleet import SSHHost, _free_port
from stagedruns import cluster_of, expected_row_sums, row_sums, run_row_sums, staged_settings

from joblib_cloud import cli, provisioner
from joblib_cloud.client import registry, staging
from joblib_cloud.providers.aws.bucket import Bucket, bucket_name
from joblib_cloud.wire.serialization import StoredObject


def _uploads_of(api_calls, digest):
    return [c for c in api_calls.of("PutObject") + api_calls.of("CreateMultipartUpload")
            if c.params["Key"] == f"objects/{digest}"]


def _keys(prefix=""):
    bucket = Bucket.for_region(REGION, create=False)
    return [] if bucket is None else list(bucket.keys(prefix))


def test_one_object_for_three_hosts_leaves_the_client_once(s3, api_calls, loopback_ec2, X):
    settings = staged_settings()
    digest = StoredObject(X).digest
    try:
        assert run_row_sums(settings, X) == expected_row_sums(X)
        cluster = cluster_of(settings)
        assert len(cluster.hosts) == 3
        assert len(_uploads_of(api_calls, digest)) == 1
        size = StoredObject(X).nbytes
        for host in cluster.hosts:  # every host has it, none got it over SSH
            assert host.uploads.bytes_sent == 0 and host.uploads.bytes_fetched == size
        assert len({r.signature for r in s3.gets(digest)}) == 1  # one URL for all
        bucket = Bucket.for_region(REGION, create=False)
        assert bucket.name == bucket_name("123456789012", REGION)
        assert f"clusters/stage/objects/{digest}" in _keys("clusters/")

        # Another process (a fresh client) using the same X uploads nothing.
        registry.close_all()
        before = len(api_calls.calls)
        assert run_row_sums(settings, X) == expected_row_sums(X)
        later = api_calls.calls[before:]
        assert [c for c in later if c.operation in ("PutObject", "CreateMultipartUpload",
                                                    "UploadPart")
                and c.params["Key"].startswith("objects/")] == []
        assert all(h.uploads.bytes_sent == 0 for h in cluster_of(settings).hosts)
    finally:
        registry.close_all()


def test_an_object_staged_long_ago_is_renewed_when_used_again(s3, api_calls, loopback_ec2,
                                                              X, monkeypatch):
    from joblib_cloud.providers.aws import bucket as aws_bucket

    settings = staged_settings(n=2)
    digest = StoredObject(X).digest
    try:
        run_row_sums(settings, X)
        registry.close_all()  # a later program
        monkeypatch.setattr(aws_bucket, "RENEW_AFTER", datetime.timedelta(seconds=-1))
        assert run_row_sums(settings, X) == expected_row_sums(X)
    finally:
        registry.close_all()
    copies = [c for c in api_calls.of("CopyObject") if c.params["Key"] == f"objects/{digest}"]
    assert len(copies) == 1 and len(_uploads_of(api_calls, digest)) == 1


def test_the_bucket_is_private_encrypted_and_expires_staged_objects(s3, loopback_ec2, X):
    settings = staged_settings()
    try:
        run_row_sums(settings, X)
    finally:
        registry.close_all()
    s3api = Bucket.for_region(REGION).client
    name = bucket_name("123456789012", REGION)
    block = s3api.get_public_access_block(Bucket=name)["PublicAccessBlockConfiguration"]
    assert all(block.values())
    rule = s3api.get_bucket_encryption(Bucket=name)["ServerSideEncryptionConfiguration"]
    assert rule["Rules"][0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    rules = s3api.get_bucket_lifecycle_configuration(Bucket=name)["Rules"]
    expiring = [r for r in rules if "Expiration" in r]
    assert [r["Filter"]["Prefix"] for r in expiring] == ["objects/", "jobs/"]
    assert s3api.get_bucket_tagging(Bucket=name)["TagSet"]


def test_a_download_that_fails_its_digest_is_fetched_again(s3, loopback_ec2, X):
    settings = staged_settings(n=1)
    digest = StoredObject(X).digest
    s3.corrupt.add(f"objects/{digest}")
    try:
        assert run_row_sums(settings, X) == expected_row_sums(X)
        assert "objects/" + digest not in s3.corrupt  # it was damaged once...
        firsts = [r for r in s3.gets(digest) if (r.range or "").startswith("bytes=0-")]
        assert len(firsts) == 2  # ...and the host fetched it again
        (host,) = cluster_of(settings).hosts
        assert host.uploads.bytes_sent == 0
    finally:
        registry.close_all()


def test_an_url_that_expires_during_the_download_is_renewed(s3, loopback_ec2, X,
                                                            monkeypatch):
    monkeypatch.setattr(staging, "URL_TTL", 2.0)
    monkeypatch.setattr(staging, "URL_MARGIN", 0.0)
    monkeypatch.setattr(staging.Staging, "part_size", 2**20)
    monkeypatch.setattr(staging.Staging, "streams", 1)
    s3.delay = 0.5  # 11 parts at 0.5 s each: the 2 s URL expires on the way
    settings = staged_settings(n=1)
    digest = StoredObject(X).digest
    try:
        assert run_row_sums(settings, X) == expected_row_sums(X)
        gets = s3.gets(digest)
        assert any(r.status == 403 for r in gets)
        assert len({r.signature for r in gets if r.status == 206}) >= 2
        (host,) = cluster_of(settings).hosts
        assert host.uploads.bytes_sent == 0  # renewed, not sent over SSH
        parts = [r.range for r in gets if r.status == 206]
        assert len(parts) == len(set(parts))  # what was on disk was not fetched again
    finally:
        registry.close_all()


def test_hosts_hear_from_the_client_while_it_uploads_to_the_store(s3, loopback_ec2, X):
    """An upload over twice as long as heartbeat_timeout: the waiting agents are pinged
    meanwhile, so none of them takes the client for gone.  (A timeout of 3 s, not less:
    this client shares 2 cores with 3 agents and the store, and a pause of its own as long
    as the timeout is, to an agent, a client gone.)"""
    s3.put_delay = 8.0
    settings = staged_settings(heartbeat_timeout=3.0)
    try:
        assert run_row_sums(settings, X) == expected_row_sums(X)
        cluster = cluster_of(settings)
        assert len(cluster.alive_hosts) == 3 and not cluster.failures
        assert all(h.uploads.bytes_fetched and not h.uploads.bytes_sent
                   for h in cluster.hosts)
    finally:
        registry.close_all()


def test_s3_refused_sends_directly_with_one_warning(s3, api_calls, loopback_ec2, X):
    from awsmock import client_error

    api_calls.inject = lambda op, params, n: (client_error("AccessDenied", op)
                                              if op == "PutObject" else None)
    settings = staged_settings()
    Y = X + 1
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert run_row_sums(settings, X) == expected_row_sums(X)
            assert run_row_sums(settings, Y) == expected_row_sums(Y)
        said = [w for w in caught if "staging large arguments" in str(w.message)]
        assert len(said) == 1 and "AccessDenied" in str(said[0].message)
        size = StoredObject(X).nbytes
        assert sorted(h.uploads.bytes_sent for h in cluster_of(settings).hosts) == [2 * size] * 3
    finally:
        registry.close_all()


def test_down_removes_the_clusters_objects_and_no_others(s3, loopback_ec2, X):
    keep, gone = staged_settings("keep", n=2), staged_settings("gone", n=2)
    Y = X * 2
    try:
        run_row_sums(keep, X)
        run_row_sums(gone, Y)
    finally:
        registry.close_all()
    x, y = StoredObject(X).digest, StoredObject(Y).digest
    assert {f"objects/{x}", f"objects/{y}"} <= set(_keys("objects/"))
    assert cli.main(["down", "--cluster", "gone", "--region", REGION, "--yes"]) == 0
    assert _keys("objects/") == [f"objects/{x}"]
    assert _keys("clusters/gone/") == []
    assert cli.main(["down", "--all", "--region", REGION, "--yes"]) == 0
    assert Bucket.for_region(REGION, create=False) is None


class _Store:
    where = "a store"


def _choice(size: int, hosts: int, link: float, store: float | None = None,
            joining: int = 0) -> bool:
    """Whether ``auto`` stages an object of ``size`` bytes for ``hosts`` hosts, the
    kernel's reading of each connected one ``link``, ``joining`` of them not connected."""
    choice = staging.Staging(_Store())
    for _ in range(hosts - joining):
        choice.link.estimated(link)
    if store is not None:
        choice.link.stored(100 * 2**20, 100 * 2**20 / store)
    return choice.worth_it(StoredObject(np.zeros(size // 8)), hosts)


def test_auto_stages_what_saves_link_time_and_sends_the_rest_directly():
    laptop, datacentre = 12.5e6, 1.25e9
    assert _choice(100 * 2**20, 3, laptop)  # the case it is for
    assert _choice(2**20, 3, laptop)
    assert not _choice(2**16, 3, laptop)  # a round trip costs more than it saves
    assert not _choice(100 * 2**20, 1, laptop)  # one host: sent once either way
    assert not _choice(100 * 2**20, 2, datacentre)  # a fast link
    assert _choice(100 * 2**20, 16, datacentre)  # ...but not fast enough for 16 hosts
    assert not _choice(100 * 2**20, 3, laptop, store=laptop / 10)  # a slow store


def test_one_hosts_reading_is_not_enough_to_send_directly_to_hosts_still_joining():
    """The first host of three is connected, and its connection read fast: a burst can
    read so, and sending directly on it would cost a crossing per host still to come."""
    fast = 1.25e9
    assert _choice(100 * 2**20, 3, fast, joining=2)
    assert _choice(100 * 2**20, 2, fast, joining=1)
    assert not _choice(100 * 2**20, 3, fast, joining=1)  # most of the fleet says fast
    choice = staging.Staging(_Store())
    choice.link.estimated(fast)
    choice.link.sent(2**30, 2**30 / fast)  # ...or a transfer measured it
    assert not choice.worth_it(StoredObject(np.zeros(100 * 2**20 // 8)), 3)


def test_on_loopback_auto_sends_directly(s3, api_calls, loopback_ec2, X):
    try:
        settings = staged_settings(n=2, staging="auto")
        assert run_row_sums(settings, X) == expected_row_sums(X)
        assert all(h.uploads.bytes_sent for h in cluster_of(settings).hosts)
        assert api_calls.of("PutObject") == [] and _keys() == []
    finally:
        registry.close_all()


def test_presigned_urls_name_the_regions_own_endpoint(monkeypatch):
    """Through the global endpoint a new bucket redirects, which a signed URL does not
    survive.  (No request is made: signing is local.)"""
    import boto3

    from joblib_cloud.providers.aws.bucket import _s3_client

    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    for region in ("eu-west-1", "us-east-1"):
        client = _s3_client(boto3.session.Session(region_name=region), region)
        bucket = Bucket(client, bucket_name("123456789012", region), region)
        url = bucket.presign_get("objects/ab", 60)
        assert url.startswith(f"https://{bucket.name}.s3.{region}.amazonaws.com/objects/ab?")


# -- hosts that join at different moments ----------------------------------------------

#: The kernel's reading of a laptop's uplink (100 Mbit/s), where loopback reads GB/s.
LAPTOP = 12.5e6


class _BootingHost(SSHHost):
    """A loopback host whose sshd starts once ``booted`` is set: until then it refuses
    connections, as a machine still booting does, and the client keeps trying."""

    booted: threading.Event | None = None

    def start(self, port=None, wait=True):
        if self.booted is None:
            return super().start(port, wait)
        self.port = _free_port(self.address)

        def boot():
            self.booted.wait()
            if not self.stopped:
                SSHHost.start(self, self.port, wait=False)

        threading.Thread(target=boot, daemon=True).start()

    stopped = False

    def kill(self):
        self.stopped = True
        if self.booted is not None:
            self.booted.set()
        super().kill()


@pytest.fixture
def late_ec2(aws, tmp_path, monkeypatch):
    """Machines that come up apart: the first launched answers at once, the others once
    the test sets the event this yields.  The client's link reads as a laptop's."""
    booted = threading.Event()

    def make(index, *args, **kw):
        host = _BootingHost(tmp_path, 40 + index, *args, **kw)
        host.booted = booted if index else None
        return host

    hook = sshd_per_instance(aws, make)
    provisioner.set_address_hook(hook)
    monkeypatch.setattr(registry, "delivery_rate", lambda sock: LAPTOP)
    yield booted
    registry.close_all()
    for host in hook.hosts.values():
        host.kill()


def test_hosts_that_join_later_fetch_what_the_first_one_staged(s3, api_calls, late_ec2, X):
    """The first host is alone for a whole call while two more are still booting: the
    object goes to the store for all three (not over SSH to the first), and the late ones
    fetch it there; it leaves the client once."""
    settings = staged_settings(staging="auto")
    digest, size = StoredObject(X).digest, StoredObject(X).nbytes
    cluster = cluster_of(settings)
    assert len(cluster.alive_hosts) == 1 and cluster.joining == 2
    with parallel_backend("cloud", **settings):
        assert Parallel(n_jobs=3)(delayed(row_sums)(X, slice(i, i + 5))
                                  for i in range(6)) == expected_row_sums(X)
    (first,) = cluster.hosts
    assert first.uploads.bytes_sent == 0 and first.uploads.bytes_fetched == size
    late_ec2.set()  # the other two finish booting
    assert cluster.wait_until_settled(60) and len(cluster.alive_hosts) == 3
    assert run_row_sums(settings, X) == expected_row_sums(X)
    assert len(_uploads_of(api_calls, digest)) == 1
    for host in cluster.hosts:
        assert host.uploads.bytes_sent == 0 and host.uploads.bytes_fetched == size
    assert all(h.joined_at > first.joined_at for h in cluster.hosts[1:])


def test_a_first_host_that_reads_fast_does_not_get_what_the_late_ones_need_over_ssh(
        s3, api_calls, late_ec2, X, monkeypatch):
    """As above, but the first host's connection read as a data centre's link (a short
    burst can): the object is still staged for the fleet, not sent to the first host and
    then staged for the others (twice over the link) or sent to each (three times)."""
    readings = iter([1.25e9])
    monkeypatch.setattr(registry, "delivery_rate", lambda sock: next(readings, LAPTOP))
    settings = staged_settings(staging="auto")
    digest, size = StoredObject(X).digest, StoredObject(X).nbytes
    cluster = cluster_of(settings)
    with parallel_backend("cloud", **settings):
        assert Parallel(n_jobs=3)(delayed(row_sums)(X, slice(i, i + 5))
                                  for i in range(6)) == expected_row_sums(X)
    late_ec2.set()
    assert cluster.wait_until_settled(60) and len(cluster.alive_hosts) == 3
    assert run_row_sums(settings, X) == expected_row_sums(X)
    assert cluster.staging.link.readings[0] == 1.25e9
    assert len(_uploads_of(api_calls, digest)) == 1
    assert [(h.uploads.bytes_sent, h.uploads.bytes_fetched) for h in cluster.hosts] == \
        [(0, size)] * 3


def test_a_fleet_of_one_host_gets_its_arguments_directly(s3, api_calls, late_ec2, X):
    settings = staged_settings(n=1, staging="auto")
    assert run_row_sums(settings, X) == expected_row_sums(X)
    (host,) = cluster_of(settings).hosts
    assert host.uploads.bytes_sent == StoredObject(X).nbytes and not host.uploads.bytes_fetched
    assert _uploads_of(api_calls, StoredObject(X).digest) == [] and _keys("objects/") == []
