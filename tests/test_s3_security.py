"""Nothing of the user's for others to take from joblib-cloud's S3 bucket, and nothing
planted there reaches this computer's disk: the bucket's owner named on every call, its
TLS-only policy, the machines' upload policies (one key or one prefix, a size cap), keys
that would lead outside a directory, ``pull``'s cap, and ``down`` keeping what another
cluster uses.  moto's S3 behind the loopback double (``s3double``), which enforces the
owner, POST policies and the bucket policy as S3 does; machines are loopback sshd hosts."""

from __future__ import annotations

import base64
import datetime
import getpass
import gzip
import io
import json
import sys
import tarfile
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import boto3
import pytest
from awsmock import (  # noqa: F401  (fixtures)
    CIDR,
    REGION,
    aws_fixture,
    loopback_ec2_fixture,
)
from s3double import s3_fixture  # noqa: F401
from stagedruns import expected_row_sums, run_row_sums, staged_settings

from joblib_cloud import cli
from joblib_cloud.client import registry
from joblib_cloud.host import jobstore
from joblib_cloud.providers.aws import bucket as aws_bucket
from joblib_cloud.providers.aws.bucket import Bucket, bucket_name
from joblib_cloud.providers.aws.ec2api import AWSError
from joblib_cloud.providers.aws.staging import S3Objects

ACCOUNT = "123456789012"  # moto's, and the STS answer
NAME = bucket_name(ACCOUNT, REGION)


def _raw_s3():
    """A plain client (no owner named): the test's own view of the double."""
    return boto3.client("s3", region_name=REGION)


def _raw_keys(prefix: str = "") -> list[str]:
    return [o["Key"] for o in _raw_s3().list_objects_v2(Bucket=NAME, Prefix=prefix)
            .get("Contents", [])]


def _cli_settings(monkeypatch, root: Path) -> Path:
    """The CLI's settings in the environment, and a project directory to run from."""
    root.mkdir()
    monkeypatch.chdir(root)
    for name, value in {"REGION": REGION, "INGRESS_CIDR": CIDR, "USER": getpass.getuser(),
                        "PYTHON": sys.executable, "WORKERS_PER_HOST": "1",
                        "PROVIDER": "aws", "INSTANCE": "C2", "CLUSTER": "s3c"}.items():
        monkeypatch.setenv(f"JOBLIB_CLOUD_{name}", value)
    return root


@pytest.fixture
def aws_env(monkeypatch, tmp_path):
    yield _cli_settings(monkeypatch, tmp_path / "project")
    registry.close_all()


def test_a_bucket_another_account_made_under_our_name_is_refused(s3, loopback_ec2, X):
    _raw_s3().create_bucket(Bucket=NAME)
    s3.owners[NAME] = "999900001111"  # someone else took the predictable name first
    with pytest.raises(AWSError, match="does not belong to this AWS account"):
        Bucket.for_region(REGION)
    aws_bucket.forget_buckets()
    settings = staged_settings(n=2)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert run_row_sums(settings, X) == expected_row_sums(X)  # sent over SSH instead
    finally:
        registry.close_all()
    assert any("does not belong to this AWS account" in str(w.message) for w in caught)
    assert _raw_keys() == []  # nothing of the user's went into it


def test_every_call_to_the_bucket_names_its_owner(s3, loopback_ec2, X, tmp_path,
                                                  monkeypatch):
    settings = staged_settings(n=2)
    try:
        run_row_sums(settings, X)
        registry.close_all()
        monkeypatch.setattr(aws_bucket, "RENEW_AFTER", datetime.timedelta(seconds=-1))
        assert run_row_sums(settings, X) == expected_row_sums(X)  # renewed: a copy onto itself
    finally:
        registry.close_all()
    _cli_settings(monkeypatch, tmp_path / "project")
    data = tmp_path / "data.csv"
    data.write_text("a,b\n")
    assert cli.main(["shared", "put", str(data)]) == 0
    assert cli.main(["shared", "get", "data.csv", str(tmp_path / "got")]) == 0
    assert cli.main(["shared", "rm", "data.csv"]) == 0
    assert cli.main(["down", "--cluster", "stage", "--yes"]) == 0

    # Every API call (presigned URLs and the machines' form uploads aside: signed for a
    # bucket already checked) names the owner.
    api = [r for r in s3.requests
           if r.signature is None and not (r.method == "POST" and not r.query)]
    creates = [r for r in api if r.method == "PUT" and r.key == NAME and not r.query]
    assert len(creates) == 1  # CreateBucket names no owner: S3 has none to check yet
    assert len(api) > 20 and [r for r in api if r not in creates and r.owner != ACCOUNT] == []
    copies = [r for r in s3.requests if r.source]
    assert copies and all(r.source_owner == ACCOUNT for r in copies)


def test_the_bucket_refuses_requests_without_tls(s3, aws):
    bucket = Bucket.for_region(REGION)
    bucket.put_empty("objects/x")
    url = bucket.presign_get("objects/x", 60)
    with urllib.request.urlopen(url) as answer:
        assert answer.status == 200
    s3.tls = False  # the same request over plain http
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url)
    assert refused.value.code == 403


def test_shared_get_refuses_keys_that_lead_outside_the_directory(s3, aws, aws_env,
                                                                 tmp_path, capfd):
    Bucket.for_region(REGION)
    raw = _raw_s3()
    raw.put_object(Bucket=NAME, Key="shared/s3c/c/ok.txt", Body=b"fine")
    raw.put_object(Bucket=NAME, Key="shared/s3c/c/../../.bashrc", Body=b"planted")
    assert "shared/s3c/c/../../.bashrc" in _raw_keys("shared/")  # S3 keys are literal
    into = tmp_path / "got"
    assert cli.main(["shared", "get", "c", str(into)]) == 1
    _, err = capfd.readouterr()
    assert "refusing 'c/../../.bashrc'" in err and "joblib-cloud shared rm" in err
    assert not (tmp_path / ".bashrc").exists() and not (into / ".bashrc").exists()
    assert not into.exists() or list(into.rglob("*")) == []  # nothing written at all

    raw.delete_object(Bucket=NAME, Key="shared/s3c/c/../../.bashrc")
    raw.put_object(Bucket=NAME, Key="shared/s3c/c//tmp/abs", Body=b"planted")
    assert cli.main(["shared", "get", "c", str(into)]) == 1
    assert "refusing 'c//tmp/abs'" in capfd.readouterr()[1]


JOB = """
import os
os.makedirs("results", exist_ok=True)
open("results/model.txt", "w").write("weights")
open(os.path.join(os.environ["JOBLIB_CLOUD_SHARED"], "big.bin"), "wb").write(b"x" * 4096)
open(os.path.join(os.environ["JOBLIB_CLOUD_SHARED"], "small.txt"), "w").write("ok")
"""


def _post(post: dict, key: str, path: Path) -> int:
    try:
        jobstore.post_file(post, key, str(path))
        return 204
    except urllib.error.HTTPError as exc:
        return exc.code


def test_a_job_uploads_only_its_own_keys_under_the_cap_and_pull_holds_its_cap(
        s3, loopback_ec2, aws_env, tmp_path, capfd):
    (aws_env / "job.py").write_text(JOB)
    assert cli.main(["run", "--max-output", "2K", "--", "python", "job.py"]) == 0
    _, err = capfd.readouterr()
    assert "not saved: big.bin (4096 bytes)" in err  # said, and the rest saved
    shared = set(_raw_keys("shared/"))
    assert "shared/s3c/small.txt" in shared and "shared/s3c/big.bin" not in shared
    (job,) = [p.stem for p in (tmp_path / "home" / "job-records").iterdir()]
    assert _raw_keys(f"jobs/{job}/") == [f"jobs/{job}/outputs.tar.gz"]

    # What the machine holds cannot write elsewhere, nor more than the cap.
    (host,) = loopback_ec2.values()
    spec = json.loads((host.home / "jobs" / job / "command.json").read_text())
    small, big = tmp_path / "small", tmp_path / "big"
    small.write_bytes(b"s")
    big.write_bytes(b"b" * 4096)
    outputs, shared_post = spec["s3"]["outputs"]["post"], spec["s3"]["shared"]["post"]
    assert _post(outputs, f"jobs/{job}/other.tar.gz", small) == 403
    assert _post(outputs, f"jobs/{job}/outputs.tar.gz", big) == 400
    assert _post(shared_post, "shared/s3c/huge.bin", big) == 400
    assert _post(shared_post, "shared/other/x", small) == 403
    assert _post(shared_post, "shared/s3c/fine.txt", small) == 204
    policy = json.loads(base64.b64decode(outputs["fields"]["policy"]))
    assert ["content-length-range", 0, 2048] in policy["conditions"]

    # A small archive that unpacks to far more than the cap: pull unpacks nothing.
    host.kill()
    registry.close_all()
    bomb = io.BytesIO()
    with tarfile.open(fileobj=bomb, mode="w:gz") as tar:
        info = tarfile.TarInfo("results/zeros.bin")
        info.size = 8 * 2**20
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    assert len(bomb.getvalue()) < 2**20
    _raw_s3().put_object(Bucket=NAME, Key=f"jobs/{job}/outputs.tar.gz", Body=bomb.getvalue())
    assert cli.main(["pull", job, "--max-output", "1M"]) == 1
    _, err = capfd.readouterr()
    assert "unpack to more than" in err and "--max-output" in err
    assert not (aws_env / "joblib-cloud-runs" / job / "results" / "zeros.bin").exists()
    assert gzip.decompress(bomb.getvalue())  # (the archive itself is well formed)


def test_down_keeps_objects_another_cluster_uses_and_shared_files_unless_asked(
        s3, aws, aws_env, tmp_path):
    both, only = b"used by both clusters", b"used by one"
    S3Objects(REGION, "keep").ensure("d1", [both], len(both))
    gone = S3Objects(REGION, "gone")
    gone.ensure("d1", [both], len(both))
    gone.ensure("d2", [only], len(only))
    _raw_s3().put_object(Bucket=NAME, Key="shared/gone/notes.txt", Body=b"kept")

    assert cli.main(["down", "--cluster", "gone", "--yes"]) == 0
    assert _raw_keys("objects/") == ["objects/d1"]  # "keep" still uses it
    assert _raw_keys("clusters/") == ["clusters/keep/objects/d1"]
    assert _raw_keys("shared/") == ["shared/gone/notes.txt"]  # not asked
    assert cli.main(["down", "--cluster", "gone", "--shared", "--yes"]) == 0
    assert _raw_keys("shared/") == []
