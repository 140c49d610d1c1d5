"""SLURM through Hydra's submitit launcher: requeue a job that an interruption stopped.

The training saves on SLURM's signal and returns 75 (EXIT_PREEMPTED) like on any cloud; inside a
submitit job, the job is then requeued the submitit way (its pickled job resubmitted, `scontrol
requeue <job id>`), so the same sweep job runs again and resumes from its checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)


def in_submitit_slurm_job() -> bool:
    # SUBMITIT_FOLDER: set by submitit's job runner; SUBMITIT_EXECUTOR: by its sbatch script.
    return "SUBMITIT_FOLDER" in os.environ and os.environ.get("SUBMITIT_EXECUTOR") == "slurm"


def requeue_submitit_job() -> None:
    """In a submitit SLURM job, hand over to submitit's preemption handler (restored when the
    training's interruption monitor closed): it pickles the job again, runs `scontrol requeue`
    and exits. Elsewhere, returns."""
    if not in_submitit_slurm_job():
        return
    from submitit import JobEnvironment

    preempt_signal = JobEnvironment._usr_sig()  # submitit's own choice (USR2 unless configured)
    log.warning("requeueing this SLURM job through submitit (signal %s)", preempt_signal.name)
    signal.raise_signal(preempt_signal)
