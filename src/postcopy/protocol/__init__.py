"""The wire protocol: sans-IO frames, the per-role state machine, the channel."""
