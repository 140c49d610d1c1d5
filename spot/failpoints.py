"""Named points where a test can stop the process deterministically, to then kill it from outside.

SPOT_FAILPOINTS="name@step=N" (comma-separated; `name@step=N@rank=R` for one rank only) makes the
process write SPOT_FAILPOINT_DIR/name (the step) and name.pid when it reaches that point at that
step, then wait to be killed; `name@step=N@raise` raises FailpointError there instead (an
exception in the middle of training). `name@sleep=S` slows every pass by S seconds (a test's
training that must still be running while agents come and go). `name@step=N@until=other` holds
the thread that reaches `name` at step N until another thread of the process reaches `other`
(a background write kept in flight until the loop asks for the next one, whatever the timing;
with `@raise` too, it then raises); it writes no marker and holds every time it is reached. A failpoint fires once: while its
marker exists it is disarmed, so a worker restarted by the elastic agent runs past it. Unset
(always, in production), `failpoint()` is one dict lookup.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

_ARMED: dict[str, tuple[int | None, int | None]] = {}
_SLOW: dict[str, float] = {}
_RAISE: set[str] = set()
_UNTIL: dict[str, str] = {}  # a held point -> the point whose arrival releases it
_REACHED: dict[str, threading.Event] = {}  # the points that release a held one


class FailpointError(RuntimeError):
    """Raised at a failpoint armed with `@raise`: an exception in the middle of training."""


def arm(specs: str) -> None:
    """Arm failpoints as SPOT_FAILPOINTS does (which is read when this module is imported); for
    in-process tests. `arm("")` disarms them all."""
    for d in (_ARMED, _SLOW, _RAISE, _UNTIL, _REACHED):
        d.clear()
    for spec in filter(None, specs.split(",")):
        name, *conds = spec.strip().split("@")
        where = dict(c.split("=", 1) if "=" in c else (c, "") for c in conds)
        if "sleep" in where:
            _SLOW[name] = float(where["sleep"])
            continue
        if "raise" in where:
            _RAISE.add(name)
        if "until" in where:
            _UNTIL[name] = where["until"]
            _REACHED[where["until"]] = threading.Event()
        step, rank = where.get("step"), where.get("rank")
        _ARMED[name] = (int(step) if step else None, int(rank) if rank else None)


arm(os.environ.get("SPOT_FAILPOINTS", ""))


def failpoint(name: str, step: int | None = None, rank: int = 0) -> None:
    if name in _SLOW:
        time.sleep(_SLOW[name])
    if name in _REACHED:
        _REACHED[name].set()
    if name not in _ARMED:
        return
    wanted_step, wanted_rank = _ARMED[name]
    if (wanted_step is not None and wanted_step != step) or (
        wanted_rank is not None and wanted_rank != rank
    ):
        return
    if name in _UNTIL:
        _REACHED[_UNTIL[name]].wait()
    if name in _RAISE:
        raise FailpointError(f"failpoint {name} at step {step}")
    if name in _UNTIL:
        return
    marker = Path(os.environ.get("SPOT_FAILPOINT_DIR", ".")) / name
    if marker.exists():
        return
    partial = marker.with_name(f".{name}.{os.getpid()}")
    marker.with_name(f"{name}.pid").write_text(str(os.getpid()))
    partial.write_text(str(step))
    os.replace(partial, marker)  # the watcher never sees a marker without its content
    while True:  # held here until the test kills the process
        time.sleep(0.05)
