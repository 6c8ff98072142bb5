"""One GPU: pinned and pageable host<->device copies beside the transport over a CPU Gloo wire.

Run on a machine with a CUDA GPU: ``python -m bench.gpu_bench [--quick]``.
Measured in one run, interleaved, repeated (min and median shown):

- ``h2d``/``d2h``: one ``copy_`` of the state's bytes between the GPU and
  pinned host memory, and between the GPU and pageable host memory;
- ``raw-gloo``: the same bytes as one Gloo message into a preallocated CPU
  buffer between two processes (the wire's own limit here, the anchor);
- ``cpu->gpu``: recoveryd from a CPU donor into a joiner's GPU tensors in
  place (pinned staging), ``gpu->cpu``: from a GPU donor into a CPU joiner.

Each transport's ratio is against raw Gloo of the same run, and against the
pinned copy in its direction (the bus). Two ranks share the one GPU; NCCL
between two ranks needs two GPUs and is not measured here.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from recoveryd.testing import run_ranks
from recoveryd.transport import recv_state_dict, send_state_dict

T = timedelta(seconds=300)


def _copies(nbytes: int, repeats: int) -> dict[str, list[float]]:
    gpu = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    pageable = torch.empty(nbytes, dtype=torch.uint8)
    pinned.fill_(1)
    pageable.fill_(1)
    out: dict[str, list[float]] = {
        k: [] for k in ("h2d pinned", "h2d pageable", "d2h pinned", "d2h pageable")
    }
    for _ in range(repeats):
        for name, dst, src in (
            ("h2d pinned", gpu, pinned),
            ("h2d pageable", gpu, pageable),
            ("d2h pinned", pinned, gpu),
            ("d2h pageable", pageable, gpu),
        ):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize()
            out[name].append(time.perf_counter() - t0)
    return out


def _rank(
    rank: int, ws: int, pg: dist.ProcessGroup, store: dist.Store, nbytes: int, repeats: int
) -> dict[str, list[float]]:
    torch.cuda.set_device(0)
    n = nbytes // 4 // 8
    times: dict[str, list[float]] = {"raw-gloo": [], "cpu->gpu": [], "gpu->cpu": []}
    raw = torch.empty(nbytes, dtype=torch.uint8)
    raw.fill_(rank)
    for _ in range(repeats):
        for mode in times:  # interleaved: one of each per repeat
            pg.barrier().wait()
            t0 = time.perf_counter()
            if mode == "raw-gloo":
                if rank == 0:
                    pg.send([raw], 1, 7).wait()
                else:
                    pg.recv([raw], 0, 7).wait()
            else:
                donor_dev, joiner_dev = ("cpu", "cuda") if mode == "cpu->gpu" else ("cuda", "cpu")
                dev = donor_dev if rank == 0 else joiner_dev
                sd = {f"w{i}": torch.full((n,), float(i + rank), device=dev) for i in range(8)}
                if dev == "cuda":
                    torch.cuda.synchronize()
                pg.barrier().wait()
                t0 = time.perf_counter()
                if rank == 0:
                    send_state_dict(pg, [1], sd, timeout=T)
                else:
                    recv_state_dict(pg, 0, into=sd, timeout=T)
                    if not torch.equal(sd["w3"].cpu(), torch.full((n,), 3.0)):
                        raise AssertionError(f"{mode}: wrong bytes")
            times[mode].append(time.perf_counter() - t0)
    return times


def _row(name: str, secs: list[float], nbytes: int, *anchors: tuple[str, float]) -> str:
    best, med = min(secs), statistics.median(secs)
    ratios = "  ".join(f"{best and a / best:5.2f}x {label}" for label, a in anchors)
    return f"{name:<14} {best:8.4f} {med:8.4f} {nbytes / best / 1e9:7.2f}  {ratios}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="64 MiB and 3 repeats (default 256 MiB, 5)"
    )
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_bench: needs a CUDA GPU", file=sys.stderr)
        return 2
    nbytes = (64 if args.quick else 256) << 20
    repeats = 3 if args.quick else 5
    copies = _copies(nbytes, repeats)
    ranks = run_ranks(_rank, 2, args=(nbytes, repeats), timeout=timedelta(seconds=600))
    joiner = ranks[1]
    raw = min(joiner["raw-gloo"])
    h2d, d2h = min(copies["h2d pinned"]), min(copies["d2h pinned"])
    print(f"{torch.cuda.get_device_name(0)}, {nbytes >> 20} MiB, {repeats} repeats, interleaved")
    print(f"{'':<14} {'best s':>8} {'median':>8} {'GB/s':>7}  ratios (anchor time / this time)")
    for name, secs in copies.items():
        print(_row(name, secs, nbytes))
    print(_row("raw-gloo", joiner["raw-gloo"], nbytes))
    print(_row("cpu->gpu", joiner["cpu->gpu"], nbytes, ("raw-gloo", raw), ("h2d pinned", h2d)))
    print(_row("gpu->cpu", joiner["gpu->cpu"], nbytes, ("raw-gloo", raw), ("d2h pinned", d2h)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
