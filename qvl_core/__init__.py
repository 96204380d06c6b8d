"""qvl_core: what both trainers share (config, data, FLOP accounting); imports neither jax nor torch."""
