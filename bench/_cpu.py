"""CPU time of the whole machine and of given processes, to mark runs that shared the CPUs."""

from __future__ import annotations

import os


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
