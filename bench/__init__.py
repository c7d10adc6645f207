"""Corral benchmarks, side by side with the bare machine: `python -m bench.run` (see README.md)."""
