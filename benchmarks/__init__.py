"""Kernel and end-to-end benchmarks of pacofr. Entry point: `python -m benchmarks.run` (GPU tiers
--quick/--full need a CUDA device; --cpu-smoke checks the code paths on a CPU, with no numbers)."""
