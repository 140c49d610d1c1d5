"""AWS EC2 Spot: the IMDSv2 protocol, watched (AwsWatcher) and emulated (AwsEmulator).

IMDSv2: PUT /latest/api/token with `X-aws-ec2-metadata-token-ttl-seconds` returns a session
token (and its TTL in the same header); every GET carries it in `X-aws-ec2-metadata-token`; an
expired or unknown token gets 401. `spot/instance-action` is 404 until the instance is marked
for interruption, then `{"action": "terminate"|"stop"|"hibernate", "time": ISO8601}`, two minutes
ahead. `events/recommendations/rebalance` is 404 or `{"noticeTime": ISO8601}`: an early warning.
AWS suggests polling every 5 seconds.
"""

from __future__ import annotations

import json
import secrets
import time

from spot.interruption import Notice
from spot.interruption.watch import EndpointError, Watcher, parse_time, request

TOKEN_PATH = "/latest/api/token"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
ACTION_PATH = "/latest/meta-data/spot/instance-action"
REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"


class AwsWatcher(Watcher):
    source = "aws"
    token_ttl = 21600  # the maximum; refreshed at 80% of what the endpoint grants

    def __init__(self, base_url, interval, monitor):
        super().__init__(base_url, interval, monitor)
        self._token: str | None = None
        self._token_expires = 0.0
        self.tokens_fetched = 0

    def _fresh_token(self) -> str:
        if self._token is None or time.monotonic() >= self._token_expires:
            status, headers, body = request(
                "PUT", self.base_url + TOKEN_PATH, {TTL_HEADER: str(self.token_ttl)}
            )
            token = body.strip()
            if (
                status != 200
                or not token
                or not token.isascii()
                or not token.decode().isprintable()
            ):
                raise EndpointError(f"token request answered {status}: {body[:40]!r}")
            try:
                granted = int(headers.get(TTL_HEADER) or self.token_ttl)
            except ValueError:
                raise EndpointError(
                    f"token TTL is not a number: {headers.get(TTL_HEADER)!r}"
                ) from None
            self._token = token.decode()
            self._token_expires = time.monotonic() + 0.8 * granted
            self.tokens_fetched += 1
        return self._token

    def _get(self, path: str) -> tuple[int, bytes]:
        for _ in range(2):
            status, _headers, body = request(
                "GET", self.base_url + path, {TOKEN_HEADER: self._fresh_token()}
            )
            if status != 401:
                return status, body
            self._token = None  # expired or revoked: one new token, then give up this poll
        raise EndpointError("token refused twice (401)")

    def poll(self) -> None:
        status, body = self._get(ACTION_PATH)
        if status == 200:
            action = _json(body)
            if "action" not in action or "time" not in action:
                raise EndpointError(f"instance-action without action/time: {body[:80]!r}")
            self.monitor.report_notice(
                Notice(
                    "aws",
                    str(action["action"]),
                    time.time(),
                    deadline=parse_time(str(action["time"])),
                    detail=action,
                )
            )
        elif status != 404:
            raise EndpointError(f"instance-action answered {status}")
        status, body = self._get(REBALANCE_PATH)
        if status == 200:
            rebalance = _json(body)
            if "noticeTime" not in rebalance:
                raise EndpointError(f"rebalance without noticeTime: {body[:80]!r}")
            self.monitor.report_rebalance(str(rebalance["noticeTime"]), rebalance)
        elif status != 404:
            raise EndpointError(f"rebalance answered {status}")


def _json(body: bytes) -> dict:
    try:
        value = json.loads(body)
    except ValueError:
        raise EndpointError(f"not JSON: {body[:80]!r}") from None
    if not isinstance(value, dict):
        raise EndpointError(f"not a JSON object: {body[:80]!r}")
    return value


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


class AwsEmulator:
    """IMDSv2 for rehearsals and tests. `token_ttl_cap` makes tokens expire early (401s)."""

    def __init__(self, token_ttl_cap: int | None = None, notice_seconds: float = 120):
        self.token_ttl_cap = token_ttl_cap
        self.notice_seconds = notice_seconds
        self.tokens: dict[str, float] = {}
        self.action: dict | None = None
        self.rebalance: dict | None = None
        self.stats = {"tokens": 0, "unauthorized": 0, "gets": 0}

    def notice(self, in_seconds: float | None = None, action: str = "terminate") -> dict:
        when = time.time() + (self.notice_seconds if in_seconds is None else in_seconds)
        self.action = {"action": action, "time": _iso(when)}
        return self.action

    def recommend_rebalance(self) -> dict:
        self.rebalance = {"noticeTime": _iso(time.time())}
        return self.rebalance

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes):
        if path == TOKEN_PATH:
            if method != "PUT":
                return 405, {}, b""
            try:
                ttl = int(headers.get(TTL_HEADER, ""))
            except ValueError:
                return 400, {}, b"missing or bad TTL header"
            if not 1 <= ttl <= 21600:
                return 400, {}, b"TTL out of range"
            ttl = min(ttl, self.token_ttl_cap or ttl)
            token = secrets.token_urlsafe(24)
            self.tokens[token] = time.monotonic() + ttl
            self.stats["tokens"] += 1
            return 200, {TTL_HEADER: str(ttl)}, token.encode()
        if method != "GET":
            return 405, {}, b""
        expires = self.tokens.get(headers.get(TOKEN_HEADER, ""))
        if expires is None or time.monotonic() >= expires:
            self.stats["unauthorized"] += 1
            return 401, {}, b""
        self.stats["gets"] += 1
        if path == ACTION_PATH and self.action:
            return 200, {"Content-Type": "text/plain"}, json.dumps(self.action).encode()
        if path == REBALANCE_PATH and self.rebalance:
            return 200, {"Content-Type": "text/plain"}, json.dumps(self.rebalance).encode()
        return 404, {}, b""
