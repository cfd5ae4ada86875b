"""Staged training: data from shards, the per-worker loop on Ray Train, checkpoints, stage wiring."""
