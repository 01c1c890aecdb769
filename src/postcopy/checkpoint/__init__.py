"""Continuous checkpointing: the primary and the standby."""
