"""Load benchmark of the recoveryd coordinator over real gRPC on loopback.

For each size, N simulated ranks (replicas of ``--ranks-per-replica`` ranks, one layout
fingerprint, one step) register with a coordinator running as its own process
(``python -m recoveryd coordinator``), then each heartbeats once per ``--interval``, the beats
spread evenly over the interval, sent from ``--workers`` generator processes. The load is open
loop: a beat is sent when it is due, whatever became of the earlier ones, and the generator
stops sending at the end of the window, so what it achieved is measured, not assumed. Two rows,
each against a fresh coordinator: one beat per Heartbeat RPC (what an agent sends) and one RPC
per replica carrying all its ranks' beats. While the load runs, this process registers fresh
joiner replicas and times ``recover(wait=0)``, the call in which the coordinator chooses a donor
and makes the plan, and times ``status()``.

Anchors measured in the same run: Heartbeat RPCs one at a time through ``CoordinatorClient`` on
the same coordinator just before the load starts, and the donor decision in-process
(``Planner.recover`` on a ``Membership`` of the same size; no gRPC, no load).

Latencies are client-side: serialization, the loopback round trip, queueing and work in the
coordinator, and the generator's own scheduling on a machine it shares with the coordinator.
No Watch streams are open (a real agent holds one per rank).

Usage (from the repository root)::

    python -m bench.coordinator_bench [--quick] [--ranks 2000,10000] [--ranks-per-replica 8]
                                      [--interval 2] [--duration 10] [--workers 4]
                                      [--donor-probes 50] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zlib
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import psutil  # type: ignore[import-untyped]

Mode = Literal["per-rank", "batched"]
MODES: tuple[Mode, ...] = ("per-rank", "batched")

TARGET_HEARTBEAT_P99_MS = 50.0
TARGET_HEARTBEAT_RANKS = 2000
TARGET_DONOR_MS = 10.0

_FINGERPRINT = "bench-layout-0"
_STEP = 1000
_RPC_TIMEOUT_S = 5.0  # CoordinatorClient's default deadline
# The options CoordinatorClient opens its channel with, so the generator's channels behave alike.
_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]
_COORDINATOR_START_S = 60.0
_COORDINATOR_STOP_S = 15.0  # the coordinator's own grace on SIGTERM is 5 s
_WORKER_START_S = 120.0  # spawn + import grpc on a busy 2-core machine
_REGISTER_FLOOR_PER_S = 100.0  # budget only: ends a hung registration, does not judge a slow one
_DRAIN_S = _RPC_TIMEOUT_S + 10.0
_LATE_ISSUE_S = 0.010
_IDLE_ANCHOR_CALLS = 200
_LOG_TAIL_CHARS = 2000


class _BenchError(RuntimeError):
    """A phase could not run (a process died, a deadline passed)."""


def _csv_ints(value: str) -> list[int]:
    try:
        items = [int(v.replace("_", "")) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a comma-separated list of integers"
        ) from None
    if not items or min(items) < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: need at least one size, each >= 1")
    return items


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line."""
    p = argparse.ArgumentParser(
        prog="python -m bench.coordinator_bench", description=__doc__.splitlines()[0]
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke test: 200 ranks, 3 s, 10 donor probes"
    )
    p.add_argument(
        "--ranks", type=_csv_ints, default=None, help="comma-separated sizes (default 2000,10000)"
    )
    p.add_argument("--ranks-per-replica", type=int, default=8, help="ranks per replica (default 8)")
    p.add_argument(
        "--interval",
        type=float,
        default=2.0,
        help="seconds between a rank's beats (default 2, the coordinator's default)",
    )
    p.add_argument(
        "--duration", type=float, default=None, help="measured seconds per row (default 10)"
    )
    p.add_argument(
        "--warmup", type=float, default=None, help="unmeasured seconds first (default: --interval)"
    )
    p.add_argument("--workers", type=int, default=4, help="generator processes (default 4)")
    p.add_argument(
        "--register-threads", type=int, default=8, help="registering threads per generator"
    )
    p.add_argument(
        "--donor-probes", type=int, default=None, help="joiners per row (default 50; quick 10)"
    )
    p.add_argument(
        "--status-probes", type=int, default=None, help="status() calls per row (default 5)"
    )
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write results here")
    p.add_argument("--keep-logs", action="store_true", help="keep the coordinators' logs")
    args = p.parse_args(argv)
    if args.ranks is None:
        args.ranks = [200] if args.quick else [2000, 10000]
    if args.duration is None:
        args.duration = 3.0 if args.quick else 10.0
    if args.warmup is None:
        args.warmup = args.interval
    if args.donor_probes is None:
        args.donor_probes = 10 if args.quick else 50
    if args.status_probes is None:
        args.status_probes = 2 if args.quick else 5
    for name in ("ranks_per_replica", "workers", "register_threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    for name in ("interval", "duration"):
        if getattr(args, name) <= 0:
            p.error(f"--{name}={getattr(args, name)} must be > 0")
    if args.warmup < 0 or args.donor_probes < 0 or args.status_probes < 0:
        p.error("--warmup, --donor-probes and --status-probes must be >= 0")
    bad = [n for n in args.ranks if n % args.ranks_per_replica]
    if bad:
        p.error(f"--ranks {bad} must be multiples of --ranks-per-replica={args.ranks_per_replica}")
    return args


# ---- the simulated job -----------------------------------------------------------------------


def _replica_id(j: int) -> str:
    return f"r{j:05d}"


def _member(replica_id: str, group_rank: int, ranks_per_replica: int) -> Any:
    from recoveryd.protocol import MemberInfo

    return MemberInfo(
        replica_id=replica_id,
        group_rank=group_rank,
        group_world_size=ranks_per_replica,
        layout_fingerprint=_FINGERPRINT,
        rendezvous=f"{replica_id}.bench:{29500 + group_rank}",
        labels={"zone": f"zone-{zlib.crc32(replica_id.encode()) % 4}"},
        agent_id=f"bench-{replica_id}-{group_rank}",
    )


def _pct(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending sequence (``None`` when empty)."""
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


def _summary_ms(values_s: Sequence[float]) -> dict[str, Any]:
    s = sorted(values_s)
    ms = [v * 1e3 if v is not None else None for v in (_pct(s, 0.5), _pct(s, 0.99))]
    return {"n": len(s), "p50_ms": ms[0], "p99_ms": ms[1], "max_ms": s[-1] * 1e3 if s else None}


# ---- generator processes ---------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class _WorkerJob:
    address: str
    mode: Mode
    ranks: int
    ranks_per_replica: int
    index: int
    workers: int
    interval_s: float
    register_threads: int


def _units(job: _WorkerJob) -> list[tuple[float, list[tuple[int, int]]]]:
    """This worker's RPCs per interval: (offset in the interval, [(replica, group rank)])."""
    rpr = job.ranks_per_replica
    if job.mode == "per-rank":
        n = job.ranks
        return [
            (i / n * job.interval_s, [(i // rpr, i % rpr)])
            for i in range(job.index, n, job.workers)
        ]
    r = job.ranks // rpr
    return [
        (j / r * job.interval_s, [(j, g) for g in range(rpr)])
        for j in range(job.index, r, job.workers)
    ]


def _expect(conn: multiprocessing.connection.Connection, kind: str) -> tuple[Any, ...]:
    # The parent sends everything within minutes; an hour means it is gone without closing.
    if not conn.poll(3600):
        raise TimeoutError(f"no {kind!r} from the parent")
    msg = conn.recv()
    if msg[0] != kind:
        raise RuntimeError(f"expected {kind!r} from the parent, got {msg[0]!r}")
    return tuple(msg)


def _worker_main(job: _WorkerJob, conn: multiprocessing.connection.Connection) -> None:
    """Entry point of one generator process: register its ranks, then heartbeat on schedule."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and kills us
    try:
        conn.send(("result", _worker_run(job, conn)))
    except BaseException:
        try:
            conn.send(("error", traceback.format_exc()))
        finally:
            raise SystemExit(1) from None


def _worker_run(job: _WorkerJob, conn: multiprocessing.connection.Connection) -> dict[str, Any]:
    from recoveryd.agent.client import CoordinatorClient
    from recoveryd.v1 import coordinator_pb2 as pb

    units = _units(job)
    conn.send(("up",))

    _expect(conn, "register")
    client = CoordinatorClient(job.address, timeout=timedelta(seconds=_RPC_TIMEOUT_S))
    members = [(j, g) for _, beats in units for j, g in beats]
    t0 = time.monotonic()
    with ThreadPoolExecutor(job.register_threads) as pool:
        futures = [
            pool.submit(
                client.register,
                _member(_replica_id(j), g, job.ranks_per_replica),
                step=_STEP,
            )
            for j, g in members
        ]
        # Each call carries the client's 5 s deadline, so these waits end.
        register_errors = Counter(
            type(e).__name__ for e in (f.exception() for f in futures) if e is not None
        )
    conn.send(("registered", len(members), dict(register_errors), time.monotonic() - t0))
    client.close()

    # The same request CoordinatorClient.heartbeat builds.
    requests = []
    for _, beats in units:
        req = pb.HeartbeatRequest()
        for j, g in beats:
            req.beats.add(replica_id=_replica_id(j), group_rank=g, healthy=True, step=_STEP)
        requests.append(req)
    _, start_at, measure_from, end_at = _expect(conn, "start")
    records, issues, issued, details = asyncio.run(
        _send_beats(job.address, requests, [o for o, _ in units], job.interval_s, start_at, end_at)
    )

    beats_per_rpc = len(units[0][1]) if units else 0
    window = [r for r in records if measure_from <= r[0] < end_at]
    ok = [r for r in window if r[2] == "OK"]
    in_window = [(d, t) for d, t in issues if measure_from <= t < end_at]
    return {
        "rpcs_issued": len(in_window),
        "rpcs_unfinished": issued - len(records),
        "rpcs_ok": len(ok),
        "beats_ok": sum(beats_per_rpc - r[3] for r in ok),
        "beats_unknown": sum(r[3] for r in ok),
        "errors": dict(Counter(r[2] for r in window if r[2] != "OK")),
        "error_details": details,
        "latencies_s": [r[1] - r[0] for r in ok],
        "lags_s": [t - d for d, t in in_window],
    }


async def _send_beats(
    address: str,
    requests: Sequence[Any],
    offsets: Sequence[float],
    interval_s: float,
    start_at: float,
    end_at: float,
) -> tuple[list[tuple[float, float, str, int]], list[tuple[float, float]], int, list[str]]:
    """Sends each request at its offset in every interval until ``end_at``; waits for answers.

    Returns (issued, done, code name, unknown beats) per finished call, (due, issued) per call,
    how many calls were sent, and the first errors' details. grpc.aio: one thread, thousands
    of calls in flight, and about a fifth less client CPU per call than grpc futures here.
    """
    import grpc

    from recoveryd.v1 import coordinator_pb2_grpc as pb_grpc

    done: list[tuple[float, float, str, int]] = []
    issues: list[tuple[float, float]] = []
    details: list[str] = []
    async with grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        stub = pb_grpc.CoordinatorStub(channel)

        async def one(request: Any, t_issue: float) -> None:
            try:
                r = await stub.Heartbeat(request, timeout=_RPC_TIMEOUT_S)
                done.append((t_issue, time.monotonic(), "OK", len(r.unknown)))
            except grpc.aio.AioRpcError as err:
                t = time.monotonic()
                done.append((t_issue, t, err.code().name, 0))
                if len(details) < 3:
                    details.append(
                        f"{err.code().name} {err.details()!r} (sent at +{t_issue - start_at:.2f} s, "
                        f"after {t - t_issue:.3f} s)"
                    )

        tasks: set[asyncio.Task[None]] = set()
        n, k = len(requests), 0
        while n:
            period, i = divmod(k, n)
            due = start_at + period * interval_s + offsets[i]
            now = time.monotonic()
            if due >= end_at or now >= end_at:
                break
            # sleep(0) when behind: the calls already made only start once the loop runs.
            await asyncio.sleep(max(0.0, due - now))
            t_issue = time.monotonic()
            task = asyncio.create_task(one(requests[i], t_issue))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            issues.append((due, t_issue))
            k += 1
        if tasks:  # every call has a deadline; this bound is for a wedged channel
            await asyncio.wait(tasks, timeout=_DRAIN_S)
        for task in tasks:
            task.cancel()
    return done, issues, k, details


@dataclass(slots=True)
class _Worker:
    proc: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection


def _gather(workers: Sequence[_Worker], kind: str, timeout_s: float) -> list[tuple[Any, ...]]:
    """One ``kind`` message from every worker, or :class:`_BenchError` (bounded by ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    out: list[tuple[Any, ...] | None] = [None] * len(workers)
    pending = set(range(len(workers)))
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _BenchError(
                f"generator(s) {sorted(pending)} sent no {kind!r} within {timeout_s:.0f} s"
            )
        waitables: list[Any] = [workers[i].conn for i in pending]
        waitables += [workers[i].proc.sentinel for i in pending]
        multiprocessing.connection.wait(waitables, timeout=min(left, 1.0))
        for i in sorted(pending):
            w = workers[i]
            if w.conn.poll():
                try:
                    msg = w.conn.recv()
                except EOFError:
                    raise _BenchError(
                        f"generator {i} exited ({w.proc.exitcode}) before sending {kind!r}"
                    ) from None
                if msg[0] == "error":
                    raise _BenchError(f"generator {i} failed:\n{msg[1]}")
                if msg[0] != kind:
                    raise _BenchError(f"generator {i} sent {msg[0]!r}, expected {kind!r}")
                out[i] = tuple(msg)
                pending.discard(i)
            elif not w.proc.is_alive():
                raise _BenchError(f"generator {i} exited ({w.proc.exitcode}) before {kind!r}")
    return [m for m in out if m is not None]


# ---- the coordinator process -----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-_LOG_TAIL_CHARS:]
    except OSError:
        return ""


class _CoordinatorProcess:
    """``python -m recoveryd coordinator`` on a free loopback port, stopped on exit."""

    def __init__(self, log_path: Path, *, interval_s: float) -> None:
        self.log_path = log_path
        self._interval_s = interval_s
        self.address = ""
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> _CoordinatorProcess:
        try:
            for _ in range(3):  # a free port may be taken before the coordinator binds it
                if self._start():
                    return self
            raise _BenchError(f"coordinator did not start; log:\n{_tail(self.log_path)}")
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start(self) -> bool:
        from recoveryd.agent.client import CoordinatorClient
        from recoveryd.errors import CoordinatorUnavailableError

        self.address = f"127.0.0.1:{_free_port()}"
        cmd = [
            sys.executable,
            "-m",
            "recoveryd",
            "coordinator",
            "--bind",
            self.address,
            "--metrics-port",
            "0",
            "--heartbeat-interval",
            f"{self._interval_s:g}",
            "--heartbeat-timeout",
            f"{max(10.0, 2 * self._interval_s):g}",
        ]
        with self.log_path.open("ab") as log:
            # Own session: a Ctrl-C reaches this process only, which stops the coordinator.
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        client = CoordinatorClient(self.address, timeout=timedelta(seconds=1))
        deadline = time.monotonic() + _COORDINATOR_START_S
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    return False
                try:
                    client.status(recent=0)
                    return True
                except CoordinatorUnavailableError:
                    time.sleep(0.1)
        finally:
            client.close()
        raise _BenchError(
            f"coordinator {self.address} not answering after {_COORDINATOR_START_S} s"
        )

    def stop(self) -> None:
        """SIGTERM (graceful), then SIGKILL if it is still there after the grace."""
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            p.wait(_COORDINATOR_STOP_S)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(_COORDINATOR_STOP_S)


# ---- CPU accounting --------------------------------------------------------------------------


def _cpu_snapshot(pids: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds per group of processes, the machine's busy and steal seconds, and the time."""
    out: dict[str, float] = {"t": time.monotonic()}
    for name, group in pids.items():
        total = 0.0
        for pid in group:
            try:
                c = psutil.Process(pid).cpu_times()
                total += c.user + c.system
            except psutil.Error:
                pass
        out[name] = total
    t = psutil.cpu_times()
    out["machine_busy"] = float(
        t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
    )
    out["machine_steal"] = float(getattr(t, "steal", 0.0))
    return out


def _cpu_usage(a: dict[str, float], b: dict[str, float], groups: Sequence[str]) -> dict[str, float]:
    """Cores used between two snapshots: per group, the machine's, and what no group accounts for."""
    wall = b["t"] - a["t"]
    ncpu = os.cpu_count() or 1
    out = {f"{g}_cores": (b[g] - a[g]) / wall for g in groups}
    out["machine_busy_cores"] = (b["machine_busy"] - a["machine_busy"]) / wall
    out["steal_cores"] = (b["machine_steal"] - a["machine_steal"]) / wall
    out["other_cores"] = max(
        0.0, out["machine_busy_cores"] - sum(out[f"{g}_cores"] for g in groups)
    )
    out["cpus"] = ncpu
    return out


# ---- probes from this process ----------------------------------------------------------------


def _idle_anchor(client: Any) -> dict[str, Any]:
    """Heartbeat RPCs one at a time through CoordinatorClient, before the load starts."""
    from recoveryd.protocol import Beat

    beat = [Beat(replica_id=_replica_id(0), group_rank=0, step=_STEP)]
    lat = []
    unknown = 0
    for _ in range(_IDLE_ANCHOR_CALLS):
        t0 = time.monotonic()
        _, miss = client.heartbeat(beat)
        lat.append(time.monotonic() - t0)
        unknown += len(miss)
    if unknown:
        raise _BenchError(
            f"the coordinator does not know {_replica_id(0)} rank 0 after registering"
        )
    return _summary_ms(lat[10:])  # the first calls open the channel


def _probe_under_load(
    client: Any,
    *,
    tag: str,
    rpr: int,
    donor_probes: int,
    status_probes: int,
    measure_from: float,
    end_at: float,
) -> dict[str, Any]:
    """Times fresh joiners' recover(wait=0) and status(), spread over the measured window."""
    from recoveryd.errors import RecoverydError

    span = end_at - measure_from
    events: list[tuple[float, str, int]] = [
        (measure_from + (i + 0.5) * span / donor_probes, "donor", i) for i in range(donor_probes)
    ]
    events += [
        (measure_from + (i + 0.25) * span / status_probes, "status", i)
        for i in range(status_probes)
    ]
    events.sort()
    donor_s: list[float] = []
    states: Counter[str] = Counter()
    reasons: list[str] = []
    status_s: list[float] = []
    status_replicas: list[int] = []
    skipped = 0
    errors: Counter[str] = Counter()
    with ThreadPoolExecutor(rpr) as pool:
        for at, kind, i in events:
            now = time.monotonic()
            if now >= end_at:
                skipped += 1
                continue
            if at > now:
                time.sleep(at - now)
            try:
                if kind == "status":
                    t0 = time.monotonic()
                    st = client.status(recent=20)
                    status_s.append(time.monotonic() - t0)
                    status_replicas.append(len(st.replicas))
                    continue
                joiner = f"{tag}-joiner-{i:03d}"
                regs = [
                    pool.submit(client.register, _member(joiner, g, rpr), step=None)
                    for g in range(rpr)
                ]
                for f in regs:
                    f.result()  # each call carries the client's deadline
                t0 = time.monotonic()
                answer = client.recover(joiner, 0, wait=timedelta(0))
                donor_s.append(time.monotonic() - t0)
                states[answer.state] += 1
                if answer.state != "transfer" and len(reasons) < 3:
                    reasons.append(f"{answer.state}: {answer.reason}")
            except RecoverydError as err:  # an overloaded coordinator misses deadlines
                errors[kind] += 1
                if len(reasons) < 3:
                    reasons.append(f"{kind} probe failed: {err}")
    return {
        "donor": {
            **_summary_ms(donor_s),
            "states": dict(states),
            "errors": errors["donor"],
            "reasons": reasons,
        },
        "status": {
            **_summary_ms(status_s),
            "replicas": status_replicas,
            "errors": errors["status"],
        },
        "probes_skipped_after_window": skipped,
    }


def _inprocess_donor(ranks: int, rpr: int, probes: int, interval_s: float) -> dict[str, Any]:
    """The donor decision alone: Planner.recover on a Membership of the same size, no gRPC."""
    from recoveryd.coordinator.config import CoordinatorConfig
    from recoveryd.coordinator.membership import Membership
    from recoveryd.coordinator.planner import Planner

    config = CoordinatorConfig(
        heartbeat_interval=timedelta(seconds=interval_s),
        heartbeat_timeout=timedelta(seconds=max(10.0, 2 * interval_s)),
    )
    members = Membership(heartbeat_timeout=config.heartbeat_timeout)
    planner = Planner(members, config, send=lambda *_: None)

    def add(replica_id: str, step: int | None) -> None:
        for g in range(rpr):
            info = _member(replica_id, g, rpr)
            planner.on_register(info, restarted=members.register(info, step=step))

    for j in range(ranks // rpr):
        add(_replica_id(j), _STEP)
    lat = []
    states: Counter[str] = Counter()
    for i in range(max(probes, 1)):
        joiner = f"inproc-joiner-{i:03d}"
        add(joiner, None)
        t0 = time.perf_counter()
        answer = planner.recover(joiner, 0)
        lat.append(time.perf_counter() - t0)
        states[answer.state] += 1
    return {**_summary_ms(lat), "states": dict(states)}


# ---- one row ---------------------------------------------------------------------------------


def _run_row(args: argparse.Namespace, ranks: int, mode: Mode, logdir: Path) -> dict[str, Any]:
    """One coordinator, one size, one mode: register, anchor, load with probes; the numbers."""
    from recoveryd.agent.client import CoordinatorClient

    rpr = args.ranks_per_replica
    log_path = logdir / f"coordinator-{ranks}-{mode}.log"
    ctx = multiprocessing.get_context("spawn")
    workers: list[_Worker] = []
    with _CoordinatorProcess(log_path, interval_s=args.interval) as coord:
        assert coord.proc is not None
        client = CoordinatorClient(coord.address, timeout=timedelta(seconds=_RPC_TIMEOUT_S))
        try:
            for index in range(args.workers):
                job = _WorkerJob(
                    address=coord.address,
                    mode=mode,
                    ranks=ranks,
                    ranks_per_replica=rpr,
                    index=index,
                    workers=args.workers,
                    interval_s=args.interval,
                    register_threads=args.register_threads,
                )
                parent_conn, child_conn = ctx.Pipe()
                proc = ctx.Process(
                    target=_worker_main, args=(job, child_conn), name=f"hb-{index}", daemon=True
                )
                proc.start()
                child_conn.close()
                workers.append(_Worker(proc=proc, conn=parent_conn))
            _gather(workers, "up", _WORKER_START_S)

            t0 = time.monotonic()
            for w in workers:
                w.conn.send(("register",))
            regs = _gather(workers, "registered", 30 + ranks / _REGISTER_FLOOR_PER_S)
            register_s = time.monotonic() - t0
            register_errors: Counter[str] = Counter()
            for _, _, errs, _ in regs:
                register_errors.update(errs)

            idle = _idle_anchor(client)
            pids = {
                "coordinator": [coord.proc.pid],
                "generator": [w.proc.pid for w in workers if w.proc.pid is not None],
                "bench": [os.getpid()],
            }
            # What the coordinator burns with every rank registered and nobody calling (its
            # ticker, grpc's pollers): subtracted before charging CPU to each call.
            before = _cpu_snapshot(pids)
            time.sleep(1.0)
            idle_cores = _cpu_usage(before, _cpu_snapshot(pids), ("coordinator",))

            start_at = time.monotonic() + 0.5
            measure_from = start_at + args.warmup
            end_at = measure_from + args.duration
            for w in workers:
                w.conn.send(("start", start_at, measure_from, end_at))

            snaps: list[dict[str, float]] = []

            def sample() -> None:
                for at in (measure_from, end_at):
                    time.sleep(max(0.0, at - time.monotonic()))
                    snaps.append(_cpu_snapshot(pids))

            sampler = threading.Thread(target=sample, name="cpu-sampler", daemon=True)
            sampler.start()
            probes = _probe_under_load(
                client,
                tag=f"{mode}",
                rpr=rpr,
                donor_probes=args.donor_probes,
                status_probes=args.status_probes,
                measure_from=measure_from,
                end_at=end_at,
            )
            sampler.join(max(0.0, end_at - time.monotonic()) + 10)
            results = [m[1] for m in _gather(workers, "result", _DRAIN_S + 30)]
        finally:
            client.close()
            for w in workers:
                if w.proc.is_alive():
                    w.proc.kill()
            for w in workers:
                w.proc.join(10)
                w.conn.close()
        coordinator_alive = coord.proc.poll() is None

    if len(snaps) != 2:
        raise _BenchError("the CPU sampler did not take both snapshots")
    cpu = _cpu_usage(snaps[0], snaps[1], ("coordinator", "generator", "bench"))
    latencies = sorted(x for r in results for x in r["latencies_s"])
    lags = sorted(x for r in results for x in r["lags_s"])
    errors: Counter[str] = Counter()
    for r in results:
        errors.update(r["errors"])
    error_details = sorted({d for r in results for d in r["error_details"]})[:5]
    beats_per_rpc = 1 if mode == "per-rank" else rpr
    rpcs_ok = sum(r["rpcs_ok"] for r in results)
    rpcs_per_s = rpcs_ok / args.duration
    cpu["coordinator_idle_cores"] = idle_cores["coordinator_cores"]
    if rpcs_per_s > 0:
        # CPU per answered call (the probes' few calls ride along): 1e6 / this is the rate one
        # core would allow if nothing else ran.
        cpu["coordinator_us_per_rpc"] = (
            1e6 * (cpu["coordinator_cores"] - cpu["coordinator_idle_cores"]) / rpcs_per_s
        )
        cpu["generator_us_per_rpc"] = 1e6 * cpu["generator_cores"] / rpcs_per_s
    return {
        "ranks": ranks,
        "replicas": ranks // rpr,
        "mode": mode,
        "beats_per_rpc": beats_per_rpc,
        "coordinator_log": str(log_path),
        "coordinator_alive_at_end": coordinator_alive,
        "register": {
            "ranks": sum(m[1] for m in regs),
            "seconds": register_s,
            "ranks_per_s": ranks / register_s,
            "errors": dict(register_errors),
        },
        "idle_anchor": idle,
        "offered_beats_per_s": ranks / args.interval,
        "offered_rpcs_per_s": ranks / beats_per_rpc / args.interval,
        "rpcs_issued": sum(r["rpcs_issued"] for r in results),
        "rpcs_ok": rpcs_ok,
        "rpcs_unfinished": sum(r["rpcs_unfinished"] for r in results),
        "achieved_beats_per_s": sum(r["beats_ok"] for r in results) / args.duration,
        "achieved_rpcs_per_s": rpcs_per_s,
        "beats_unknown": sum(r["beats_unknown"] for r in results),
        "errors": dict(errors),
        "error_details": error_details,
        "error_count": sum(errors.values())
        + sum(r["beats_unknown"] for r in results)
        + sum(r["rpcs_unfinished"] for r in results),
        "latency": _summary_ms(latencies),
        "issue_lag": {
            **_summary_ms(lags),
            "late_share": sum(1 for x in lags if x > _LATE_ISSUE_S) / len(lags) if lags else None,
        },
        **probes,
        "cpu": cpu,
    }


# ---- report ----------------------------------------------------------------------------------


def _f(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    """Columns padded to their widest cell; the first left-aligned, the rest right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        indent
        + "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]


def _load_name(r: dict[str, Any]) -> str:
    return "1 beat/RPC" if r["mode"] == "per-rank" else f"{r['beats_per_rpc']} beats/RPC"


def _render_size(ranks: int, rows: list[dict[str, Any]], anchor: dict[str, Any], args: Any) -> str:
    rpr = args.ranks_per_replica
    out = [
        f"{ranks:,} ranks = {ranks // rpr:,} replicas x {rpr}; each rank beats every "
        f"{args.interval:g} s; {args.duration:g} s measured after {args.warmup:g} s warm-up; "
        f"{args.workers} generator processes"
    ]
    hb = [
        ["heartbeats", "offered", "achieved", "achieved", "p50", "p99", "max", "errors", "coord",
         "coord", "gen", "gen", "other", "steal", "late"],
        ["", "beats/s", "beats/s", "RPC/s", "ms", "ms", "ms", "", "cores", "us/RPC", "cores",
         "us/RPC", "cores", "cores", ">10ms"],
    ]  # fmt: skip
    for r in rows:
        lat, cpu, late = r["latency"], r["cpu"], r["issue_lag"]["late_share"]
        hb.append(
            [
                _load_name(r),
                f"{r['offered_beats_per_s']:,.0f}",
                f"{r['achieved_beats_per_s']:,.0f}",
                f"{r['achieved_rpcs_per_s']:,.0f}",
                _f(lat["p50_ms"]),
                _f(lat["p99_ms"]),
                _f(lat["max_ms"]),
                str(r["error_count"]),
                f"{cpu['coordinator_cores']:.2f}",
                _f(cpu.get("coordinator_us_per_rpc"), ".0f"),
                f"{cpu['generator_cores']:.2f}",
                _f(cpu.get("generator_us_per_rpc"), ".0f"),
                f"{cpu['other_cores']:.2f}",
                f"{cpu['steal_cores']:.2f}",
                "-" if late is None else f"{100 * late:.0f}%",
            ]
        )
    for r in rows:
        a = r["idle_anchor"]
        hb.append(
            [f"anchor: idle, 1 at a time ({_load_name(r)} row)", "", "", "", _f(a["p50_ms"]),
             _f(a["p99_ms"]), _f(a["max_ms"]), "", "", "", "", "", "", "", ""]
        )  # fmt: skip
    out += _table(hb)
    out += [
        f"    errors ({_load_name(r)}): {r['errors']}; e.g. {'; '.join(r['error_details'])}"
        for r in rows
        if r["errors"]
    ]
    out.append(
        "  registration before the load: "
        + "; ".join(
            f"{r['register']['ranks_per_s']:,.0f} ranks/s ({r['register']['seconds']:.1f} s"
            f"{', errors ' + str(r['register']['errors']) if r['register']['errors'] else ''})"
            for r in rows
        )
    )
    out.append("")
    probes = [
        ["probes from the bench process", "n", "transfer", "errors", "p50 ms", "p99 ms", "max ms"]
    ]
    for r in rows:
        d = r["donor"]
        probes.append(
            [f"donor decision: Recover RPC under {_load_name(r)} load", str(d["n"]),
             str(d["states"].get("transfer", 0)), str(d["errors"]), _f(d["p50_ms"]),
             _f(d["p99_ms"]), _f(d["max_ms"])]
        )  # fmt: skip
    probes.append(
        ["anchor: Planner.recover in-process, no gRPC, idle", str(anchor["n"]),
         str(anchor["states"].get("transfer", 0)), "", _f(anchor["p50_ms"], ".3f"),
         _f(anchor["p99_ms"], ".3f"), _f(anchor["max_ms"], ".3f")]
    )  # fmt: skip
    for r in rows:
        st = r["status"]
        probes.append(
            [f"status() under {_load_name(r)} load", str(st["n"]), "", str(st["errors"]),
             _f(st["p50_ms"]), "", _f(st["max_ms"])]
        )  # fmt: skip
    out += _table(probes)
    out += [
        f"    {_load_name(r)}: not transfer: {reason}"
        for r in rows
        for reason in r["donor"]["reasons"]
    ]
    return "\n".join(out)


def _targets(sizes: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for ranks, s in sorted(sizes.items()):
        rows = {r["mode"]: r for r in s["rows"]}
        r = rows.get("per-rank")
        if r is not None and ranks == TARGET_HEARTBEAT_RANKS:
            p99 = r["latency"]["p99_ms"]
            full = r["achieved_beats_per_s"] >= 0.95 * r["offered_beats_per_s"]
            out.append(
                {
                    "target": f"p99 heartbeat RPC < {TARGET_HEARTBEAT_P99_MS:g} ms at "
                    f"{TARGET_HEARTBEAT_RANKS:,} ranks",
                    "ranks": ranks,
                    "measured_ms": p99,
                    "met": p99 is not None and p99 < TARGET_HEARTBEAT_P99_MS and not r["errors"],
                    "note": f"1 beat per RPC, {r['achieved_beats_per_s']:,.0f} of "
                    f"{r['offered_beats_per_s']:,.0f} offered beats/s achieved"
                    + ("" if full else " (the generator fell short: the verdict is at that rate)")
                    + (f", errors {r['errors']}" if r["errors"] else ""),
                }
            )
        for mode, row in rows.items():
            p99 = row["donor"]["p99_ms"]
            ok = (
                row["donor"]["states"].get("transfer", 0) == row["donor"]["n"]
                and not row["donor"]["errors"]
            )
            out.append(
                {
                    "target": f"donor decision < {TARGET_DONOR_MS:g} ms",
                    "ranks": ranks,
                    "measured_ms": p99,
                    "met": p99 is not None and p99 < TARGET_DONOR_MS and ok,
                    "note": f"p99 of {row['donor']['n']} Recover RPCs under "
                    f"{'1-beat-per-RPC' if mode == 'per-rank' else 'batched'} load, "
                    f"client-side; in-process planner p99 {_f(s['inprocess_donor']['p99_ms'], '.3f')} ms"
                    + (
                        ""
                        if ok
                        else f"; answers {row['donor']['states']}, "
                        f"{row['donor']['errors']} failed calls"
                    ),
                }
            )
    return out


def _render_targets(targets: list[dict[str, Any]], quick: bool) -> str:
    out = [
        "targets"
        + (" (quick run: sizes below the targets' are for smoke testing)" if quick else "")
    ]
    if not any(t["target"].startswith("p99 heartbeat") for t in targets):
        out.append(
            f"  p99 heartbeat RPC < {TARGET_HEARTBEAT_P99_MS:g} ms at {TARGET_HEARTBEAT_RANKS:,} "
            f"ranks: not measured (no {TARGET_HEARTBEAT_RANKS:,}-rank size in this run)"
        )
    for t in targets:
        verdict = "MET" if t["met"] else "NOT MET"
        label = t["target"] if "ranks" in t["target"] else f"{t['target']} ({t['ranks']:,} ranks)"
        out.append(f"  {label}: {verdict}: {_f(t['measured_ms'])} ms ({t['note']})")
    return "\n".join(out)


def _code_version() -> str:
    """The commit, and whether recoveryd/ differs from it (the coordinator under test)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "recoveryd"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head or 'unknown'}{' + uncommitted changes in recoveryd/' if dirty else ''}"


# ---- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark; returns the exit status (1 if a row could not run)."""
    args = parse_args(argv)
    import grpc

    version = _code_version()  # before: the code may change while the bench runs
    logdir = Path(tempfile.mkdtemp(prefix="coordinator-bench-"))
    sizes: dict[int, dict[str, Any]] = {}
    failed: list[str] = []
    t_run = time.monotonic()
    try:
        for ranks in args.ranks:
            print(f"[{ranks:,} ranks] in-process donor anchor ...", file=sys.stderr, flush=True)
            anchor = _inprocess_donor(
                ranks, args.ranks_per_replica, args.donor_probes, args.interval
            )
            rows = []
            for mode in MODES:
                print(f"[{ranks:,} ranks] {mode} ...", end="", file=sys.stderr, flush=True)
                t0 = time.monotonic()
                try:
                    row = _run_row(args, ranks, mode, logdir)
                except _BenchError as err:
                    print(f" FAILED: {err}", file=sys.stderr, flush=True)
                    failed.append(f"{ranks} {mode}: {err}")
                    continue
                rows.append(row)
                print(
                    f" {row['achieved_beats_per_s']:,.0f} beats/s, "
                    f"p99 {_f(row['latency']['p99_ms'])} ms (row wall {time.monotonic() - t0:.1f} s)",
                    file=sys.stderr,
                    flush=True,
                )
            sizes[ranks] = {"rows": rows, "inprocess_donor": anchor}
    except KeyboardInterrupt:
        print("\ninterrupted; every process this bench started has been stopped", file=sys.stderr)
        if not args.keep_logs:
            shutil.rmtree(logdir, ignore_errors=True)
        return 130
    total_s = time.monotonic() - t_run

    targets = _targets(sizes)
    print()
    print(
        f"coordinator bench ({'quick' if args.quick else 'full'}; {platform.node()}, "
        f"{os.cpu_count()} CPUs; python {platform.python_version()}, grpcio {grpc.__version__}; "
        f"total {total_s:.0f} s; code {version})"
    )
    print(
        "  latencies are client-side (ms); CPU in cores over the measured window: coord = the "
        "coordinator process,\n  gen = the generator processes, other = the rest of the "
        "machine's busy time (this process's probes excluded),\n  steal = taken by the "
        "hypervisor; late = share of beats the generator sent > 10 ms after they were due;\n"
        "  us/RPC = CPU microseconds per answered call (the coordinator's above its idle "
        "baseline)"
    )
    for ranks, s in sizes.items():
        print()
        print(_render_size(ranks, s["rows"], s["inprocess_donor"], args))
    print()
    print(_render_targets(targets, args.quick))
    for f in failed:
        print(f"FAILED: {f}")

    if args.json is not None:
        payload = {
            "meta": {
                "mode": "quick" if args.quick else "full",
                "host": platform.node(),
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "grpcio": grpc.__version__,
                "code": version,
                "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "total_s": total_s,
                "failed": failed,
            },
            "sizes": {str(k): v for k, v in sizes.items()},
            "targets": targets,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1))
        print(f"\nraw results: {args.json}")
    if failed or args.keep_logs:
        print(f"coordinator logs: {logdir}", file=sys.stderr)
    else:
        shutil.rmtree(logdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
