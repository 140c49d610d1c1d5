"""The job a command line names: its validated settings, the run's identity, directory and
bucket, and the device. A process then decides what it is: an elastic agent for several workers
(`Job.run_agent`), or one worker (`join`, then a spot.session.Session).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf

from spot.checkpoint import storage
from spot.distributed import launch
from spot.distributed import world as distributed
from spot.run import identity
from spot.run.config import ConfigError, Settings, training_view, validate
from spot.run.exitcodes import EXIT_COMPLETE
from spot.run.identity import RunPaths
from spot.run.metrics import tracker_imports

log = logging.getLogger("train")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("trainer.device", f"{name!r} requested but CUDA is not available here")
    return torch.device(name)


@dataclass
class Job:
    """What a command line names: validated settings, the run's identity, directory and bucket."""

    cfg: DictConfig
    settings: Settings
    run_id: str
    paths: RunPaths
    remote: storage.RemoteStore | None
    device: torch.device
    training_config: dict  # the keys that change what is trained (they name the config digest)

    @classmethod
    def from_config(cls, cfg: DictConfig, overrides: list[str]) -> Job:
        """ConfigError or storage.RemoteError on a bad config, before anything is written."""
        s = validate(cfg)
        run_id = s.run.id or identity.run_id_from_overrides(overrides)
        paths = RunPaths.of(s.run.root, s.run.name, run_id, s.storage.dir)
        remote = storage.connect(s.storage, s.run.name, run_id)  # checks the bucket now
        device = pick_device(s.trainer.device)
        return cls(cfg, s, run_id, paths, remote, device, training_view(cfg))

    @property
    def name(self) -> str:
        return f"{self.settings.run.name}/{self.run_id}"

    @property
    def digest(self) -> str:
        return identity.config_digest(self.training_config)

    def is_complete(self) -> bool:
        return self.paths.complete.exists() or bool(
            self.remote and storage.remote_complete(self.remote)
        )

    def nothing_to_do(self) -> int:
        where = self.remote.url if self.remote else self.paths.dir
        log.info("run %s is already complete (%s): nothing to do", self.name, where)
        return EXIT_COMPLETE

    def run_agent(self, worker) -> int:
        """Several processes: torch's elastic agent runs `worker(resolved config, environment)`
        in each worker process, with this job's config (its run id fixed); returns the job's exit
        code."""
        s = self.settings
        launch.start_forkserver(s.elastic, worker, tracker_imports(s.logger))
        if self.is_complete():
            return self.nothing_to_do()
        resolved = OmegaConf.merge(self.cfg, {"run": {"id": self.run_id}})
        return launch.run_agent(
            s.elastic,
            s.cloud,
            f"{s.run.name}-{self.run_id}",
            worker,
            OmegaConf.to_yaml(resolved, resolve=True),
            complete=self.is_complete,
        )


def join(job: Job) -> distributed.World:
    """This worker's process group; rank 0 alone logs, the others say only what goes wrong."""
    e = job.settings.elastic
    world = distributed.join(
        e.collective_timeout_seconds, e.restore_timeout_seconds, cuda=job.device.type == "cuda"
    )
    if not world.is_leader:
        logging.getLogger().setLevel(logging.WARNING)
    world.check_same_job(f"{job.name}/{job.digest}")
    return world
