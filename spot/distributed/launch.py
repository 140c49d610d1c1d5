"""Start torch's own elastic agent (the launcher API behind `torchrun`) from the Hydra config.

`python train.py elastic=elastic ...` becomes an agent that rendezvouses with the other nodes'
agents and runs the worker function (`train.worker`) in `nproc_per_node` worker processes,
restarting them (up to `max_restarts`) when a worker fails or the membership changes. Every worker
gets this process's resolved config as its argument, so all ranks of a node run exactly the same
job with the same run directory; ranks on other nodes check that they agree (the config digest)
when they join. Inside a worker (or under an outside `torchrun`) no agent starts.

Workers start from a forkserver (`elastic.start_method=forkserver`, the default): a process,
started as soon as the command line composes, that imports train.py's modules (torch among them)
once and forks each worker from there. A worker started after a membership change is training
seconds sooner than one that imports torch again (`python -m spot bench-restart`).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import tempfile
from collections.abc import Callable, Sequence
from multiprocessing import forkserver
from pathlib import Path

from spot.distributed import recovery, rendezvous
from spot.distributed.world import AGENT_PID_ENV, launched_by_torch_elastic
from spot.run.config import ElasticConfig
from spot.run.exitcodes import EXIT_COMPLETE, EXIT_PREEMPTED

log = logging.getLogger(__name__)

# The environment this process had when it started the workers' forkserver: every worker forked
# from it starts with that environment, not the agent's when it starts them (see `handed_down`).
_forkserver_environment: dict[str, str] | None = None
# What torch's agent sets for each worker itself (local_elastic_agent._start_workers): its value,
# not the agent process's, is the worker's. (CUDA_VISIBLE_DEVICES is not: torch sets it only with
# virtual local ranks, which this launcher never asks for, so a user's value is handed down.)
_TORCH_WORKER_KEYS = frozenset(
    (
        "RANK",
        "GROUP_RANK",
        "ROLE_RANK",
        "ROLE_NAME",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "WORLD_SIZE",
        "GROUP_WORLD_SIZE",
        "ROLE_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "OMP_NUM_THREADS",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING",
    )
)


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
        # One node: a private rendezvous on a free port, like `torchrun --standalone`, on
        # loopback only (the store has no authentication: spot.distributed.rendezvous).
        endpoint = "127.0.0.1:0"
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
        rdzv_backend=rendezvous.backend_name(cfg.rdzv_backend),  # leaves when reclaimed
        rdzv_configs=rdzv_configs,
        max_restarts=cfg.max_restarts,
        start_method=str(cfg.start_method),
        monitor_interval=cfg.monitor_interval_seconds,
        local_addr=cfg.local_addr,
        # A signal to the agent (the machine's shutdown, SLURM's --signal=USR1@90) goes on to the
        # workers, which take the emergency checkpoint; the agent waits that long before SIGKILL.
        signals_to_handle=",".join(dict.fromkeys(["SIGTERM", "SIGINT", "SIGHUP", *cloud.signals])),
        shutdown_timeout=int(max(cfg.shutdown_timeout_seconds, cloud.notice_seconds)),
    )


def start_forkserver(cfg: ElasticConfig, worker: Callable, imports: Sequence[str] = ()) -> None:
    """Start the workers' forkserver now (elastic.start_method=forkserver, in a process that
    will be an agent), importing `worker`'s module and `imports` (a tracker's library), so its
    imports overlap this process's own work (config checks, the bucket, the first rendezvous).
    torch._dynamo too: torch's optimizers import it when the first one is built (2 s here)."""
    if cfg.start_method != "forkserver" or not needs_agent(cfg):
        return
    global _forkserver_environment
    # The worker's module by name: the default, "__main__", is not imported for it.
    preload = [worker.__module__, "torch._dynamo", *imports]
    multiprocessing.get_context("forkserver").set_forkserver_preload(preload)
    if _forkserver_environment is None:
        _forkserver_environment = dict(os.environ)  # what the forkserver inherits now
    forkserver.ensure_running()  # once per process: later calls find it running


def handed_down() -> dict[str, str | None]:
    """The environment a spawned worker would inherit and a forked one lacks: every variable this
    process set, changed (None: removed) since it started the forkserver, torch's per-worker
    ones aside. The forkserver starts as soon as the command line composes, before Hydra applies
    `hydra.job.env_set` (credentials, NCCL_*) and before the agent sets its own; a worker applies
    these (`apply_environment`) before anything reads them. Empty without a forkserver."""
    if _forkserver_environment is None:
        return {}
    before, now = _forkserver_environment, dict(os.environ)
    changed: dict[str, str | None] = {k: v for k, v in now.items() if before.get(k) != v}
    changed.update((k, None) for k in before if k not in now)
    return {
        k: v
        for k, v in changed.items()
        if k not in _TORCH_WORKER_KEYS and not k.startswith("TORCHELASTIC_")
    }


def apply_environment(environment: dict[str, str | None]) -> None:
    """In a worker: the environment its agent handed down (`handed_down`; None: unset)."""
    for key, value in environment.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def run_agent(
    cfg: ElasticConfig,
    cloud,
    run_key: str,
    worker: Callable[[str, dict], int],
    resolved_config: str,
    complete: Callable[[], bool],
) -> int:
    """Run the elastic agent until the job ends; return the exit code the job should have: 0
    when the run is complete, the failed worker's code when workers failed past the restart
    budget, else 75 (interrupted: a notice or a signal stopped the agent, or the rendezvous is
    gone; resume later). `worker(resolved_config, environment)` runs in each worker process,
    with `apply_environment(environment)` its first step."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.launcher.api import elastic_launch

    started_at = recovery.process_started_at()
    with tempfile.TemporaryDirectory(prefix="spot-launch-") as tmp:
        # What the workers are handed (not inherited: a forkserver keeps the environment it
        # started with): the pid they die with and the notes they share with this agent.
        handed = {AGENT_PID_ENV: str(os.getpid()), recovery.NOTES_ENV: str(Path(tmp) / "notes")}
        os.environ.update(handed)  # the rendezvous handler writes the notes from this process
        recovery.note(agent_started_at=started_at)
        # torch 2.13 shares the rendezvous TCPStore with the workers by default and keeps it
        # across restarts, without a per-attempt prefix (rendezvous.py assumes a new store per
        # retry): process groups created after a restart then read the previous attempt's
        # addresses and time out. Opting out gives each attempt a fresh store on worker rank 0.
        os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
        environment = {**handed_down(), **handed}
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
            elastic_launch(launch_config(cfg, cloud, run_key), worker)(resolved_config, environment)
        except ChildFailedError as exc:
            rank, failure = exc.get_first_failure()
            code = failure.exitcode if failure.exitcode > 0 else 1
            log.error("worker rank %d failed with exit code %s", rank, failure.exitcode)
            return code
        except SignalException as exc:
            log.warning("elastic agent stopped by %s", exc.sigval.name)
            rendezvous.leave()  # the others regroup now, not when its heartbeat expires
        except RendezvousError as exc:
            # The store went away (the node hosting it was reclaimed), or no round formed in
            # the join timeout: the job stops here, resumable from its newest checkpoint.
            log.error("the rendezvous at %s failed, stopping: %s", cfg.rdzv_endpoint, exc)
        finally:
            for key in handed:
                os.environ.pop(key, None)
    return EXIT_COMPLETE if complete() else EXIT_PREEMPTED
