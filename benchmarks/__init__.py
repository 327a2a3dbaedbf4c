"""Kernel and end-to-end benchmarks of pacofr (GPU only). Entry point: `python -m benchmarks.run`."""
