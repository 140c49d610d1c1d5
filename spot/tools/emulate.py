"""`python -m spot emulate aws|gcp|azure`: a local metadata endpoint that speaks the cloud's
protocol, to rehearse the interruption path on a laptop and to test it.

    python -m spot emulate aws --port 8169 --notice-after 60
    python train.py cloud=aws cloud.metadata_url=http://127.0.0.1:8169

Told what to do by flags (`--notice-after S`, `--rebalance-after S`, `--misbehave MODE`,
`--token-ttl S` for AWS) or at any time by a request to its control path:

    POST /_emulator/notice          {"in_seconds": 120}   (negative: a time already past)
    POST /_emulator/rebalance                              (AWS)
    POST /_emulator/other-vm-notice                        (Azure: another VM's Preempt)
    POST /_emulator/misbehave       {"mode": "hang" | "500" | "garbage" | "ok"}
    GET  /_emulator/state                                  (counters, Azure acknowledgements)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

CONTROL = "/_emulator/"
MODES = ("ok", "hang", "500", "garbage")


def make_emulator(cloud: str, token_ttl: int | None = None):
    if cloud == "aws":
        from spot.interruption.aws import AwsEmulator

        return AwsEmulator(token_ttl_cap=token_ttl)
    if cloud == "gcp":
        from spot.interruption.gcp import GcpEmulator

        return GcpEmulator()
    if cloud == "azure":
        from spot.interruption.azure import AzureEmulator

        return AzureEmulator()
    raise ValueError(f"cloud {cloud!r} is not one of aws, gcp, azure")


class EmulatorServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, cloud: str, host: str = "127.0.0.1", port: int = 0, token_ttl=None):
        self.cloud = cloud
        self.emulator = make_emulator(cloud, token_ttl)
        self.mode = "ok"
        self.requests = 0
        self._closing = threading.Event()
        super().__init__((host, port), _Handler)

    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):  # the client went away (a node
            return  # stopped during a long poll): nothing to answer, nothing wrong here
        super().handle_error(request, client_address)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def control(self, action: str, args: dict) -> dict:
        if action == "notice":
            return {"notice": self.emulator.notice(args.get("in_seconds"))}
        if action == "rebalance" and hasattr(self.emulator, "recommend_rebalance"):
            return {"rebalance": self.emulator.recommend_rebalance()}
        if action == "other-vm-notice" and hasattr(self.emulator, "other_vm_notice"):
            return {"event": self.emulator.other_vm_notice(args.get("in_seconds"))}
        if action == "misbehave" and args.get("mode") in MODES:
            self.mode = args["mode"]
            return {"mode": self.mode}
        if action == "state":
            state = {"cloud": self.cloud, "mode": self.mode, "requests": self.requests}
            state.update(getattr(self.emulator, "stats", {}))
            if hasattr(self.emulator, "acknowledged"):
                state["acknowledged"] = self.emulator.acknowledged
            return state
        raise KeyError(action)

    def start(self) -> EmulatorServer:
        threading.Thread(target=self.serve_forever, name="spot-emulator", daemon=True).start()
        return self

    def stop(self) -> None:
        self._closing.set()
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: EmulatorServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet; the state endpoint has the counters
        pass

    def _reply(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _serve(self, method: str) -> None:
        url = urlsplit(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if url.path.startswith(CONTROL):
            try:
                args = json.loads(body) if body.strip() else {}
                result = self.server.control(url.path[len(CONTROL) :], args)
            except (KeyError, ValueError):
                return self._reply(400, {}, b'{"error": "unknown control request"}')
            return self._reply(
                200, {"Content-Type": "application/json"}, json.dumps(result).encode()
            )
        self.server.requests += 1
        mode = self.server.mode
        if mode == "hang":  # accept and never answer (until the emulator stops)
            self.server._closing.wait(300)
            return
        if mode == "500":
            return self._reply(500, {}, b"Internal Server Error")
        if mode == "garbage":
            return self._reply(200, {"Content-Type": "text/plain"}, os.urandom(64))
        headers = self.headers  # case-insensitive, as HTTP's are
        emulator = self.server.emulator
        if self.server.cloud == "gcp":
            self._reply(*emulator.handle(method, url.path, headers, body, url.query))
        else:
            self._reply(*emulator.handle(method, url.path, headers, body))

    def do_GET(self):  # noqa: N802 - http.server's naming
        self._serve("GET")

    def do_PUT(self):  # noqa: N802
        self._serve("PUT")

    def do_POST(self):  # noqa: N802
        self._serve("POST")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("cloud", choices=("aws", "gcp", "azure"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8169)
    parser.add_argument("--notice-after", type=float, help="issue a notice after S seconds")
    parser.add_argument("--notice-in", type=float, help="seconds from the notice to the reclaim")
    parser.add_argument("--rebalance-after", type=float, help="AWS: a rebalance recommendation")
    parser.add_argument("--misbehave", choices=MODES, default="ok")
    parser.add_argument("--token-ttl", type=int, help="AWS: cap IMDSv2 token lifetimes (401s)")


def command(args: argparse.Namespace) -> int:
    try:
        server = EmulatorServer(args.cloud, args.host, args.port, args.token_ttl)
    except OSError as exc:
        print(f"emulate: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    server.mode = args.misbehave
    print(
        f"{args.cloud} metadata emulator at {server.url} "
        f"(train with cloud={args.cloud} cloud.metadata_url={server.url})",
        flush=True,
    )
    timers = []
    if args.notice_after is not None:
        timers.append((args.notice_after, "notice", {"in_seconds": args.notice_in}))
    if args.rebalance_after is not None:
        timers.append((args.rebalance_after, "rebalance", {}))
    for delay, action, control_args in timers:
        t = threading.Timer(delay, server.control, (action, control_args))
        t.daemon = True
        t.start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
