"""SLURM through Hydra's submitit launcher (`hydra/launcher=spot_slurm`): the composed launcher
config. A preempted job, requeued, without a cluster: tests/e2e/test_slurm_submitit.py."""

from __future__ import annotations

from hydra import compose, initialize_config_dir

from ..helpers import REPO


def test_the_launcher_composes_with_the_notice_window_of_cloud_slurm():
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["hydra/launcher=spot_slurm", "cloud=slurm"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.signal_delay_s == cfg.cloud.notice_seconds
    from submitit import JobEnvironment

    # The signal submitit asks SLURM for is one cloud=slurm saves on.
    assert f"SIG{JobEnvironment.USR_SIG}" in cfg.cloud.signals
