"""The process group of one training attempt: who this rank is, and the few collectives the
template needs beyond DDP's gradient all-reduce.

Rank 0 (the leader) alone reads and writes checkpoints, events and metrics; the other ranks get
the restored state from it over the network, so a checkpoint needs no shared file system.
Decisions that must be the same on every rank (checkpoint now, stop now) are agreed with one
small all-reduce on a CPU (gloo) group, which on CUDA keeps the GPU stream free of host syncs.

Every collective has a timeout: a peer that dies or hangs (SIGSTOP, a reclaimed node) makes the
survivors fail within `elastic.collective_timeout_seconds`, so the elastic agent can
re-rendezvous instead of hanging for torch's default 30 minutes.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from spot.run.config import ConfigError
from spot.tree import map_leaves, map_tensors

log = logging.getLogger(__name__)


AGENT_PID_ENV = "SPOT_AGENT_PID"  # set by spot.distributed.launch for the workers of our own agent


def launched_by_torch_elastic() -> bool:
    """True in a worker started by torchrun or by our own elastic agent."""
    return "TORCHELASTIC_RUN_ID" in os.environ or (
        "RANK" in os.environ and "WORLD_SIZE" in os.environ
    )


@dataclass
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    restart_count: int = 0
    train: Any = None  # gradients (DDP), with the short collective timeout
    control: Any = None  # gloo group for flags and small objects, short timeout
    bulk: Any = None  # the default group, long timeout: start-up and restoring state
    io_timeout: timedelta | None = None  # the long timeout (elastic.restore_timeout_seconds)

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def device(self, requested: torch.device) -> torch.device:
        """One GPU per local rank."""
        if requested.type == "cuda" and self.distributed:
            return torch.device("cuda", self.local_rank)
        return requested

    def wrap(self, model: torch.nn.Module, device: torch.device, trainer=None) -> torch.nn.Module:
        """The model as trainer.strategy trains it: DDP (a replica per rank) or FSDP2
        (shards, spot.distributed.fsdp). A world of one rank trains the bare module."""
        if trainer is not None and trainer.strategy == "fsdp":
            from spot.distributed import fsdp

            group = self.train if self.distributed else None
            f = trainer.fsdp
            return fsdp.shard(
                model, group, device, f.shard, f.reshard_after_forward, trainer.precision
            )
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, process_group=self.train)

    def background_group(self):
        """A gloo group of every rank, with the long timeout, for the collectives a background
        thread runs (every rank writing its shards of a checkpoint) apart from the training
        loop's. None in a world of one. Every rank must call it, in the same order."""
        if not self.distributed:
            return None
        return dist.new_group(backend="gloo", timeout=self.io_timeout)

    def agree(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag is true on every rank if it is true on any rank."""
        if not self.distributed:
            return tuple(bool(f) for f in flags)
        tensor = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.control)
        return tuple(bool(v) for v in tensor.tolist())

    def agree_later(self, flag: bool) -> Callable[[], bool]:
        """`agree` for one flag, started now and answered by the call returned (which waits):
        the all-reduce runs in gloo's thread, so what the caller computes meanwhile hides it."""
        if not self.distributed:
            return lambda: bool(flag)
        tensor = torch.tensor([int(bool(flag))], dtype=torch.int32)
        work = dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.control, async_op=True)

        def answer() -> bool:
            work.wait()
            return bool(tensor.item())

        return answer

    def sum(self, value: float) -> float:
        return self.sums([value])[0]

    def sums(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks, in one all-reduce (float64)."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor, group=self.control)
        return tensor.tolist()

    def max(self, value: float) -> float:
        """The largest of the ranks' values."""
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.control)
        return tensor.item()

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj`, in rank order, on the leader (None elsewhere)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size if self.is_leader else None
        dist.gather_object(obj, out, dst=0, group=self.control)
        return out

    def share(self, obj: Any) -> Any:
        """The leader's `obj` on every rank. Tensors travel as raw buffers, one per dtype, not
        pickled (a pickled view would carry its whole storage); the rest is pickled."""
        if not self.distributed:
            return obj
        tensors: list[torch.Tensor] = []
        skeleton = _strip_tensors(obj, tensors) if self.is_leader else None
        box = [skeleton]
        dist.broadcast_object_list(box, src=0, group=self.bulk)
        skeleton = box[0]
        if not self.is_leader:
            tensors = []
            obj = _fill_tensors(skeleton, tensors)
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = defaultdict(list)
        for t in tensors:
            by_dtype[t.dtype].append(t)
        for dtype in sorted(by_dtype, key=str):
            group = by_dtype[dtype]
            flat = (
                torch.cat([t.reshape(-1) for t in group])
                if self.is_leader
                else torch.empty(sum(t.numel() for t in group), dtype=dtype)
            )
            dist.broadcast(flat, src=0, group=self.bulk)
            if not self.is_leader:
                offset = 0
                for t in group:
                    t.copy_(flat[offset : offset + t.numel()].view(t.shape))
                    offset += t.numel()
        return obj

    def wait_for_leader(self) -> None:
        """Every rank waits here until the leader arrives, for as long as the leader's checkpoint
        I/O may take (`elastic.restore_timeout_seconds`, the default group's timeout), not the
        short collective timeout."""
        if self.distributed:  # a CPU tensor: gloo, whatever the training backend
            dist.all_reduce(torch.zeros(1), group=self.bulk)

    def check_same_job(self, identity: str) -> None:
        """Every rank must run the same run with the same training config (nodes compose their
        config from their own command line)."""
        identities = self.gather(identity)
        differs = self.is_leader and len(set(identities)) > 1
        if self.agree(differs)[0]:
            raise ConfigError(
                "elastic",
                "ranks run different jobs (run name/id/training config); start every node "
                "with the same command",
            )


class _TensorSlot:
    """Where a tensor was, in a skeleton sent ahead of the tensor bytes."""

    def __init__(self, shape: torch.Size, dtype: torch.dtype):
        self.shape, self.dtype = tuple(shape), dtype


def _strip_tensors(obj: Any, out: list[torch.Tensor]) -> Any:
    def slot(t: torch.Tensor) -> _TensorSlot:
        out.append(t.detach().cpu())
        return _TensorSlot(t.shape, t.dtype)

    return map_tensors(obj, slot)


def _fill_tensors(obj: Any, out: list[torch.Tensor]) -> Any:
    # The same walk as _strip_tensors, so the receivers' tensors come in the leader's order.
    def empty(leaf: Any) -> Any:
        if not isinstance(leaf, _TensorSlot):
            return leaf
        out.append(torch.empty(leaf.shape, dtype=leaf.dtype))
        return out[-1]

    return map_leaves(obj, empty)


def exit_process(code: int) -> NoReturn:
    """End a worker. With a process group, skip the interpreter's teardown: in torch 2.13,
    destroying a gloo group from Python can deadlock (its destructor joins the group's threads
    while holding the GIL that one of them needs to free a finished work item), and a worker
    that never exits leaves its agent waiting forever. Everything the run wrote is closed,
    fsynced or committed by then; the streams are flushed here."""
    if dist.is_available() and dist.is_initialized():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def stop_agent() -> None:
    """After an emergency checkpoint for a cloud notice on this node: ask this worker's elastic
    agent to stop (SIGTERM, as the machine's shutdown would) rather than restart the workers on a
    machine that is going away."""
    agent = agent_pid()
    if agent is not None and agent > 1:
        os.kill(agent, signal.SIGTERM)


def die_with_agent() -> None:
    """A worker dies when its agent dies. torch starts workers in their own session, so a node
    losing its agent (SIGKILL, OOM) would otherwise leave workers training and writing
    checkpoints with nobody to restart or stop them."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    # The agent's pid as the agent said it (our own agent hands it down): os.getppid() read
    # here, after the worker's imports, would already be 1 (or a subreaper) if the agent died
    # during them, and the orphan would train on with nobody to stop it.
    agent = int(os.environ.get(AGENT_PID_ENV) or os.getppid())
    libc = ctypes.CDLL(None, use_errno=True)
    # Dies with its parent: the agent, or the agent's forkserver, which ends when the agent does.
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    parent = os.getppid()
    if agent not in (parent, _parent_of(parent)):  # the agent died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


def _parent_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:  # "pid (comm) state ppid ...": comm may hold spaces
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def agent_pid() -> int | None:
    """The pid of the elastic agent that started this worker (None outside torch elastic)."""
    if not launched_by_torch_elastic():
        return None
    return int(os.environ.get(AGENT_PID_ENV) or os.getppid())


def _loopback_interface() -> str | None:
    names = {name for _, name in socket.if_nameindex()}
    return next((name for name in ("lo", "lo0") if name in names), None)


def _process_group_store(world: World, timeout: timedelta) -> dist.Store | None:
    """The process group's store. Every rank on this node, launched by spot's agent: a file in
    the agent's directory (no port). Else as torch's env:// makes it (rank 0 hosts it at
    MASTER_ADDR:MASTER_PORT, the others connect), but listening on one address, not on every
    interface as torch's TCPStore server does: loopback when every rank is on this node (gloo's
    sockets too, GLOO_SOCKET_IFNAME, unless set); else MASTER_ADDR's address (`elastic.local_addr`, resolved
    by spot.distributed.rendezvous.listen_address), or every interface where that names none or
    one that is not this machine's. None where torch's agent hosts the store (an outside
    torchrun that shares its own, TORCHELASTIC_USE_AGENT_STORE): env:// then."""
    from spot.distributed.rendezvous import bound_store, listen_address

    env = os.environ
    one_node = env.get("LOCAL_WORLD_SIZE") == str(world.world_size)
    loopback = _loopback_interface() if one_node else None
    if loopback is not None:
        env.setdefault("GLOO_SOCKET_IFNAME", loopback)
    agent_hosts = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if agent_hosts or "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
        return None
    if one_node and (path := _one_node_store_path(world)) is not None:
        # No port at all: torch's agent picks MASTER_PORT by binding port 0 and closing it, and
        # in the seconds before rank 0 listens on it any outgoing connection on this machine
        # may take that ephemeral port (EADDRINUSE, and the group fails to start).
        store = dist.FileStore(str(path), world.world_size)
        store.set_timeout(timeout)
        return dist.PrefixStore("default_pg", store)
    host, port = ("127.0.0.1" if one_node else env["MASTER_ADDR"]), int(env["MASTER_PORT"])
    options = {"world_size": world.world_size, "timeout": timeout, "multi_tenant": True}
    address = listen_address(host) if world.is_leader else None
    if address is not None:
        try:
            return dist.PrefixStore("default_pg", bound_store(address, port, **options))
        except OSError as exc:
            log.warning(
                "cannot listen on %s:%d alone (%s): the process group's store listens on every "
                "interface",
                address,
                port,
                exc,
            )
    store = dist.TCPStore(host, port, is_master=world.is_leader, **options)
    return dist.PrefixStore("default_pg", store)


def _one_node_store_path(world: World) -> Path | None:
    """A file for this worker group's store where spot's agent launched it (its private
    directory, removed when it exits): one per restart, which one agent numbers for all."""
    from spot.distributed.recovery import notes_path

    notes = notes_path()
    return None if notes is None else notes.with_name(f"pg-store-{world.restart_count}")


def join_on_loopback(
    rank: int, world_size: int, port: int, collective_timeout: float, restore_timeout: float
) -> World:
    """A spawned process's place in a gloo world of `world_size` on loopback, joined as a
    torchrun worker joins one (benchmarks and tests that start their own ranks)."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        TORCHELASTIC_RUN_ID=os.environ.get("TORCHELASTIC_RUN_ID", "local"),
    )
    return join(collective_timeout, restore_timeout, cuda=False)


def join(collective_timeout_seconds: float, restore_timeout_seconds: float, cuda: bool) -> World:
    """Join the process group torch elastic (or torchrun) set up for this worker, if any."""
    if not launched_by_torch_elastic():
        return World()
    die_with_agent()
    world = World(
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        restart_count=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)),
    )
    if not world.distributed:
        return world
    timeout = timedelta(seconds=collective_timeout_seconds)
    if cuda:
        # A failed or timed-out NCCL collective aborts the communicator and raises, instead of
        # leaving the other ranks blocked in the kernel.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        torch.cuda.set_device(world.local_rank)
    backend = "nccl" if cuda else "gloo"
    # The default group gets the long timeout: connecting waits for workers that are still
    # starting (importing torch on a loaded node), and restoring waits for rank 0's download.
    # Its CPU tensors always go over gloo.
    long_timeout = timedelta(seconds=restore_timeout_seconds)
    store = _process_group_store(world, long_timeout)
    if store is None:  # torch's env:// (a client of its agent's store: an outside torchrun)
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=long_timeout)
    else:
        dist.init_process_group(
            "cpu:gloo,cuda:nccl" if cuda else "gloo",
            store=store,
            rank=world.rank,
            world_size=world.world_size,
            timeout=long_timeout,
        )
    world.bulk, world.io_timeout = dist.group.WORLD, long_timeout
    world.train = dist.new_group(backend=backend, timeout=timeout)
    world.control = dist.new_group(backend="gloo", timeout=timeout) if cuda else world.train
    log.info(
        "rank %d of %d (local rank %d, restart %d)",
        world.rank,
        world.world_size,
        world.local_rank,
        world.restart_count,
    )
    return world
