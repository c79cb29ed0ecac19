"""Benchmarks: scripts that print figures and ratios against baselines run alongside (see bench/README.md)."""
