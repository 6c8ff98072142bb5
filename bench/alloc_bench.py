"""Where an allocating receive's time goes on this machine: CPU seconds per end, against the wire.

One pair of processes on a real Gloo group moves 1 GiB in 8 float32 tensors
over and over, interleaving in every round: raw Gloo into a touched buffer
(the wire alone), raw Gloo into a buffer allocated in the timed region
(``torch.empty``: the wire plus page population), recoveryd allocating
(workload A) and recoveryd in place (workload E). For each, the joiner's
wall time and the CPU seconds each end used in it (``getrusage``, every
thread: the kernel's socket copies, page population, packing) are recorded.
Both ends share this machine's cores, so a transfer can take no less than
(donor CPU + joiner CPU) / cores; with one end per machine, only the
joiner's own CPU would bound it (its populate thread runs on a core the
receive does not use). Also measured, in the joiner's process: populating
1 GiB of fresh memory alone (``MADV_POPULATE_WRITE``, one thread).

    python -m bench.alloc_bench            # 1 GiB, 5 rounds
    python -m bench.alloc_bench --quick    # 128 MiB, 3 rounds
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import resource
import statistics
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from bench._cpu import eight_tensors
from recoveryd.testing.ranks import run_ranks
from recoveryd.transport import recv_state_dict, send_state_dict
from recoveryd.transport._memory import _MADV_POPULATE_WRITE, _libc

VARIANTS = ("raw-gloo", "raw-gloo-fresh", "recoveryd A", "recoveryd E")
_T = timedelta(seconds=300)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _populate_s(nbytes: int) -> float:
    """Seconds to populate ``nbytes`` of fresh anonymous memory, one thread."""
    if _libc is None:
        return float("nan")
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    anchor = ctypes.c_char.from_buffer(m)
    addr = ctypes.addressof(anchor)
    t0 = time.perf_counter()
    rc = _libc.madvise(addr, nbytes, _MADV_POPULATE_WRITE)
    took = time.perf_counter() - t0
    del anchor
    m.close()
    return took if rc == 0 else float("nan")


def _pair(rank: int, ws: int, pg: Any, store: dist.Store, nbytes: int, rounds: int) -> object:
    sd, into, raw = eight_tensors(nbytes)
    n = raw.numel() // 8
    out: list[tuple[int, str, float, float]] = []
    step = 0
    for r in range(rounds):
        for variant in VARIANTS:
            step += 1
            store.set(f"go{step}/{rank}", "1")
            store.wait([f"go{step}/0", f"go{step}/1"], _T)
            cpu0, t0 = _cpu(), time.perf_counter()
            got: object = None
            if variant.startswith("raw"):
                if rank == 0:
                    pg.send([raw], 1, 7).wait()
                else:
                    buf = raw if variant == "raw-gloo" else torch.empty(8 * n)
                    pg.recv([buf], 0, 7).wait()
                    got = buf
            elif rank == 0:
                send_state_dict(pg, [1], sd, timeout=_T, step=step)
            else:
                got = recv_state_dict(
                    pg, 0, timeout=_T, step=step, into=into if variant.endswith("E") else None
                )
            took = time.perf_counter() - t0
            out.append((r, variant, took, _cpu() - cpu0))
            del got
    populate = [_populate_s(nbytes) for _ in range(3)] if rank == 1 else []
    return {"rows": out, "populate": populate}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.alloc_bench", description=__doc__.splitlines()[0]
    )
    p.add_argument("--quick", action="store_true", help="128 MiB, 3 rounds")
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 5; 3 with --quick)")
    args = p.parse_args(argv)
    nbytes = (128 << 20) if args.quick else (1 << 30)
    rounds = args.rounds or (3 if args.quick else 5)
    if rounds < 1:
        p.error("--rounds must be >= 1")
    donor, joiner = run_ranks(_pair, 2, args=(nbytes, rounds), timeout=timedelta(seconds=3600))
    assert isinstance(donor, dict)
    assert isinstance(joiner, dict)
    cores = os.cpu_count() or 1
    print(
        f"alloc bench: {nbytes >> 20} MiB in 8 float32 tensors, {rounds} interleaved rounds, "
        f"{cores} CPUs, both ends on this machine (medians)"
    )
    print(
        f"{'variant':15} {'wall s':>7} {'donor cpu s':>11} {'joiner cpu s':>12} "
        f"{'cores busy':>10} {'floor here s':>12} {'floor apart s':>13}"
    )
    for variant in VARIANTS:
        wall = statistics.median(t for _, v, t, _ in joiner["rows"] if v == variant)
        dcpu = statistics.median(c for _, v, _, c in donor["rows"] if v == variant)
        jcpu = statistics.median(c for _, v, _, c in joiner["rows"] if v == variant)
        print(
            f"{variant:15} {wall:7.3f} {dcpu:11.3f} {jcpu:12.3f} {(dcpu + jcpu) / wall:10.2f} "
            f"{(dcpu + jcpu) / cores:12.3f} {max(dcpu, jcpu) / cores:13.3f}"
        )
    pop = joiner["populate"]
    print(
        f"populating {nbytes >> 20} MiB of fresh memory, one thread: {min(pop):.3f} s (best of 3)"
    )
    print(
        "floor here: both ends' CPU over this machine's cores; floor apart: the busier end's "
        "CPU over its own cores (one end per machine, same cores each)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
