"""Reproducible benchmarks: ``make bench`` (or ``python -m bench [name ...]``) runs them
and prints their figures. They are never run as timed tests."""
