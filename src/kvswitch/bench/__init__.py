"""Benchmark drivers behind ``kvswitch bench``."""
