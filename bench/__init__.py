"""Benchmarks that print MemWarden's figures beside a peer's, with ratios: ``python -m bench``.

Never imported by MemWarden itself, and never asserting a time: a benchmark reports, a test checks.
"""
