"""Calls run side by side in threads, each bounded by a deadline of its own."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def each(
    fns: Sequence[Callable[[], T]], name: str = "recoveryd-each"
) -> list[tuple[T | None, BaseException | None]]:
    """Runs the calls in parallel threads and waits for all; returns each one's value
    or error, in order. A single call runs in the caller's thread.

    Every call must bound its own waits: nothing here times out.
    """
    out: list[tuple[T | None, BaseException | None]] = [(None, None)] * len(fns)

    def run(k: int) -> None:
        try:
            out[k] = (fns[k](), None)
        except BaseException as err:  # handed to the caller
            out[k] = (None, err)

    if len(fns) == 1:
        run(0)
        return out
    threads = [
        threading.Thread(target=run, args=(k,), name=name, daemon=True) for k in range(len(fns))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()  # every call waits under its own deadline
    return out
