"""Numba kernels: pure functions on preallocated arrays (``cpu``)."""
