"""Processes: the world of ranks and its collectives, torch elastic launch, the elastic policy
(batch and LR at any world size), and the resumable data position and its ledger."""
