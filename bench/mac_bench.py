"""What the plan key costs a transfer: the challenge and manifest MAC, and data MACs.

One pair of processes on a real Gloo group moves the same state over and
over, interleaving in every round: raw Gloo (one ``recv`` of the whole bytes
into a touched buffer: the wire's limit), recoveryd without a key, with a
plan key (the agents' default: challenge + manifest MAC), and with a key and
``data_macs`` (every message MAC'd, keyed BLAKE3). Each variant is timed on
the joiner, ``--rounds`` times; the table shows min and median and the
median's ratio to raw Gloo and to the keyless transfer of the same run. A
round where other processes used more than 15 % of the CPUs is marked.

    python -m bench.mac_bench            # A (1 GiB allocating) and E (1 GiB in place)
    python -m bench.mac_bench --quick    # 128 MiB, 3 rounds

Its last line reads ``macs: key +X %, data MACs +Y % (E)``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from bench._cpu import busy_cpu_s, cpu_s, eight_tensors, foreign_share, pair_pids
from recoveryd.testing.ranks import run_ranks
from recoveryd.transport import TransferConfig, recv_state_dict, send_state_dict

VARIANTS = ("raw-gloo", "recoveryd", "recoveryd-keyed", "recoveryd-macs")
_KEY = bytes(range(32))
_BUSY = 0.15
_T = timedelta(seconds=300)


def _pair(rank: int, ws: int, pg: Any, store: dist.Store, nbytes: int, rounds: int) -> object:
    sd, into, raw = eight_tensors(nbytes)
    out: list[tuple[int, str, str, float, float]] = []
    pids = pair_pids(store, rank)
    step = 0
    for r in range(rounds):
        for variant in VARIANTS:
            for mode in ("A", "E"):
                if variant == "raw-gloo" and mode == "E":
                    continue  # one raw anchor per round serves both
                step += 1
                store.set(f"go{step}/{rank}", "1")
                store.wait([f"go{step}/0", f"go{step}/1"], _T)
                cpu0, own0, t0 = busy_cpu_s(), cpu_s(pids), time.perf_counter()
                key = None if variant in ("raw-gloo", "recoveryd") else _KEY
                cfg = TransferConfig(data_macs=variant == "recoveryd-macs")
                if variant == "raw-gloo":
                    if rank == 0:
                        pg.send([raw], 1, 7).wait()
                    else:
                        pg.recv([raw], 0, 7).wait()
                elif rank == 0:
                    send_state_dict(pg, [1], sd, timeout=_T, step=step, auth_key=key, config=cfg)
                else:
                    got = recv_state_dict(
                        pg,
                        0,
                        timeout=_T,
                        step=step,
                        into=into if mode == "E" else None,
                        auth_key=key,
                        config=cfg,
                    )
                    del got
                took = time.perf_counter() - t0
                foreign = foreign_share(cpu0, own0, pids, took)
                out.append((r, variant, mode, took, foreign))
    return out if rank == 1 else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.mac_bench", description=__doc__.splitlines()[0]
    )
    p.add_argument("--quick", action="store_true", help="128 MiB, 3 rounds")
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 5; 3 with --quick)")
    args = p.parse_args(argv)
    nbytes = (128 << 20) if args.quick else (1 << 30)
    rounds = args.rounds or (3 if args.quick else 5)
    _, rows = run_ranks(_pair, 2, args=(nbytes, rounds), timeout=timedelta(seconds=3600))
    assert isinstance(rows, list)
    print(
        f"mac bench: {nbytes >> 20} MiB in 8 float32 tensors, {rounds} interleaved rounds, "
        f"{os.cpu_count()} CPUs, both ends on this machine"
    )
    busy = sorted({r for r, _, _, _, f in rows if f > _BUSY})
    times: dict[tuple[str, str], list[float]] = {}
    for _, variant, mode, took, _f in rows:
        times.setdefault((variant, mode), []).append(took)
    raw = statistics.median(times[("raw-gloo", "A")])
    print(f"{'wl':3} {'variant':17} {'min s':>7} {'median s':>9} {'x raw':>6} {'vs no key':>9}")
    ratios: dict[tuple[str, str], float] = {}
    for mode in ("A", "E"):
        base = statistics.median(times[("recoveryd", mode)])
        for variant in VARIANTS:
            got = times.get((variant, mode)) or (
                times[(variant, "A")] if variant == "raw-gloo" else []
            )
            med = statistics.median(got)
            ratios[(variant, mode)] = med / base
            print(
                f"{mode:3} {variant:17} {min(got):7.3f} {med:9.3f} {raw / med:6.2f} "
                f"{med / base - 1:+9.0%}"
            )
    if busy:
        print(f"busy: other processes used over {_BUSY:.0%} of the CPUs in round(s) {busy}: rerun")
    print(
        f"macs: key {ratios[('recoveryd-keyed', 'E')] - 1:+.0%}, "
        f"data MACs {ratios[('recoveryd-macs', 'E')] - 1:+.0%} (E)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
