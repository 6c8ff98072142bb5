"""Run a function on N ranks, each a real spawned process with its own Gloo group.

The parent hosts the TCPStore on an ephemeral loopback port and polls the
children's exit codes, so a rank that crashes fails the run at once instead of
leaving its peers to hang; every child is killed when the run ends.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from recoveryd.errors import RecoverydError

_HOST = "127.0.0.1"


class RankFailed(RecoverydError, RuntimeError):
    """A rank raised, died or ran out of time.

    Attributes:
        rank: the first failing rank.
        details: its traceback or exit status.
    """

    def __init__(self, rank: int, details: str) -> None:
        super().__init__(f"rank {rank} failed:\n{details}")
        self.rank = rank
        self.details = details


def gloo_group(
    store: dist.Store, rank: int, world_size: int, timeout: timedelta, prefix: str = "pg"
) -> dist.ProcessGroup:
    """An explicit Gloo group on loopback (never the default group)."""
    gloo: Any = dist.ProcessGroupGloo
    opts = gloo._Options()
    opts._timeout = timeout
    opts._devices = [gloo.create_device(hostname=_HOST)]
    return gloo(dist.PrefixStore(prefix, store), rank, world_size, opts)  # type: ignore[no-any-return]


def _child(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    pg_timeout_s: float,
    args: Sequence[Any],
    results: Any,
) -> None:
    try:
        store = dist.TCPStore(_HOST, port, world_size + 1, False, timedelta(seconds=60))
        pg = gloo_group(store, rank, world_size, timedelta(seconds=pg_timeout_s))
        value = fn(rank, world_size, pg, store, *args)
        results.put((rank, True, value))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        # Flush the result, then skip Gloo's destructor, which can block on dead peers.
        results.close()
        results.join_thread()
        os._exit(0)


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *,
    args: Sequence[Any] = (),
    timeout: timedelta = timedelta(seconds=120),
    pg_timeout: timedelta = timedelta(seconds=60),
    allow_death: Sequence[int] = (),
) -> list[Any]:
    """Runs ``fn(rank, world_size, pg, store, *args)`` on ``world_size`` processes.

    Args:
        fn: a picklable (module-level) function; its return value must pickle.
        world_size: number of ranks.
        args: extra arguments for ``fn``.
        timeout: the whole run's deadline.
        pg_timeout: the Gloo group's own default timeout.
        allow_death: ranks that may die without a result (fault injection);
            their slot in the returned list is ``None``.

    Returns:
        Each rank's return value, by rank.

    Raises:
        RankFailed: a rank raised, died unexpectedly, or the deadline passed.
    """
    ctx = mp.get_context("spawn")
    store = dist.TCPStore(
        _HOST, 0, world_size + 1, True, timedelta(seconds=60), wait_for_workers=False
    )
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_child,
            args=(fn, r, world_size, store.port, pg_timeout.total_seconds(), args, results),
            daemon=True,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    end = time.monotonic() + timeout.total_seconds()
    try:
        while len(out) < world_size:
            try:
                rank, ok, value = results.get(timeout=0.05)
            except queue.Empty:
                for r, p in enumerate(procs):
                    if r in out or p.is_alive():
                        continue
                    # A rank that exited may have queued its result just now.
                    try:
                        rank, ok, value = results.get(timeout=0.5)
                    except queue.Empty:
                        if r in allow_death:
                            out[r] = None
                            continue
                        raise RankFailed(
                            r, f"exited with status {p.exitcode} and no result"
                        ) from None
                    break
                else:
                    if time.monotonic() > end:
                        missing = [r for r in range(world_size) if r not in out]
                        raise RankFailed(missing[0], f"no result within {timeout}") from None
                    continue
            if not ok:
                raise RankFailed(rank, value)
            out[rank] = value
        return [out[r] for r in range(world_size)]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=10)
        results.close()
