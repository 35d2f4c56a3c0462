"""Speed and memory benchmark: ``python -m benchmarks.perf`` (see run.py)."""
