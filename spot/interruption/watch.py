"""The polling thread every cloud watcher shares, and a small HTTP client with short timeouts.

urllib, not boto3 or requests: metadata endpoints are plain HTTP on a link-local address, and
a watcher must not pull a dependency's retry policy (seconds of backoff) into a 30-second window.
"""

from __future__ import annotations

import logging
import threading
import urllib.error
import urllib.request
from datetime import datetime
from email.message import Message

log = logging.getLogger(__name__)


# Metadata services are link-local and never behind a proxy (cloud SDKs never proxy them), but
# urllib's default opener honours http_proxy/HTTP_PROXY: with a proxy in the environment (common
# in corporate VPCs) every poll would go to the proxy and the notice would never be seen. This
# opener has no proxy, whatever the environment says.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class EndpointError(Exception):
    """The endpoint did not answer as the protocol says (timeout, 5xx, a body that does not parse)."""


def request(
    method: str,
    url: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 2.0,
) -> tuple[int, Message, bytes]:
    """(status, headers, body); 4xx statuses are returned, not raised (404 means "nothing").
    The headers are case-insensitive, as HTTP's are."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with _OPENER.open(req, timeout=timeout) as resp:  # http(s) only: no proxy, see _OPENER
            return resp.status, resp.headers, resp.read(1 << 20)
    except urllib.error.HTTPError as exc:
        if 400 <= exc.code < 500:
            return exc.code, exc.headers or Message(), exc.read(1 << 20)
        raise EndpointError(f"HTTP {exc.code} from {url}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:  # refused, timeout, bad URL
        raise EndpointError(f"{type(exc).__name__}: {exc} ({url})") from None


def parse_time(text: str) -> float:
    """An ISO 8601 time (AWS) or an RFC 1123 one (Azure) as a POSIX timestamp."""
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            return parsedate_to_datetime(text).timestamp()
        except (TypeError, ValueError):
            raise EndpointError(f"not a time: {text!r}") from None


class Watcher(threading.Thread):
    """Calls `poll()` every `interval` seconds until stopped; errors are counted, logged (the
    first, then every 20th) and survived. `poll()` reports to the monitor."""

    source = "cloud"

    def __init__(self, base_url: str, interval: float, monitor):
        super().__init__(name=f"spot-{self.source}-watcher", daemon=True)
        self.base_url = base_url.rstrip("/")
        self.interval = interval
        self.monitor = monitor
        self.errors = 0
        self.polls = 0
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.is_set():
            try:
                self.poll()
                self.polls += 1
                wait = self.interval
            except Exception as exc:  # a broken endpoint must never end the watcher
                self.errors += 1
                if self.errors == 1 or self.errors % 20 == 0:
                    log.warning(
                        "%s metadata endpoint: %s (errors: %d)", self.source, exc, self.errors
                    )
                wait = max(self.interval, 1.0)
            if self.monitor.notice is not None and self.monitor.notice.source == self.source:
                return  # one notice is all a machine gets
            self._stopped.wait(wait)

    def poll(self) -> None:
        raise NotImplementedError

    def acknowledge(self) -> None:
        pass

    def stop(self) -> None:
        self._stopped.set()
