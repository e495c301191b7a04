"""Benchmarks: each figure is a ratio measured side by side, in one run, against
the same work done without django-queued-storage. See ``python -m benchmarks``."""
