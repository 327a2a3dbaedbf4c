"""Triton kernels of pacofr, installed as ``pacofr.kernels``.

Modules here import ``triton`` at import time; :mod:`pacofr.ops` imports them only when the
triton backend is chosen, so the package works without Triton installed.
"""
