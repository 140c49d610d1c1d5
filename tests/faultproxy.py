"""A small fault-injecting HTTP proxy for tests: boto3 talks to it, it talks to the S3 server.

`rule(method, path) -> action` decides each request: "pass", "500", "503" (ServiceUnavailable),
"slowdown" (503 SlowDown, S3's throttling), "reset" (half a response, then a TCP reset),
"lost" (the request reaches the server, then a TCP reset instead of its response),
("slow", seconds) (forward after a delay), "flip" (a byte of the response's body flipped on
the way: damage in flight), or "412" (a precondition refused, as GCS's JSON API
answers it: tests/emulators.py). Loopback only.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host"}

ERROR_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
    "<Message>injected by the test proxy</Message></Error>"
)


class FaultProxy:
    def __init__(
        self, upstream: str, rule: Callable[..., object] | None = None, with_body: bool = False
    ):
        """`with_body`: the rule is called with the request's body too."""
        self.upstream = urlparse(upstream)
        self.rule = rule or (lambda method, path: "pass")
        self.with_body = with_body
        self.log: list[tuple[str, str, object]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _handle(self):
                body = self._body()
                extra = (body,) if proxy.with_body else ()
                action = proxy.rule(self.command, self.path, *extra)
                proxy.log.append((self.command, self.path, action))
                if action in ("500", "503", "slowdown"):
                    code = {
                        "500": "InternalError",
                        "503": "ServiceUnavailable",
                        "slowdown": "SlowDown",
                    }
                    payload = ERROR_BODY.format(code=code[action]).encode()
                    self.send_response(500 if action == "500" else 503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if action == "412":
                    payload = b'{"error": {"code": 412, "message": "Precondition Failed"}}'
                    self.send_response(412)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if isinstance(action, tuple) and action[0] == "slow":
                    time.sleep(action[1])
                status, headers, payload = proxy.forward(
                    self.command, self.path, self.headers, body
                )
                if action == "lost":  # done upstream, but the client never hears of it
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    self.close_connection = True
                    return
                if action == "flip" and payload:
                    payload = payload[:-1] + bytes([payload[-1] ^ 0x01])
                if action == "reset":  # promise the whole body, send half, then RST
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(payload) + 1000))
                    self.end_headers()
                    self.wfile.write(payload[: len(payload) // 2])
                    self.wfile.flush()
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    self.close_connection = True
                    return
                self.send_response(status)
                for key, value in headers:
                    if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def forward(self, method: str, path: str, headers, body: bytes):
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
        try:
            out = {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}
            out["Host"] = self.upstream.netloc
            if body or method in ("PUT", "POST"):
                out["Content-Length"] = str(len(body))
            conn.request(method, path, body=body, headers=out)
            response = conn.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            conn.close()

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
