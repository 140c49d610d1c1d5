"""Exit codes an orchestrator can act on (SLURM requeue, SkyPilot, Kubernetes restart policies).

1 is left to Python for crashes (uncaught exceptions), so no documented outcome is confused with one.
"""

EXIT_COMPLETE = 0
EXIT_BAD_CONFIG = 2  # a configuration value is not allowed: fix the command, do not retry
EXIT_CHECKPOINT_UNUSABLE = (
    3  # no usable checkpoint (on_corrupt=fail, or it belongs to another config)
)
EXIT_CHECKPOINT_WRITE_FAILED = (
    4  # a checkpoint could not be written (disk full...); the previous is kept
)
EXIT_PREEMPTED = (
    75  # stopped by an interruption notice after committing a checkpoint: retry (EX_TEMPFAIL)
)
