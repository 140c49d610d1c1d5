"""Azure Spot VMs: Scheduled Events, watched and emulated.

GET /metadata/scheduledevents?api-version=2020-07-01 with `Metadata: true` returns
`{"DocumentIncarnation": n, "Events": [...]}`; a `Preempt` event lists the VMs it concerns in
`Resources` and its `NotBefore` time (at least 30 seconds ahead). Only events for this VM count
(its name from /metadata/instance/compute/name). After the checkpoint commits, the VM
acknowledges the event (POST `{"StartRequests": [{"EventId": id}]}`) so Azure can proceed at once.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from email.utils import formatdate

from spot.interruption import Notice
from spot.interruption.watch import EndpointError, Watcher, parse_time, request

EVENTS_PATH = "/metadata/scheduledevents"
NAME_PATH = "/metadata/instance/compute/name"
API = "api-version=2020-07-01"
HEADERS = {"Metadata": "true"}
VM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class AzureWatcher(Watcher):
    source = "azure"

    def __init__(self, base_url, interval, monitor):
        super().__init__(base_url, interval, monitor)
        self.vm_name: str | None = None
        self._incarnation = None
        self._event_id: str | None = None
        self.acknowledged = False

    def poll(self) -> None:
        if self.vm_name is None:
            status, _, body = request(
                "GET", f"{self.base_url}{NAME_PATH}?api-version=2021-02-01&format=text", HEADERS
            )
            name = body.decode("utf-8", "replace").strip()
            if status != 200 or not VM_NAME.match(name):
                raise EndpointError(f"instance name answered {status}: {body[:40]!r}")
            self.vm_name = name
        status, _, body = request("GET", f"{self.base_url}{EVENTS_PATH}?{API}", HEADERS)
        if status != 200:
            raise EndpointError(f"scheduledevents answered {status}")
        try:
            document = json.loads(body)
            incarnation = document["DocumentIncarnation"]
            events = list(document.get("Events") or [])
        except (ValueError, KeyError, TypeError):
            raise EndpointError(f"scheduledevents is not a document: {body[:80]!r}") from None
        if incarnation == self._incarnation:
            return  # nothing changed since the last poll
        self._incarnation = incarnation
        for event in events:
            if not isinstance(event, dict) or event.get("EventType") != "Preempt":
                continue
            if self.vm_name not in (event.get("Resources") or []):
                continue  # another VM's eviction
            not_before = event.get("NotBefore")
            self._event_id = str(event.get("EventId"))
            self.monitor.report_notice(
                Notice(
                    "azure",
                    "preempt",
                    time.time(),
                    deadline=parse_time(not_before) if not_before else None,
                    detail={"EventId": self._event_id, "NotBefore": not_before},
                )
            )
            return

    def acknowledge(self) -> None:
        if self._event_id is None or self.acknowledged:
            return
        body = json.dumps({"StartRequests": [{"EventId": self._event_id}]}).encode()
        try:
            status, _, _ = request(
                "POST",
                f"{self.base_url}{EVENTS_PATH}?{API}",
                {**HEADERS, "Content-Type": "application/json"},
                body,
            )
            self.acknowledged = status == 200
        except EndpointError:
            pass  # the event starts at NotBefore anyway


class AzureEmulator:
    def __init__(self, vm_name: str = "spot-vm-0", notice_seconds: float = 30):
        self.vm_name = vm_name
        self.notice_seconds = notice_seconds
        self.incarnation = 1
        self.events: list[dict] = []
        self.acknowledged: list[str] = []
        self.stats = {"gets": 0}

    def _add(self, resources: list[str], in_seconds: float | None) -> dict:
        when = time.time() + (self.notice_seconds if in_seconds is None else in_seconds)
        event = {
            "EventId": str(uuid.uuid4()).upper(),
            "EventStatus": "Scheduled",
            "EventType": "Preempt",
            "ResourceType": "VirtualMachine",
            "Resources": resources,
            "NotBefore": formatdate(when, usegmt=True),
            "Description": "",
            "EventSource": "Platform",
            "DurationInSeconds": -1,
        }
        self.events.append(event)
        self.incarnation += 1
        return event

    def notice(self, in_seconds: float | None = None) -> dict:
        return self._add([self.vm_name], in_seconds)

    def other_vm_notice(self, in_seconds: float | None = None) -> dict:
        return self._add([f"{self.vm_name}-other"], in_seconds)

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes):
        if headers.get("Metadata") != "true":
            return 400, {}, b'{"error": "Bad request. Required metadata header not specified"}'
        if path == NAME_PATH and method == "GET":
            return 200, {"Content-Type": "text/plain"}, self.vm_name.encode()
        if path != EVENTS_PATH:
            return 404, {}, b""
        if method == "POST":
            try:
                ids = [r["EventId"] for r in json.loads(body)["StartRequests"]]
            except (ValueError, KeyError, TypeError):
                return 400, {}, b""
            self.acknowledged += ids
            self.events = [e for e in self.events if e["EventId"] not in ids]
            self.incarnation += 1
            return 200, {}, b""
        self.stats["gets"] += 1
        document = {"DocumentIncarnation": self.incarnation, "Events": self.events}
        return 200, {"Content-Type": "application/json"}, json.dumps(document).encode()
