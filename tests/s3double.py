"""S3 as the hosts see it: moto's S3 behind a real HTTP server on loopback.

The server shares moto's in-process state, so what the client stages through boto3 is what
the hosts download with their presigned URLs.  Around moto, a WSGI layer makes it answer
as S3 does where staging depends on it, and lets a test make the store misbehave as a
real one can:

- presigned URLs expire (moto serves them forever): 403 ``Request has expired``;
- ``corrupt``: keys whose next response from byte 0 is damaged in transit;
- ``delay``: seconds each GET of an object waits before answering (a slow store), and
  ``put_delay`` each upload (a slow link to it);
- every request is recorded (method, key, range, signature, status).
"""

from __future__ import annotations

import dataclasses
import datetime
import threading
import time
import urllib.parse
from typing import Any

import pytest
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server

from joblib_cloud.providers.aws import bucket as aws_bucket

EXPIRED = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
           b"<Message>Request has expired</Message></Error>")


@dataclasses.dataclass
class Request:
    method: str
    key: str
    range: str | None
    signature: str | None
    status: int = 0


class S3Double:
    def __init__(self) -> None:
        self.app = DomainDispatcherApplication(create_backend_app)
        self.requests: list[Request] = []
        self.corrupt: set[str] = set()
        self.delay = 0.0
        self.put_delay = 0.0
        self._lock = threading.Lock()

    def gets(self, key_suffix: str) -> list[Request]:
        return [r for r in self.requests if r.method == "GET" and r.key.endswith(key_suffix)]

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
        path = urllib.parse.unquote(environ.get("PATH_INFO", ""))
        request = Request(environ["REQUEST_METHOD"], path.split("/", 2)[-1],
                          environ.get("HTTP_RANGE"), (query.get("X-Amz-Signature") or [None])[0])
        with self._lock:
            self.requests.append(request)
        if "X-Amz-Expires" in query:
            signed = datetime.datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ")
            ends = signed.replace(tzinfo=datetime.timezone.utc) + datetime.timedelta(
                seconds=int(query["X-Amz-Expires"][0]))
            if datetime.datetime.now(datetime.timezone.utc) > ends:
                request.status = 403
                start_response("403 Forbidden", [("Content-Type", "application/xml"),
                                                 ("Content-Length", str(len(EXPIRED)))])
                return [EXPIRED]
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
