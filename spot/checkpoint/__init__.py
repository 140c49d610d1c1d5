"""Checkpoints: the on-disk format (manifest, tensor files), the manager that commits and
restores them, the checkpointer the training loop calls, and their copies in a bucket."""
