"""One donor, several joiners: chained relay vs star vs one joiner after another.

Run: ``python -m bench.fanout_bench [--quick] [--joiners N]``. Every mode runs
in the same run on the same processes' groups; the table prints each mode's
time and its ratio to sending to the joiners one after another.
"""

from __future__ import annotations

import argparse
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from recoveryd.testing import run_ranks
from recoveryd.transport import TransferConfig, recv_state_dict, send_state_dict

T = timedelta(seconds=300)


def _rank(
    rank: int, ws: int, pg: dist.ProcessGroup, store: dist.Store, mib: int
) -> dict[str, float]:
    n = mib * (1 << 20) // 4 // 8
    sd = {f"w{i}": torch.full((n,), float(i)) for i in range(8)}
    joiners = list(range(1, ws))
    out: dict[str, float] = {}
    for mode in ("sequential", "star", "chain", "chain"):
        cfg = TransferConfig(fanout="star" if mode == "star" else "chain")
        pg.barrier().wait()
        start = time.perf_counter()
        if rank == 0:
            if mode == "sequential":
                for j in joiners:
                    send_state_dict(pg, [j], sd, timeout=T, config=cfg)
            else:
                send_state_dict(pg, joiners, sd, timeout=T, config=cfg)
        else:
            into = {k: torch.zeros_like(v) for k, v in sd.items()}
            recv_state_dict(pg, 0, into=into, timeout=T, config=cfg)
            assert torch.equal(into["w7"], sd["w7"])
        pg.barrier().wait()
        took = time.perf_counter() - start
        out[mode] = min(out.get(mode, took), took)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="64 MiB instead of 512 MiB")
    parser.add_argument("--joiners", type=int, default=3)
    args = parser.parse_args()
    mib = 64 if args.quick else 512
    res = run_ranks(_rank, args.joiners + 1, args=(mib,), timeout=timedelta(seconds=600))[0]
    print(f"fan-out: 1 donor -> {args.joiners} joiners, {mib} MiB in place, Gloo on loopback")
    print(f"{'mode':<12} {'time s':>8} {'x sequential':>13}")
    for mode in ("sequential", "star", "chain"):
        print(f"{mode:<12} {res[mode]:>8.3f} {res['sequential'] / res[mode]:>12.2f}x")


if __name__ == "__main__":
    main()
