"""Benchmarks: standalone measurements behind design decisions (results in bench/results, conclusions in bench/README.md)."""
