"""Clock skew for one process in a test: libfaketime, preloaded when the process starts."""

from __future__ import annotations

import glob


def faketime_env(offset_s: int, *, monotonic: bool = False) -> dict[str, str] | None:
    """Environment that skews a process's wall clock by ``offset_s`` (libfaketime).

    Args:
        offset_s: seconds ahead (negative: behind).
        monotonic: skew the monotonic clock as well (by default only the wall
            clock moves, as an NTP-less host's would).

    Returns:
        The variables to add, or ``None`` when libfaketime is not installed.
    """
    libs = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    if not libs:
        return None
    env = {"LD_PRELOAD": libs[0], "FAKETIME": f"{offset_s:+d}", "FAKETIME_NO_CACHE": "1"}
    if not monotonic:
        env["FAKETIME_DONT_FAKE_MONOTONIC"] = "1"
    return env
