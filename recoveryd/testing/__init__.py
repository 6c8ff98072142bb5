"""Helpers to run ranks as real processes on loopback and to inject faults."""

from recoveryd.testing.faults import FaultyGroup
from recoveryd.testing.ranks import RankFailed, gloo_group, run_ranks
from recoveryd.testing.threads import run_threads

__all__ = ["FaultyGroup", "RankFailed", "gloo_group", "run_ranks", "run_threads"]
