"""What the one-pair benches share: their state, and the CPU time of the machine and of
given processes, to mark runs that shared the CPUs."""

from __future__ import annotations

import os
from typing import Any

import torch


def busy_cpu_s() -> float:
    """Non-idle CPU seconds of the whole machine since boot (from ``/proc/stat``)."""
    with open("/proc/stat") as fh:
        fields = [float(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def cpu_s(pids: list[int]) -> float:
    """CPU seconds the processes used so far (all their threads)."""
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rpartition(")")[2].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def eight_tensors(
    nbytes: int,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """``nbytes`` in 8 float32 tensors (the donor's), zeroed tensors like them (a joiner's
    in-place state) and one touched flat buffer of the same bytes (raw Gloo's)."""
    n = nbytes // 4 // 8
    sd = {f"t{i}": torch.full((n,), float(i)) for i in range(8)}
    into = {k: torch.zeros_like(v) for k, v in sd.items()}
    raw = torch.zeros(8 * n)
    raw.fill_(1.0)  # touched: the wire's limit, not page faults
    return sd, into, raw


def pair_pids(store: Any, rank: int) -> list[int]:
    """Both ranks' process ids, exchanged through the pair's store."""
    store.set(f"pid/{rank}", str(os.getpid()))
    return [int(store.get(f"pid/{r}")) for r in range(2)]


def foreign_share(busy0: float, own0: float, pids: list[int], wall_s: float) -> float:
    """The share of the machine's CPUs other processes than ``pids`` used since
    ``busy0 = busy_cpu_s()`` and ``own0 = cpu_s(pids)``, over ``wall_s``."""
    others = (busy_cpu_s() - busy0) - (cpu_s(pids) - own0)
    return max(0.0, others) / ((os.cpu_count() or 1) * max(wall_s, 1e-9))
