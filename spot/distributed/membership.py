"""Which nodes a notice takes away, whether the others can go on, and which nodes have a disk of
their own (so that they keep a copy of the emergency checkpoint, or their ranks' shards).

A cloud notice reaches one node (its first worker polls that node's metadata endpoint); every
rank stops at one step, and the ranks then share who heard what. A node with a cloud notice
leaves: its agent stops and leaves the rendezvous. The others go on at the smaller world size,
unless fewer than `elastic.min_nodes` would stay: then every agent stops (exit 75), and the job
resumes from the emergency checkpoint when it is started again. A signal is not a departure: it
came from the agent itself (regrouping or stopping), which decides.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from spot.distributed.world import World
from spot.fsutil import atomic_write_bytes
from spot.run.events import EventLog

log = logging.getLogger(__name__)


@dataclass
class Departure:
    notices: list[dict | None]  # by rank: what each rank heard, if anything
    leaving: list[int]  # the nodes (torch elastic's GROUP_RANK) with a cloud notice
    nodes: int
    min_nodes: int
    this_node: bool  # this rank's node is among them

    @property
    def group_stops(self) -> bool:
        """Fewer nodes would stay than elastic.min_nodes: every node stops."""
        return bool(self.leaving) and self.nodes - len(self.leaving) < self.min_nodes

    def report(self, events: EventLog, step: int) -> None:
        if not self.leaving or self.nodes == 1:
            return
        events.emit(
            "departure",
            step=step,
            leaving=self.leaving,
            nodes=self.nodes,
            min_nodes=self.min_nodes,
            group_stops=self.group_stops,
        )
        if self.group_stops:
            log.warning(
                "%d of %d node(s) stay, fewer than elastic.min_nodes=%d: every node stops "
                "(exit 75); start the job again to resume from step %d",
                self.nodes - len(self.leaving),
                self.nodes,
                self.min_nodes,
                step,
            )


def departure(world: World, notice, min_nodes: int) -> Departure:
    """On every rank together, after the loop stopped: what each rank heard (`notice`: this
    rank's spot.interruption.Notice or None), and so which nodes leave."""
    node = int(os.environ.get("GROUP_RANK", 0))
    heard = world.share(world.gather((node, notice.as_dict() if notice else None)))
    leaving = sorted({n for n, seen in heard if seen and seen["source"] != "signal"})
    return Departure(
        notices=[seen for _, seen in heard],
        leaving=leaving,
        nodes=int(os.environ.get("GROUP_WORLD_SIZE", 1)),
        min_nodes=min_nodes,
        this_node=node in leaving,
    )


def separate_disk(world: World, run_dir: Path) -> bool:
    """On every rank together: whether this rank's run directory is not rank 0's (a node-local
    disk). Rank 0 marks its directory with a token; a rank that does not find the same token
    there has a disk of its own."""
    marker = run_dir / ".disk"
    token = None
    if world.is_leader:
        if not marker.exists():
            atomic_write_bytes(marker, os.urandom(8).hex().encode())
        token = marker.read_text()
    token = world.share(token)
    if world.is_leader:
        return False
    return not marker.exists() or marker.read_text() != token
