"""Real models, prompts and synthetic caches for tests, demos and benchmarks (no downloads)."""
