"""Runs one (transport, workload) pair as two fresh spawned processes, bounded in time.

The parent hosts the TCPStore (port 0) for the whole run; each pair gets its own prefix, so
ranks build ``ProcessGroupGloo(PrefixStore(prefix, TCPStore(...)), rank, 2, timeout)`` and never
touch the default group. The parent waits on both process sentinels: a rank that exits non-zero
fails the pair at once (its partner is killed), and a pair past its deadline is killed whole.
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.connection
import os
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import psutil  # type: ignore[import-untyped]

from bench._transports import expected_wire_bytes
from bench._worker import WORLD_SIZE, WorkerJob, worker_main
from bench._workloads import Workload

Status = Literal["ok", "failed", "timeout", "skipped"]

# Budgets are deliberately loose: they exist to end a hung pair, not to judge a slow one.
_FLOOR_BYTES_PER_S = 50e6
_PER_CALL_SLACK_S = 30.0
_STARTUP_S = 60.0
_KILL_JOIN_S = 10.0
_LOG_TAIL_CHARS = 3000


@dataclass(kw_only=True, slots=True)
class PairOutcome:
    """How one (transport, workload) pair ended, with each rank's raw result."""

    transport: str
    workload: str
    status: Status
    reason: str | None = None
    ranks: list[dict[str, Any] | None] = field(default_factory=list)
    wall_s: float = 0.0
    log_path: str | None = None
    log_tail: str | None = None
    foreign_cpu_share: float | None = None
    """Share of the machine's CPU time used by processes outside this pair while it ran."""


def transfer_timeout_s(transport: str, w: Workload, scale: float) -> float:
    """Deadline for one transfer call of ``transport`` on ``w``."""
    return scale * (_PER_CALL_SLACK_S + expected_wire_bytes(transport, w) / _FLOOR_BYTES_PER_S)


def pair_deadline_s(transport: str, w: Workload, repeats: int, scale: float) -> float:
    """Deadline for the whole pair: start-up, building the workload, every repeat."""
    build_s = 4 * w.logical_bytes / _FLOOR_BYTES_PER_S
    return scale * _STARTUP_S + build_s + repeats * transfer_timeout_s(transport, w, scale)


class Harness:
    """Owns the run's TCPStore and a scratch folder; runs pairs one after another."""

    def __init__(self, *, workdir: Path, quick: bool, repeats: int, timeout_scale: float) -> None:
        import torch.distributed as dist

        self._workdir = workdir
        self._quick = quick
        self._repeats = repeats
        self._scale = timeout_scale
        self._ctx = multiprocessing.get_context("spawn")
        self._store = dist.TCPStore(  # type: ignore[attr-defined,unused-ignore]
            "127.0.0.1",
            0,
            None,
            True,
            timeout=timedelta(seconds=60),
            wait_for_workers=False,
        )
        self._pairs = 0

    @property
    def store_port(self) -> int:
        """Port of the run's TCPStore."""
        return int(self._store.port)

    def run_pair(self, transport: str, w: Workload) -> PairOutcome:
        """Runs ``transport`` on ``w`` in two fresh processes and returns the outcome."""
        self._pairs += 1
        tag = f"{self._pairs:02d}-{w.name}-{transport}"
        log_path = self._workdir / f"{tag}.log"
        call_s = transfer_timeout_s(transport, w, self._scale)
        deadline_s = pair_deadline_s(transport, w, self._repeats, self._scale)
        jobs = [
            WorkerJob(
                rank=rank,
                transport=transport,
                workload=w.name,
                quick=self._quick,
                repeats=self._repeats,
                store_port=self.store_port,
                prefix=f"pair/{tag}/",
                timeout_s=call_s,
                result_path=str(self._workdir / f"{tag}.rank{rank}.json"),
                log_path=str(log_path),
            )
            for rank in range(WORLD_SIZE)
        ]
        procs = [
            self._ctx.Process(
                target=worker_main, args=(job,), name=f"{tag}-rank{job.rank}", daemon=True
            )
            for job in jobs
        ]
        cpu0 = _busy_cpu_s()
        own0 = _own_cpu_s()
        start = time.monotonic()
        status: Status = "ok"
        reason: str | None = None
        try:
            for p in procs:
                p.start()
            status, reason = self._wait(procs, start + deadline_s, deadline_s)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join(_KILL_JOIN_S)
        wall_s = time.monotonic() - start
        foreign_s = max(0.0, (_busy_cpu_s() - cpu0) - (_own_cpu_s() - own0))
        ncpu = os.cpu_count() or 1
        foreign = foreign_s / (wall_s * ncpu) if wall_s > 0 else None
        ranks = [_read_json(Path(j.result_path)) for j in jobs]
        for rank, res in enumerate(ranks):
            if res is not None and res.get("error"):
                status = "failed"
                reason = f"rank {rank}: {res['error']}"
                break
        tail = None
        if status != "ok":
            tail = _tail(log_path)
        return PairOutcome(
            transport=transport,
            workload=w.name,
            status=status,
            reason=reason,
            ranks=ranks,
            wall_s=wall_s,
            log_path=str(log_path),
            log_tail=tail,
            foreign_cpu_share=foreign,
        )

    def _wait(
        self,
        procs: Sequence[multiprocessing.process.BaseProcess],
        deadline: float,
        deadline_s: float,
    ) -> tuple[Status, str | None]:
        while True:
            codes = [p.exitcode for p in procs]
            bad = [(rank, c) for rank, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                rank, code = bad[0]
                return "failed", f"rank {rank} exited with code {code}"
            if all(c == 0 for c in codes):
                return "ok", None
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout", f"pair exceeded its {deadline_s:.0f} s deadline; killed"
            alive = [p.sentinel for p in procs if p.exitcode is None]
            multiprocessing.connection.wait(alive, timeout=min(left, 1.0))


def _busy_cpu_s() -> float:
    """Non-idle CPU seconds of the whole machine since boot."""
    t = psutil.cpu_times()
    # guest time is already inside user; steal is the hypervisor's, not a process's.
    return float(t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0))


def _own_cpu_s() -> float:
    """CPU seconds of this process and its reaped children (the pair's ranks)."""
    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _tail(path: Path) -> str | None:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    return text[-_LOG_TAIL_CHARS:]
