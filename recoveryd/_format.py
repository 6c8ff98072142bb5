"""How sizes, rates and phase timings read in logs, timelines and tables."""

from __future__ import annotations

from collections.abc import Mapping


def human_bytes(n: float) -> str:
    """``1.5 GiB``-style sizes."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def rate(nbytes: int, seconds: float) -> str:
    """``248.1 MiB/s``: ``nbytes`` over ``seconds`` (0 when no time was measured)."""
    return f"{human_bytes(nbytes / seconds if seconds > 0 else 0)}/s"


def phases_line(phases: Mapping[str, float] | None) -> str:
    """``rendezvous 4 ms, data 120 ms`` for the phases that took at least a millisecond."""
    if not phases:
        return ""
    return ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in phases.items() if v >= 0.0005)
