"""Benchmarks (run as modules, e.g. ``python -m benchmarks.tap_overhead``); not CI gates."""
