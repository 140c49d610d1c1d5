"""The rendezvous: the store the agents meet at, and leaving a round when a node is reclaimed.

torch's dynamic rendezvous (c10d, etcd-v2) drops a node only when its heartbeats stop: after
`rdzv_keep_alive_seconds` x `rdzv_keep_alive_max_attempt` the others' next round may form. A node
that got an interruption notice knows it is going, seconds ahead: its agent takes itself out of
the round on the way out (torch's own exit operation, the first thing every `next_rendezvous`
does), so the survivors regroup at once instead of waiting for the heartbeat to expire.
`python train.py` registers the backends `spot-c10d` and `spot-etcd-v2` for that: torch's
handler, wrapped to leave and to note when each rendezvous began and ended (spot.distributed.
recovery).

The stores have no authentication, and torch's TCPStore server listens on every interface ([::])
whatever host it is given. Where this process hosts one (the c10d store an agent hosts, the
process group's store on worker rank 0 of several nodes: spot.distributed.world, `python -m
spot rendezvous`), it listens only on the address the config names (`bound_store`): loopback
for one node.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import socket
import sys
import time
from datetime import timedelta

from spot.distributed import recovery

log = logging.getLogger(__name__)

PREFIX = "spot-"
LEAVE_TIMEOUT_SECONDS = 10.0  # the store is reachable or the round does not matter any more
_joined = None  # this process's handler (one agent per process), for `leave`


class LeavingHandler:
    """torch's dynamic rendezvous handler, plus `leave()`; everything else is torch's."""

    def __init__(self, inner, backend: str):
        self._inner, self._backend = inner, backend

    def get_backend(self) -> str:
        return self._backend

    def next_rendezvous(self):
        began = time.time()
        info = self._inner.next_rendezvous()
        recovery.rendezvous_done(began)  # the workers started next report it
        return info

    @property
    def use_agent_store(self) -> bool:
        return self._inner.use_agent_store

    def __getattr__(self, name):  # is_closed, set_closed, num_nodes_waiting, get_run_id, shutdown
        return getattr(self._inner, name)

    def leave(self) -> None:
        """Take this node out of its round now, as a restart would before joining the next;
        and stop its heartbeats. torch 2.13's own operation, reached through private names."""
        from torch.distributed.elastic.rendezvous.dynamic_rendezvous import _RendezvousExitOp

        inner = self._inner
        inner._stop_heartbeats()
        inner._op_executor.run(_RendezvousExitOp(), time.monotonic() + LEAVE_TIMEOUT_SECONDS)


def listen_address(host: str) -> str | None:
    """The one address to listen on for a store that others reach as `host` (an endpoint's host,
    MASTER_ADDR): an address as given; a name's address (IPv4 first). None (every interface,
    torch's way) for a name that does not resolve, or that resolves here to loopback but is not
    `localhost`: the others reach this machine by that name at another address (Debian's
    /etc/hosts maps the machine's own name to 127.0.1.1)."""
    host = host.strip("[]")
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(host))
    try:
        found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return None
    found.sort(key=lambda entry: entry[0] != socket.AF_INET)
    address = found[0][4][0] if found else None
    if address is None or (ipaddress.ip_address(address).is_loopback and host != "localhost"):
        return None
    return address


def bound_store(address: str, port: int, **options):
    """A TCPStore server that listens on `address` alone (port 0: a free one, `.port` says which):
    a socket bound here and handed over (torch then owns and closes it). OSError if the address
    cannot be bound (in use, not this machine's). `options`: TCPStore's (world_size, timeout,
    multi_tenant, ...)."""
    from torch.distributed import TCPStore

    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    listener = socket.create_server((address, port), family=family, backlog=socket.SOMAXCONN)
    try:
        bound_port = listener.getsockname()[1]
        return TCPStore(
            address, bound_port, is_master=True, master_listen_fd=listener.detach(), **options
        )
    finally:
        listener.close()  # a no-op once detached


def _c10d_handler(params):
    """torch's c10d handler (its registry's `_create_c10d_handler`), the agent-hosted store
    listening on the endpoint's address alone. Who hosts it, unless `is_host` says: the agent
    that can listen on that address (one of this machine's, not yet taken: an agent beside it
    may host it already); torch guesses from the machine's name instead, and where the name is
    this machine's but its address is not (NAT), or the name maps to loopback here
    (`listen_address`), torch's own handler hosts it on every interface."""
    from torch.distributed import TCPStore
    from torch.distributed.elastic.rendezvous import RendezvousConnectionError
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler
    from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler
    from torch.distributed.elastic.rendezvous.utils import (
        _matches_machine_hostname,
        parse_rendezvous_endpoint,
    )

    host, port = parse_rendezvous_endpoint(params.endpoint, default_port=29400)
    is_host = params.get_as_bool("is_host")
    address = listen_address(host) if is_host is not False else None
    if params.get("store_type", "tcp").strip().lower() != "tcp" or address is None:
        return get_rendezvous_handler(params)  # a client, a file store, or every interface
    timeout = timedelta(seconds=params.get_as_int("read_timeout", 60))
    try:
        store = bound_store(address, port, multi_tenant=True, timeout=timeout)
        log.info("hosting the rendezvous store on %s:%d", address, store.port)
    except (OSError, RuntimeError) as exc:
        if is_host:
            raise RendezvousConnectionError(
                f"cannot host the rendezvous store on {address}:{port}: {exc}"
            ) from exc
        not_here = isinstance(exc, OSError) and exc.errno == errno.EADDRNOTAVAIL
        if not_here and _matches_machine_hostname(host):
            return get_rendezvous_handler(params)
        try:  # another machine's address, or an agent on this one hosts it
            store = TCPStore(host, port, is_master=False, multi_tenant=True, timeout=timeout)
        except (ValueError, RuntimeError, TimeoutError) as exc:
            raise RendezvousConnectionError(
                "The connection to the C10d store has failed. See inner exception for details."
            ) from exc
    return create_handler(store, C10dRendezvousBackend(store, params.run_id), params)


def _create(params):
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler

    global _joined
    backend = params.backend.removeprefix(PREFIX)
    torch_params = RendezvousParameters(
        backend,
        params.endpoint,
        params.run_id,
        params.min_nodes,
        params.max_nodes,
        params.local_addr,
        **params.config,
    )
    create = _c10d_handler if backend == "c10d" else get_rendezvous_handler
    _joined = LeavingHandler(create(torch_params), params.backend)
    return _joined


def backend_name(backend: str) -> str:
    """The name to give torch for `elastic.rdzv_backend`: the leaving variant of a dynamic one."""
    if backend not in ("c10d", "etcd-v2"):
        return backend  # etcd (v1) and static have no rounds to leave
    from torch.distributed.elastic.rendezvous import rendezvous_handler_registry

    rendezvous_handler_registry.register(PREFIX + backend, _create)  # again: a no-op
    return PREFIX + backend


def leave() -> None:
    """This node's agent is stopping for good (a notice, the machine's shutdown): out of the
    round, so the others need not wait for its heartbeat to expire. Never raises."""
    if _joined is None:
        return
    began = time.perf_counter()
    try:
        _joined.leave()
        log.info("left the rendezvous in %.2f s", time.perf_counter() - began)
    except Exception as exc:  # the store is gone (its node was reclaimed): nothing to leave
        log.warning("could not leave the rendezvous (%s): the others wait for its heartbeat", exc)


def add_rendezvous_arguments(parser) -> None:
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only): the address "
        "the trainers' elastic.rdzv_endpoint names, or 0.0.0.0 for every interface",
    )
    parser.add_argument("--port", type=int, default=29400)


def rendezvous(args) -> int:
    """`python -m spot rendezvous`: the c10d rendezvous store, in its own process.

    With `elastic.rdzv_store_host=agent` the first agent on the endpoint's host serves the store,
    and when that node is reclaimed the whole job loses its rendezvous. Run this instead on a
    node that is not reclaimed (an on-demand instance, the head node, a small always-on VM) and
    start the agents with `elastic.rdzv_store_host=external`.
    """
    import signal

    from torch.distributed import TCPStore

    try:
        # TCPStore's server ignores its host argument and listens on every interface ([::]),
        # and it has no authentication: bind the address asked for ourselves and hand the
        # socket over (torch then owns and closes it).
        family, _, _, _, address = socket.getaddrinfo(
            args.host, args.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        listener = socket.create_server(address[:2], family=family, backlog=socket.SOMAXCONN)
        bound, port = listener.getsockname()[:2]  # port: the one chosen when asked for 0
        store = TCPStore(  # noqa: F841 - serves while it exists
            args.host,
            port,
            is_master=True,
            wait_for_workers=False,
            multi_tenant=True,
            master_listen_fd=listener.detach(),
        )
    except (RuntimeError, OSError, ValueError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        print(f"rendezvous: cannot listen on {args.host}:{args.port}: {reason}", file=sys.stderr)
        return 1
    where = f"[{args.host}]:{port}" if ":" in args.host else f"{args.host}:{port}"  # IPv6
    if not ipaddress.ip_address(bound).is_loopback:
        print(
            f"rendezvous: warning: {where} can be reached from other machines and "
            "the store has no authentication: let only the trainers reach this port (a "
            "firewall, a security group, a NetworkPolicy)",
            file=sys.stderr,
            flush=True,
        )
    print(f"rendezvous store listening on {where}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(KeyboardInterrupt):
        signal.pause()
    return 0
