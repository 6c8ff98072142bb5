"""Helpers to run ranks as real processes (or threads) on loopback, inject faults, run Prometheus.

``ranks.py`` runs a function on every rank of a real Gloo group in spawned
processes (a crashed rank fails the run at once); ``threads.py`` the same in
threads; ``faults.py`` wraps a group to kill, silence or corrupt a transfer's
data messages; ``prometheus.py`` runs a real local Prometheus server;
``netlab.py`` puts parties in network namespaces joined by a router and
injects faults on their links (``delayproxy.py`` delays TCP where the kernel
has no netem); ``clock.py`` skews one process's clock (libfaketime).
"""

from recoveryd.testing.faults import FaultyGroup
from recoveryd.testing.ranks import RankFailed, gloo_group, run_ranks
from recoveryd.testing.threads import run_threads

__all__ = ["FaultyGroup", "RankFailed", "gloo_group", "run_ranks", "run_threads"]
