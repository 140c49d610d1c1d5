"""Start torch's own elastic agent (the launcher API behind `torchrun`) from the Hydra config.

`python train.py elastic=elastic ...` becomes an agent that rendezvouses with the other nodes'
agents and runs `train.py` in `nproc_per_node` worker processes, restarting them (up to
`max_restarts`) when a worker fails or the membership changes. Every worker gets this process's
resolved config through a file named in `SPOT_RESOLVED_CONFIG`, so all ranks of a node run exactly
the same job with the same run directory; ranks on other nodes check that they agree (the
config digest) when they join. Inside a worker (or under an outside `torchrun`) no agent starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from spot.distributed.world import AGENT_PID_ENV, launched_by_torch_elastic
from spot.run.config import ElasticConfig
from spot.run.exitcodes import EXIT_COMPLETE, EXIT_PREEMPTED

log = logging.getLogger(__name__)

RESOLVED_CONFIG_ENV = "SPOT_RESOLVED_CONFIG"


def needs_agent(cfg: ElasticConfig) -> bool:
    return not launched_by_torch_elastic() and (cfg.max_nodes > 1 or cfg.nproc_per_node > 1)


def launch_config(cfg: ElasticConfig, cloud, run_key: str):
    from torch.distributed.launcher.api import LaunchConfig

    endpoint, rdzv_configs = (
        cfg.rdzv_endpoint,
        {
            "join_timeout": cfg.rdzv_join_timeout_seconds,
            "last_call_timeout": cfg.rdzv_last_call_seconds,
            # c10d and etcd-v2 (torch's dynamic rendezvous; etcd and static ignore them): a
            # heartbeat every interval; a node whose last one is older than interval x
            # max_attempt is dropped, and only then can the survivors form a new round. Unset,
            # torch uses 5 s x 3 whatever the config says. It reads both as ints (the config
            # checks the interval is whole seconds).
            "keep_alive_interval": int(cfg.rdzv_keep_alive_seconds),
            "keep_alive_max_attempt": cfg.rdzv_keep_alive_max_attempt,
        },
    )
    if cfg.max_nodes == 1:
        # One node: a private rendezvous on a free port, like `torchrun --standalone`.
        endpoint = "localhost:0"
    elif cfg.rdzv_backend == "c10d" and cfg.rdzv_store_host == "external":
        # The store runs elsewhere (`python -m spot rendezvous`), on a node that is not
        # reclaimed: no agent hosts it, so losing any agent leaves the store up.
        rdzv_configs["is_host"] = False
    return LaunchConfig(
        min_nodes=cfg.min_nodes,
        max_nodes=cfg.max_nodes,
        nproc_per_node=cfg.nproc_per_node,
        run_id=run_key,
        role="trainer",
        rdzv_endpoint=endpoint,
        rdzv_backend=cfg.rdzv_backend,
        rdzv_configs=rdzv_configs,
        max_restarts=cfg.max_restarts,
        monitor_interval=cfg.monitor_interval_seconds,
        local_addr=cfg.local_addr,
        # A signal to the agent (the machine's shutdown, SLURM's --signal=USR1@90) goes on to the
        # workers, which take the emergency checkpoint; the agent waits that long before SIGKILL.
        signals_to_handle=",".join(dict.fromkeys(["SIGTERM", "SIGINT", "SIGHUP", *cloud.signals])),
        shutdown_timeout=int(max(cfg.shutdown_timeout_seconds, cloud.notice_seconds)),
    )


def run_agent(
    cfg: ElasticConfig,
    cloud,
    run_key: str,
    script: Path,
    resolved_config: str,
    complete: Callable[[], bool],
) -> int:
    """Run the elastic agent until the job ends; return the exit code the job should have: 0
    when the run is complete, the failed worker's code when workers failed past the restart
    budget, else 75 (interrupted: a notice or a signal stopped the agent; resume later)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    with tempfile.TemporaryDirectory(prefix="spot-launch-") as tmp:
        config_path = Path(tmp) / "config.yaml"
        config_path.write_text(resolved_config)
        os.environ[RESOLVED_CONFIG_ENV] = str(config_path)  # the workers inherit it
        os.environ[AGENT_PID_ENV] = str(os.getpid())  # so does the pid they die with
        # torch 2.13 shares the rendezvous TCPStore with the workers by default and keeps it
        # across restarts, without a per-attempt prefix (rendezvous.py assumes a new store per
        # retry): process groups created after a restart then read the previous attempt's
        # addresses and time out. Opting out gives each attempt a fresh store on worker rank 0.
        os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
        log.info(
            "elastic agent: %d-%d node(s) x %d process(es), rendezvous %s at %s, run %s",
            cfg.min_nodes,
            cfg.max_nodes,
            cfg.nproc_per_node,
            cfg.rdzv_backend,
            cfg.rdzv_endpoint if cfg.max_nodes > 1 else "localhost (standalone)",
            run_key,
        )
        try:
            elastic_launch(launch_config(cfg, cloud, run_key), sys.executable)("-u", str(script))
        except ChildFailedError as exc:
            rank, failure = exc.get_first_failure()
            code = failure.exitcode if failure.exitcode > 0 else 1
            log.error("worker rank %d failed with exit code %s", rank, failure.exitcode)
            return code
        except SignalException as exc:
            log.warning("elastic agent stopped by %s", exc.sigval.name)
        finally:
            os.environ.pop(RESOLVED_CONFIG_ENV, None)
            os.environ.pop(AGENT_PID_ENV, None)
    return EXIT_COMPLETE if complete() else EXIT_PREEMPTED


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
    import ipaddress
    import signal
    import socket

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
