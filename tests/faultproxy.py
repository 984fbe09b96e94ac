"""A fault-injecting HTTP proxy for S3 tests: 127.0.0.1 in front of the moto server.

    with FaultProxy("http://127.0.0.1:5000", rate=0.2, seed=1) as proxy:
        env = {"AWS_ENDPOINT_URL": proxy.url}   # every S3 client of the job talks to the proxy

Each request is forwarded to the upstream server unchanged, except that a seeded share
``rate`` of them meets one of the ``faults`` (chosen by the same seeded generator):

- ``slowdown``: answered ``503 SlowDown`` with S3's XML error body, never forwarded
  (what S3 answers when a prefix is throttled);
- ``drop``: the connection is closed without an answer, never forwarded (a reset
  before the request reached the store);
- ``drop_after``: forwarded, then the connection is closed without passing the answer on
  (the store acted, the client never heard: the hard case for requests that are not
  idempotent).

With ``fail_first=N`` the faults are not random: every distinct request (method and path)
meets a fault on each of its first N tries and passes after, which tells a client that
tries N + 1 times from one that gives up sooner, deterministically.

``proxy.counts`` tells how many requests passed and how many met each fault, so a test can
prove the faults really happened. Decisions are drawn in arrival order from
``random.Random(seed)``; with one client thread the sequence is reproducible.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

FAULTS: tuple[str, ...] = ("slowdown", "drop", "drop_after")

SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
    b"<RequestId>FAULTPROXY</RequestId><HostId>faultproxy</HostId></Error>"
)
# Hop-by-hop headers are the proxy's own business (RFC 9110 7.6.1); the body is re-framed.
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
        "content-length", "expect"}
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


class FaultProxy:
    """A threaded proxy on 127.0.0.1 (``.url``); start()/stop() or use as a context manager."""

    def __init__(self, upstream: str, rate: float = 0.2, faults: tuple[str, ...] = FAULTS, seed: int = 0,
                 methods: tuple[str, ...] | None = None, fail_first: int = 0) -> None:
        unknown = set(faults) - set(FAULTS)
        if unknown or not faults:
            raise ValueError(f"faults must be a non-empty subset of {FAULTS}, got {faults}")
        if not 0 <= rate <= 1:
            raise ValueError(f"rate must be in [0, 1], got {rate}")
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname, parsed.port or 80)
        self.rate, self.faults, self.methods = rate, tuple(faults), methods
        self.fail_first = fail_first
        self._arrivals: Counter = Counter()  # (method, path) -> requests seen
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.counts: Counter = Counter()
        self.log: list[tuple[str, str, str]] = []  # (method, path, outcome), in arrival order
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._server.handle_error = lambda request, address: None  # a dropped connection is the point
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._server.serve_forever, name="faultproxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def set_rate(self, rate: float) -> None:
        with self._lock:
            self.rate = rate

    @property
    def injected(self) -> int:
        return sum(v for k, v in self.counts.items() if k in FAULTS)

    def decide(self, method: str, path: str) -> str:
        """The outcome of the next request: ``pass`` or one of the faults."""
        with self._lock:
            roll, pick = self._rng.random(), self._rng.choice(self.faults)
            eligible = self.methods is None or method in self.methods
            self._arrivals[method, path] += 1
            if self.fail_first:  # every distinct request fails its first fail_first tries
                hit = self._arrivals[method, path] <= self.fail_first
            else:
                hit = roll < self.rate
            outcome = pick if eligible and hit else "pass"
            self.counts[outcome] += 1
            self.log.append((method, path, outcome))
            return outcome

    def _handler_class(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the AWS SDKs use it

            def log_message(self, *args) -> None:  # quiet
                pass

            def _read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _drop(self) -> None:
                """Close the client's connection without a byte of answer (RST, not FIN)."""
                self.close_connection = True
                try:
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            def _handle(self) -> None:
                body = self._read_body()
                outcome = proxy.decide(self.command, self.path)
                if outcome == "drop":
                    return self._drop()
                if outcome == "slowdown":
                    self.send_response(503, "Slow Down")
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOWDOWN_BODY)))
                    self.send_header("x-amz-request-id", "FAULTPROXY")
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(SLOWDOWN_BODY)
                    return None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    status, reason, resp_headers = resp.status, resp.reason, resp.getheaders()
                finally:
                    conn.close()
                if outcome == "drop_after":
                    return self._drop()
                self.send_response(status, reason)
                for k, v in resp_headers:
                    if k.lower() not in _HOP:
                        self.send_header(k, v)
                # HEAD: the upstream's Content-Length describes the object, not this (empty) body.
                length = dict((k.lower(), v) for k, v in resp_headers).get("content-length") \
                    if self.command == "HEAD" else str(len(data))
                if length is not None:
                    self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD" and data:
                    self.wfile.write(data)
                return None

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _handle

        return Handler
