"""The coordinator: membership, donor choice and recovery plans.

This package holds the pure policy (plain data in, decisions out); the gRPC
servicer that serves it comes with the control-plane issue.
"""
