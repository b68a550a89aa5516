"""S3 as the hosts see it: moto's S3 behind a real HTTP server on loopback.

The server shares moto's in-process state, so what the client stages through boto3 is what
the hosts download with their presigned URLs.  Around moto, a WSGI layer makes it answer
as S3 does where staging depends on it, and lets a test make the store misbehave as a
real one can:

- presigned URLs expire (moto serves them forever): 403 ``Request has expired``;
- ``corrupt``: keys whose next response from byte 0 is damaged in transit;
- ``delay``: seconds each GET of an object waits before answering (a slow store), and
  ``put_delay`` each upload (a slow link to it);
- ``ExpectedBucketOwner`` is enforced as S3 does (moto ignores it): a request naming an
  owner (``x-amz-expected-bucket-owner``, or ``x-amz-source-expected-bucket-owner`` for a
  copy's source) other than the bucket's gets 403 AccessDenied; ``owners`` says who owns
  a bucket (moto's account by default), so a test can plant one made by someone else;
- a browser-form upload (presigned POST) is held to its policy's ``key`` and
  ``content-length-range`` conditions (moto checks neither): 403 AccessDenied, 400
  EntityTooLarge;
- bucket policies are kept here, not in moto (whose evaluation ignores conditions, so
  a TLS-only policy would deny everything): the one condition the product uses,
  ``aws:SecureTransport``, is evaluated with ``tls`` (True: the loopback endpoint stands
  for S3's https one; a test sets it False for a plain-http client);
- every request is recorded (method, key, range, signature, status, owner named).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import io
import json
import threading
import time
import urllib.parse
from typing import Any

import pytest
from moto.core import DEFAULT_ACCOUNT_ID
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server

from joblib_cloud.providers.aws import bucket as aws_bucket

EXPIRED = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
           b"<Message>Request has expired</Message></Error>")
TOO_LARGE = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>EntityTooLarge</Code>'
             b"<Message>Your proposed upload exceeds the maximum allowed size</Message>"
             b"</Error>")
DENIED = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
          b"<Message>Access Denied</Message></Error>")


@dataclasses.dataclass
class Request:
    method: str
    key: str
    range: str | None
    signature: str | None
    status: int = 0
    bucket: str = ""
    #: The owner the request named (``ExpectedBucketOwner``), if any.
    owner: str | None = None
    query: str = ""
    #: A copy's source bucket and the owner named for it.
    source: str = ""
    source_owner: str | None = None


class S3Double:
    def __init__(self) -> None:
        self.app = DomainDispatcherApplication(create_backend_app)
        self.requests: list[Request] = []
        self.corrupt: set[str] = set()
        self.delay = 0.0
        self.put_delay = 0.0
        #: bucket name -> the account that owns it (default: moto's account).
        self.owners: dict[str, str] = {}
        self.policies: dict[str, bytes] = {}
        self.tls = True
        self._lock = threading.Lock()

    def gets(self, key_suffix: str) -> list[Request]:
        return [r for r in self.requests if r.method == "GET" and r.key.endswith(key_suffix)]

    @staticmethod
    def _answer(request: Request, start_response: Any, status: str, body: bytes) -> Any:
        request.status = int(status.split()[0])
        start_response(status, [("Content-Type", "application/xml"),
                                ("Content-Length", str(len(body)))])
        return [body]

    def _policy(self, environ: dict[str, Any], request: Request, start_response: Any) -> Any:
        if request.method == "PUT":
            length = int(environ.get("CONTENT_LENGTH") or 0)
            self.policies[request.bucket] = environ["wsgi.input"].read(length)
            return self._answer(request, start_response, "204 No Content", b"")
        if request.method == "DELETE":
            self.policies.pop(request.bucket, None)
            return self._answer(request, start_response, "204 No Content", b"")
        if request.bucket not in self.policies:
            return self._answer(request, start_response, "404 Not Found", (
                b"<Error><Code>NoSuchBucketPolicy</Code></Error>"))
        return self._answer(request, start_response, "200 OK", self.policies[request.bucket])

    def _denies_plain_http(self, bucket: str) -> bool:
        policy = json.loads(self.policies.get(bucket) or b"{}")
        return any(st.get("Effect") == "Deny" and st.get("Condition", {}).get("Bool", {}).get(
            "aws:SecureTransport") == "false" for st in policy.get("Statement", []))

    @staticmethod
    def _post_policy(environ: dict[str, Any]) -> tuple[str, bytes] | None:
        """Check a form upload against its policy; the body is put back for moto."""
        from werkzeug.formparser import parse_form_data

        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        environ["wsgi.input"] = io.BytesIO(body)
        _, form, files = parse_form_data({**environ, "wsgi.input": io.BytesIO(body)})
        if "policy" not in form:
            return None
        size = len(files["file"].read()) if "file" in files else 0
        key = form.get("key", "")
        for condition in json.loads(base64.b64decode(form["policy"]))["conditions"]:
            if isinstance(condition, dict) and "key" in condition:
                ok = key == condition["key"]
            elif isinstance(condition, list) and condition[0] == "starts-with" and \
                    condition[1] == "$key":
                ok = key.startswith(condition[2])
            elif isinstance(condition, list) and condition[0] == "content-length-range":
                if size > int(condition[2]):
                    return "400 Bad Request", TOO_LARGE
                ok = size >= int(condition[1])
            else:
                continue
            if not ok:
                return "403 Forbidden", DENIED
        return None

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
        path = urllib.parse.unquote(environ.get("PATH_INFO", ""))
        request = Request(environ["REQUEST_METHOD"], path.split("/", 2)[-1],
                          environ.get("HTTP_RANGE"), (query.get("X-Amz-Signature") or [None])[0],
                          bucket=path.lstrip("/").split("/", 1)[0],
                          owner=environ.get("HTTP_X_AMZ_EXPECTED_BUCKET_OWNER"),
                          query=environ.get("QUERY_STRING", ""),
                          source=urllib.parse.unquote(environ.get("HTTP_X_AMZ_COPY_SOURCE", "")
                                                      ).lstrip("/").split("/", 1)[0],
                          source_owner=environ.get("HTTP_X_AMZ_SOURCE_EXPECTED_BUCKET_OWNER"))
        with self._lock:
            self.requests.append(request)
        for bucket, named in ((request.bucket, request.owner),
                              (request.source, request.source_owner)):
            if named is not None and named != self.owners.get(bucket, DEFAULT_ACCOUNT_ID):
                request.status = 403
                start_response("403 Forbidden", [("Content-Type", "application/xml"),
                                                 ("Content-Length", str(len(DENIED)))])
                return [DENIED]
        if "X-Amz-Expires" in query:
            signed = datetime.datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ")
            ends = signed.replace(tzinfo=datetime.timezone.utc) + datetime.timedelta(
                seconds=int(query["X-Amz-Expires"][0]))
            if datetime.datetime.now(datetime.timezone.utc) > ends:
                request.status = 403
                start_response("403 Forbidden", [("Content-Type", "application/xml"),
                                                 ("Content-Length", str(len(EXPIRED)))])
                return [EXPIRED]
        if "policy" in query or environ.get("QUERY_STRING") == "policy":
            return self._policy(environ, request, start_response)
        if not self.tls and self._denies_plain_http(request.bucket):
            return self._answer(request, start_response, "403 Forbidden", DENIED)
        if request.method == "POST" and environ.get("CONTENT_TYPE", "").startswith(
                "multipart/form-data"):
            refused = self._post_policy(environ)
            if refused is not None:
                request.status = int(refused[0].split()[0])
                start_response(refused[0], [("Content-Type", "application/xml"),
                                            ("Content-Length", str(len(refused[1])))])
                return [refused[1]]
        if request.method == "GET" and "X-Amz-Signature" in query and self.delay:
            time.sleep(self.delay)
        if request.method == "PUT" and request.key.startswith("objects/") and self.put_delay:
            time.sleep(self.put_delay)

        def recording_start(status: str, headers: Any, *args: Any) -> Any:
            request.status = int(status.split()[0])
            return start_response(status, headers, *args)

        body = self.app(environ, recording_start)
        damage = (request.method == "GET" and request.key in self.corrupt
                  and (request.range or "bytes=0-").startswith("bytes=0-"))
        if damage:
            self.corrupt.discard(request.key)
            data = bytearray(b"".join(body))
            data[-1] ^= 0xFF
            return [bytes(data)]
        return body


@pytest.fixture(name="s3")
def s3_fixture(aws, monkeypatch):
    """The S3 double on a loopback port; boto3's S3 clients are pointed at it."""
    double = S3Double()
    server = make_server("127.0.0.1", 0, double, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{server.server_port}")
    aws_bucket.forget_buckets()
    yield double
    server.shutdown()
    aws_bucket.forget_buckets()
