"""spot: checkpointing, storage, interruption handling and elastic helpers for preemptible training.

One concern per module; nothing here imports the user's `models` or `data`.
"""

__version__ = "0.1.0"
