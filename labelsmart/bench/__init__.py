"""Benchmarks (``../shared/BENCHMARK.md``) and their CLI commands.

They import the product; the product never imports them.
"""
