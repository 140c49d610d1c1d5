"""One run: its config, identity and directory, its events and what derives from them (metrics,
goodput, progress), and the LR schedule."""
