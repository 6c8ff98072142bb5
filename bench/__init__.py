"""Benchmarks for recoveryd that print ratios against anchors measured in the same run.

Run ``python -m bench.transport_bench --help`` for the state_dict transport benchmark.
"""
