"""Named points where a test can stop the process deterministically, to then kill it from outside.

SPOT_FAILPOINTS="name@step=N" (comma-separated) makes the process write SPOT_FAILPOINT_DIR/name
when it reaches that point at that step, then wait to be killed. Unset (always, in production),
`failpoint()` is one dict lookup.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

_ARMED: dict[str, int | None] = {}
for _spec in filter(None, os.environ.get("SPOT_FAILPOINTS", "").split(",")):
    _name, _, _cond = _spec.partition("@step=")
    _ARMED[_name.strip()] = int(_cond) if _cond else None


def failpoint(name: str, step: int | None = None) -> None:
    if name not in _ARMED:
        return
    wanted = _ARMED[name]
    if wanted is not None and wanted != step:
        return
    marker = Path(os.environ.get("SPOT_FAILPOINT_DIR", ".")) / name
    partial = marker.with_name(f".{name}.{os.getpid()}")
    partial.write_text(str(step))
    os.replace(partial, marker)  # the watcher never sees a marker without its content
    while True:  # held here until the test kills the process
        time.sleep(0.05)
