"""GCP Spot and preemptible VMs: the metadata server's `instance/preempted`, watched and emulated.

GET /computeMetadata/v1/instance/preempted with `Metadata-Flavor: Google` answers `TRUE` or
`FALSE` (with the same header back, and an ETag). `?wait_for_change=true&last_etag=E` hangs until
the value changes or `timeout_sec` passes: a notice arrives within moments, without polling. The
VM then has 30 seconds; the guest also gets ACPI soft-off, which reaches the process as SIGTERM.
"""

from __future__ import annotations

import hashlib
import threading
import time
from urllib.parse import parse_qs

from spot.interruption import Notice
from spot.interruption.watch import EndpointError, Watcher, request

PREEMPTED_PATH = "/computeMetadata/v1/instance/preempted"
FLAVOR = {"Metadata-Flavor": "Google"}
NOTICE_SECONDS = 30
HANG_SECONDS = 30  # each wait_for_change request; the HTTP timeout is a little longer


class GcpWatcher(Watcher):
    source = "gcp"

    def __init__(self, base_url, interval, monitor):
        super().__init__(base_url, interval, monitor)
        self._etag: str | None = None

    def poll(self) -> None:
        url = self.base_url + PREEMPTED_PATH
        timeout = 2.0
        if self._etag is not None:
            url += f"?wait_for_change=true&last_etag={self._etag}&timeout_sec={HANG_SECONDS}"
            timeout = HANG_SECONDS + 5.0
        status, headers, body = request("GET", url, FLAVOR, timeout=timeout)
        if status != 200 or headers.get("Metadata-Flavor") != "Google":
            raise EndpointError(f"preempted answered {status} without Metadata-Flavor: Google")
        value = body.decode("ascii", "replace").strip().upper()
        if value not in ("TRUE", "FALSE"):
            raise EndpointError(f"preempted is neither TRUE nor FALSE: {body[:40]!r}")
        self._etag = headers.get("ETag") or self._etag
        if value == "TRUE":
            now = time.time()
            self.monitor.report_notice(
                Notice("gcp", "preempted", now, deadline=now + NOTICE_SECONDS)
            )

    def run(self) -> None:
        # Hanging GETs: no sleep between successful polls. After an error the base class waits
        # max(interval, 1 s), so a dead endpoint is not hammered.
        self.interval = 0.0
        super().run()


class GcpEmulator:
    def __init__(self):
        self.preempted = False
        self._changed = threading.Condition()
        self.stats = {"gets": 0, "hanging": 0}

    def notice(self, in_seconds: float | None = None) -> dict:
        with self._changed:
            self.preempted = True
            self._changed.notify_all()
        return {"preempted": True}

    def _etag(self) -> str:
        return hashlib.sha1(str(self.preempted).encode()).hexdigest()[:16]

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes, query=""):
        if headers.get("Metadata-Flavor") != "Google":
            return 403, {}, b"Missing Metadata-Flavor:Google header."
        if path != PREEMPTED_PATH:
            return 404, {}, b""
        params = {k: v[0] for k, v in parse_qs(query).items()}
        self.stats["gets"] += 1
        if params.get("wait_for_change") == "true":
            self.stats["hanging"] += 1
            deadline = time.monotonic() + float(params.get("timeout_sec", 60))
            with self._changed:
                while self._etag() == params.get("last_etag") and time.monotonic() < deadline:
                    self._changed.wait(max(0.0, deadline - time.monotonic()))
        value = b"TRUE" if self.preempted else b"FALSE"
        return 200, {**FLAVOR, "ETag": self._etag(), "Content-Type": "text/plain"}, value
