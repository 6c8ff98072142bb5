"""Side-by-side benchmark of recoveryd's state_dict transport against its anchors.

Runs every selected (transport, workload) pair in two fresh spawned processes (rank 0 donor,
rank 1 joiner) over an explicit ProcessGroupGloo on loopback, and prints the best and the
first-call time, GB/s, the ratios to raw-gloo and to raw-gloo-fresh measured in the same run,
bytes on the wire, transient memory on both sides and a checksum verdict, then recoveryd's
targets.

Usage (from the repository root)::

    python -m bench.transport_bench [--quick] [--workloads A,B,...] [--transports ...]
                                    [--rounds N] [--repeats N] [--skip-expensive] [--json PATH]

Each round runs every selected pair once, in fresh processes, transports interleaved; the
table shows the best of all, the median of the rounds' bests and the median first call.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._workloads import WORKLOAD_NAMES, Workload, describe, get_workload

TRANSPORT_ORDER: tuple[str, ...] = (
    "raw-gloo",
    "raw-gloo-fresh",
    "recoveryd",
    "recoveryd-warmed",
    "recoveryd-checksums",
    "recoveryd-keyed",
    "recoveryd-macs",
    "torch-pg",
    "torchft-pg",
    "torchft-http",
)
_EXPENSIVE_WIRE_FACTOR = 4
_MEMORY_HEADROOM = 0.85


def _csv(value: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in items if v not in allowed]
    if unknown or not items:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {','.join(unknown) or '(none)'}; choose from {','.join(allowed)}"
        )
    return items


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line."""
    p = argparse.ArgumentParser(
        prog="python -m bench.transport_bench", description=__doc__.splitlines()[0]
    )
    p.add_argument(
        "--quick", action="store_true", help="1/8 of the bytes (C: 1/4 of the counts), 1 repeat"
    )
    p.add_argument(
        "--workloads",
        type=lambda v: _csv(v.upper(), WORKLOAD_NAMES, "workload"),
        default=list(WORKLOAD_NAMES),
        help="comma-separated subset of A,B,C,D,E,F (default: all)",
    )
    p.add_argument(
        "--transports",
        type=lambda v: _csv(v, TRANSPORT_ORDER, "transport"),
        default=list(TRANSPORT_ORDER),
        help=f"comma-separated subset of {','.join(TRANSPORT_ORDER)} (default: all; raw-gloo "
        "and raw-gloo-fresh are always added)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="transfers per pair and round, the first a fresh process's first (default 3; 1 with --quick)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="rounds over every pair, interleaved, each in fresh processes (default 3; 1 with --quick)",
    )
    p.add_argument(
        "--skip-expensive",
        action="store_true",
        help=f"skip pairs expected to move > {_EXPENSIVE_WIRE_FACTOR}x the logical bytes (torch-pg/torchft-pg on D)",
    )
    p.add_argument(
        "--timeout-scale", type=float, default=1.0, help="multiply every deadline (default 1.0)"
    )
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write raw results here")
    p.add_argument("--keep-logs", action="store_true", help="keep the per-pair rank logs")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.repeats < 1:
        p.error(f"--repeats={args.repeats} must be >= 1")
    if args.rounds < 1:
        p.error(f"--rounds={args.rounds} must be >= 1")
    if args.timeout_scale <= 0:
        p.error(f"--timeout-scale={args.timeout_scale} must be > 0")
    return args


def _skip_reason(
    transport: str, w: Workload, args: argparse.Namespace, broken: dict[str, str]
) -> str | None:
    import psutil  # type: ignore[import-untyped]

    from bench._transports import expected_receiver_bytes, expected_wire_bytes

    if transport in broken:
        return f"import failed: {broken[transport]}"
    wire = expected_wire_bytes(transport, w)
    if args.skip_expensive and wire > _EXPENSIVE_WIRE_FACTOR * w.logical_bytes:
        return f"--skip-expensive: would send {wire / 2**30:.1f} GiB for {w.logical_bytes / 2**30:.2f} GiB of tensors"
    need = expected_receiver_bytes(transport, w) + w.logical_bytes
    avail = int(psutil.virtual_memory().available)
    if need > _MEMORY_HEADROOM * avail:
        return f"would need ~{need / 2**30:.1f} GiB of RAM, {avail / 2**30:.1f} GiB available"
    return None


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark; returns the exit status (1 if any pair failed its checks)."""
    args = parse_args(argv)
    from bench._harness import Harness, PairOutcome
    from bench._report import (
        FIRST_CALL_LEGEND,
        LEGEND,
        Row,
        build_row,
        fill_ratios,
        merge_rounds,
        render_first_calls,
        render_noise,
        render_table,
        render_targets,
        targets,
    )
    from bench._transports import RAW_ANCHORS, import_problem

    transports = [t for t in TRANSPORT_ORDER if t in args.transports or t in RAW_ANCHORS]
    # recoveryd's defaults come from RECOVERYD_* variables: say so, since they change what the
    # plain "recoveryd" row measures (e.g. RECOVERYD_CHECKSUMS=1 would make it checksum too).
    recoveryd_env = {k: v for k, v in sorted(os.environ.items()) if k.startswith("RECOVERYD_")}
    if recoveryd_env:
        print(
            f"note: recoveryd defaults overridden by the environment: {recoveryd_env}",
            file=sys.stderr,
        )
    workloads = {
        n: get_workload(n, quick=args.quick) for n in WORKLOAD_NAMES if n in args.workloads
    }

    broken: dict[str, str] = {}
    for t in transports:
        problem = import_problem(t)
        if problem is not None:
            broken[t] = problem
            print(f"note: {t} will be skipped: {problem}", file=sys.stderr)

    workdir = Path(tempfile.mkdtemp(prefix="transport-bench-"))
    harness = Harness(
        workdir=workdir, quick=args.quick, repeats=args.repeats, timeout_scale=args.timeout_scale
    )
    plan = [(w, t) for w in workloads.values() for t in transports]
    outcomes: list[PairOutcome] = []
    by_pair: dict[tuple[str, str], list[Row]] = {}
    t_run = time.monotonic()
    n = len(plan) * args.rounds
    for rnd in range(args.rounds):
        for i, (w, t) in enumerate(plan, 1):
            label = f"[{rnd * len(plan) + i:3d}/{n}] r{rnd + 1} {w.name} {t:<19}"
            reason = _skip_reason(t, w, args, broken)
            if reason is not None:
                if rnd == 0:
                    print(f"{label} skipped ({reason})", file=sys.stderr, flush=True)
                o = PairOutcome(transport=t, workload=w.name, status="skipped", reason=reason)
            else:
                print(f"{label} ...", end="", file=sys.stderr, flush=True)
                o = harness.run_pair(t, w)
                row = build_row(o, w)
                shown = f"{row.seconds:.3f} s" if row.seconds is not None else "-"
                print(
                    f" {row.status} {shown} (pair wall {o.wall_s:.1f} s)",
                    file=sys.stderr,
                    flush=True,
                )
                if o.status != "ok":
                    print(f"    {o.reason}\n    log: {o.log_path}", file=sys.stderr)
                    if o.log_tail:
                        print("    " + o.log_tail.strip().replace("\n", "\n    "), file=sys.stderr)
            outcomes.append(o)
            by_pair.setdefault((w.name, t), []).append(build_row(o, w))
    total_s = time.monotonic() - t_run

    rows = [merge_rounds(rs) for rs in by_pair.values()]
    fill_ratios(rows)
    ts = targets(rows, workloads)

    mode = "quick" if args.quick else "full"
    print()
    print(
        f"transport bench ({mode}, {args.rounds} round(s) x {args.repeats} repeat(s); "
        f"{platform.node()}, {os.cpu_count()} CPUs; total {total_s:.1f} s)"
    )
    if recoveryd_env:
        print(f"  recoveryd environment: {recoveryd_env}")
    for w in workloads.values():
        print(f"  {describe(w)}")
    print()
    print(render_table(rows))
    noise = render_noise(rows)
    if noise:
        print(noise)
    print()
    print(LEGEND)
    print()
    print("first calls")
    print(render_first_calls(rows))
    print()
    print(FIRST_CALL_LEGEND)
    print()
    print(render_targets(ts, args.quick))

    failed = [r for r in rows if r.status in ("FAIL", "error")]
    if args.json is not None:
        payload: dict[str, Any] = {
            "meta": {
                "mode": mode,
                "repeats": args.repeats,
                "rounds": args.rounds,
                "host": platform.node(),
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "started_unix": time.time() - total_s,
                "total_s": total_s,
                "skipped_transports": broken,
                "recoveryd_env": recoveryd_env,
            },
            "workloads": {
                n: {**dataclasses.asdict(w), "logical_bytes": w.logical_bytes}
                for n, w in workloads.items()
            },
            "rows": [dataclasses.asdict(r) for r in rows],
            "targets": [dataclasses.asdict(t) for t in ts],
            "pairs": [dataclasses.asdict(o) for o in outcomes],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1, default=str))
        print(f"\nraw results: {args.json}")

    if failed or args.keep_logs:
        print(f"\nrank logs: {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
