"""`events.jsonl`: one JSON object per line, appended and flushed as things happen."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


class EventLog:
    def __init__(self, path: Path | None):
        """path=None gives a log that records nothing (ranks other than 0)."""
        self.path = path
        self._lock = threading.Lock()
        self._file = None
        self._listeners: list[Callable[[dict], None]] = []
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torn = path.exists() and path.stat().st_size > 0 and _last_byte(path) != b"\n"
            self._file = open(path, "a", buffering=1)  # noqa: SIM115 - closed in close()
            if torn:  # a killed process's half line: end it, so the next event stands alone
                self._file.write("\n")

    def emit(self, event: str, **fields: Any) -> dict:
        record = {"event": event, "time": round(time.time(), 6), **fields}
        if self._file is not None:
            line = json.dumps(record, sort_keys=False, default=str)
            with self._lock:  # listeners see the events in the file's order, one at a time
                self._file.write(line + "\n")
                self._file.flush()
                for listener in self._listeners:
                    listener(record)
        return record

    def subscribe(self, listener: Callable[[dict], None]) -> None:
        """Call `listener(record)` after each event is written, in the file's order and never two
        at once (events come from the loop and the checkpoint thread); not on a log that records
        nothing. Metrics are what the events say, never a second account."""
        self._listeners.append(listener)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, 2)
        return f.read(1)


def read_events(path: Path) -> list[dict]:
    """Every complete line of an events file (a torn last line from a killed process is ignored)."""
    events = []
    if not path.exists():
        return events
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events
