"""Run a function on N ranks as threads of this process, each with its own Gloo group.

Cheaper than processes for contract tests; faults that kill a process need
:func:`recoveryd.testing.run_ranks` instead.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from recoveryd.testing.ranks import RankFailed, gloo_group


def run_threads(
    fn: Callable[..., Any],
    world_size: int,
    *,
    args: Sequence[Any] = (),
    timeout: timedelta = timedelta(seconds=60),
    pg_timeout: timedelta = timedelta(seconds=30),
) -> list[Any]:
    """Runs ``fn(rank, world_size, pg, store, *args)`` on ``world_size`` threads.

    Raises:
        RankFailed: a rank raised, or did not finish within ``timeout``.
    """
    store = dist.TCPStore(
        "127.0.0.1", 0, world_size, True, timedelta(seconds=30), wait_for_workers=False
    )
    prefix = f"t{id(store)}"
    out: list[Any] = [None] * world_size
    errors: dict[int, str] = {}

    def body(rank: int) -> None:
        try:
            client = dist.TCPStore(
                "127.0.0.1", store.port, world_size, False, timedelta(seconds=30)
            )
            pg = gloo_group(client, rank, world_size, pg_timeout, prefix=prefix)
            out[rank] = fn(rank, world_size, pg, client, *args)
        except BaseException:
            errors[rank] = traceback.format_exc()

    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(world_size)]
    for t in threads:
        t.start()
    end = time.monotonic() + timeout.total_seconds()
    for r, t in enumerate(threads):
        t.join(timeout=max(0.0, end - time.monotonic()))
        if t.is_alive():
            raise RankFailed(r, f"no result within {timeout}")
    if errors:
        r = min(errors)
        others = "".join(
            f"\n--- rank {o} also failed:\n{errors[o]}" for o in sorted(errors) if o != r
        )
        raise RankFailed(r, errors[r] + others)
    return out
