"""In place at the wire's speed: recoveryd's message size against one raw Gloo receive.

One pair of processes on a real Gloo group moves workload E (1 GiB in 8
float32 tensors, received in place into the joiner's own, touched tensors)
over and over, interleaving in every round: raw Gloo (one ``recv`` of the
whole bytes into a touched buffer: the wire's limit) and recoveryd with
``bucket_bytes`` of 4, 16 (the default), 64 and 256 MiB (a 128 MiB tensor
travels in messages of at most that size, straight from the donor's memory
into the joiner's). Each is timed on the joiner, ``--rounds`` times; the
table shows min and median, the median's and the min's ratio to raw Gloo,
the data messages and what each costs over raw Gloo (median; negative when
recoveryd is the faster, see RESULTS.md). A round where
other processes used more than 15 % of the CPUs is marked.

    python -m bench.message_bench            # 1 GiB, 9 rounds
    python -m bench.message_bench --quick    # 128 MiB, 5 rounds

Its last line reads ``messages: 16 MiB (default) X.XXx raw (median), best size N MiB``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from bench._cpu import busy_cpu_s, cpu_s, eight_tensors, foreign_share, pair_pids
from recoveryd.testing.ranks import run_ranks
from recoveryd.transport import TransferConfig, recv_state_dict, send_state_dict
from recoveryd.transport._flatten import cut_messages

_MiB = 1 << 20
SIZES_MIB = (4, 16, 64, 256)
DEFAULT_MIB = 16
_BUSY = 0.15
_T = timedelta(seconds=300)


def _pair(rank: int, ws: int, pg: Any, store: dist.Store, nbytes: int, rounds: int) -> object:
    sd, into, raw = eight_tensors(nbytes)
    pids = pair_pids(store, rank)
    out: list[tuple[int, str, float, float]] = []
    step = 0
    for r in range(rounds):
        for variant in ("raw-gloo", *(f"{m} MiB" for m in SIZES_MIB)):
            step += 1
            store.set(f"go{step}/{rank}", "1")
            store.wait([f"go{step}/0", f"go{step}/1"], _T)
            cpu0, own0, t0 = busy_cpu_s(), cpu_s(pids), time.perf_counter()
            if variant == "raw-gloo":
                if rank == 0:
                    pg.send([raw], 1, 7).wait()
                else:
                    pg.recv([raw], 0, 7).wait()
            else:
                cfg = TransferConfig(bucket_bytes=int(variant.split()[0]) * _MiB)
                if rank == 0:
                    send_state_dict(pg, [1], sd, timeout=_T, step=step, config=cfg)
                else:
                    recv_state_dict(pg, 0, timeout=_T, step=step, into=into, config=cfg)
            took = time.perf_counter() - t0
            foreign = foreign_share(cpu0, own0, pids, took)
            out.append((r, variant, took, foreign))
    if rank == 1:
        for k, v in sd.items():
            assert torch.equal(into[k], v), f"{k} arrived wrong"
        return out
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.message_bench", description=__doc__.splitlines()[0]
    )
    p.add_argument("--quick", action="store_true", help="128 MiB, 5 rounds")
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 9; 5 with --quick)")
    args = p.parse_args(argv)
    nbytes = (128 * _MiB) if args.quick else (1 << 30)
    rounds = args.rounds or (5 if args.quick else 9)
    if rounds < 1:
        p.error("--rounds must be >= 1")
    _, rows = run_ranks(_pair, 2, args=(nbytes, rounds), timeout=timedelta(seconds=3600))
    assert isinstance(rows, list)
    print(
        f"message bench: {nbytes // _MiB} MiB in 8 float32 tensors received in place, "
        f"{rounds} interleaved rounds, {os.cpu_count()} CPUs, both ends on this machine"
    )
    busy = sorted({r for r, _, _, f in rows if f > _BUSY})
    times: dict[str, list[float]] = {}
    for _, variant, took, _f in rows:
        times.setdefault(variant, []).append(took)
    tensor = nbytes // 8
    messages = {"raw-gloo": 1} | {
        f"{m} MiB": len(cut_messages([tensor] * 8, m * _MiB, min(_MiB, m * _MiB)))
        for m in SIZES_MIB
    }
    raw_med, raw_min = statistics.median(times["raw-gloo"]), min(times["raw-gloo"])
    print(
        f"{'variant':10} {'min s':>7} {'median s':>9} {'x raw med':>9} {'x raw min':>9} "
        f"{'messages':>8} {'ms/message':>10}"
    )
    ratio: dict[str, float] = {}
    for variant, got in times.items():
        med = statistics.median(got)
        ratio[variant] = raw_med / med
        per = (med - raw_med) / messages[variant] * 1e3 if variant != "raw-gloo" else 0.0
        print(
            f"{variant:10} {min(got):7.3f} {med:9.3f} {ratio[variant]:9.2f} "
            f"{raw_min / min(got):9.2f} {messages[variant]:8d} {per:+10.2f}"
        )
    if busy:
        print(f"busy: other processes used over {_BUSY:.0%} of the CPUs in round(s) {busy}: rerun")
    best = max((v for v in ratio if v != "raw-gloo"), key=lambda v: ratio[v])
    print(
        f"messages: {DEFAULT_MIB} MiB (default) {ratio[f'{DEFAULT_MIB} MiB']:.2f}x raw (median), "
        f"best size {best.split()[0]} MiB"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
