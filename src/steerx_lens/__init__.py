"""steerx_lens."""
