"""One rank of a (transport, workload) pair: runs in a fresh spawned process.

Rank 0 (donor) builds the workload's state_dict (one uint8 buffer for the raw anchors); rank 1
(joiner) builds nothing (allocating receive, and always for raw-gloo-fresh) or a zero-filled copy
of the structure (in place, and always for raw-gloo). Each repeat:
``gc.collect()``, baseline RSS, start the RSS sampler, barrier, time the send/recv call, stop the
joiner's sampler when recv returns (the donor's when the end barrier passes, so HTTP serving is
covered), digest what the joiner now holds, drop it, end barrier. The result (or the traceback)
goes to a JSON file the harness reads after the process exits.

For testing the harness itself, ``TRANSPORT_BENCH_FAULT=crash:<rank>`` makes that rank die
(exit code 3) and ``hang:<rank>`` makes it hang, right before its first transfer;
``corrupt:1`` flips one received value on the joiner, which the checksum must catch.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import sys
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

_DONOR = 0
_JOINER = 1
WORLD_SIZE = 2
_FAULT_ENV = "TRANSPORT_BENCH_FAULT"


def _fault_for(rank: int) -> str | None:
    """The fault ``TRANSPORT_BENCH_FAULT`` asks of this rank, if any."""
    spec = os.environ.get(_FAULT_ENV, "")
    kind, _, target = spec.partition(":")
    if not spec or target != str(rank):
        return None
    if kind not in ("crash", "hang", "corrupt"):
        raise ValueError(f"{_FAULT_ENV}={spec!r}: expected crash|hang|corrupt:<rank>")
    return kind


def _maybe_inject_fault(rank: int) -> None:
    """Crashes or hangs this rank when ``TRANSPORT_BENCH_FAULT`` names it (harness self-test)."""
    kind = _fault_for(rank)
    if kind == "crash":
        os._exit(3)
    if kind == "hang":
        import time

        while True:
            time.sleep(3600)


@dataclass(frozen=True, kw_only=True, slots=True)
class WorkerJob:
    """Everything a rank process needs; pickled across spawn."""

    rank: int
    transport: str
    workload: str
    quick: bool
    repeats: int
    store_port: int
    prefix: str
    timeout_s: float
    """Deadline for the store, the ProcessGroup and every transfer call."""
    result_path: str
    log_path: str


def _redirect_output(log_path: str) -> None:
    """Sends fds 1 and 2 to the pair's log so library chatter stays out of the table."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _write_json(path: str, payload: dict[str, Any]) -> None:
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps(payload, default=str))
    tmp.replace(path)


def worker_main(job: WorkerJob) -> None:
    """Spawn target: runs the rank, writes its result, and exits without running finalizers."""
    import time

    import psutil  # type: ignore[import-untyped]

    boot_s = time.time() - psutil.Process().create_time()
    _redirect_output(job.log_path)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    code = 0
    try:
        payload = _run(job)
    except BaseException as e:
        code = 1
        payload = {
            "rank": job.rank,
            "error": f"{type(e).__name__}: {e}",
            "traceback": traceback.format_exc(),
        }
        traceback.print_exc()
    payload["boot_s"] = round(boot_s, 3)
    try:
        _write_json(job.result_path, payload)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        # Gloo and HTTP server threads can make interpreter teardown slow or hang; the result
        # is on disk, so leave at once.
        os._exit(code)


def _run(job: WorkerJob) -> dict[str, Any]:
    import time

    phases: dict[str, float] = {}
    t_phase = time.perf_counter()

    def phase(name: str) -> None:
        nonlocal t_phase
        now = time.perf_counter()
        phases[name] = round(now - t_phase, 4)
        t_phase = now

    import torch
    import torch.distributed as dist

    from bench._adapter import Env
    from bench._measure import (
        CountingProcessGroup,
        RssSampler,
        SocketByteCounter,
        current_rss,
        monotonic_s,
    )
    from bench._transports import RAW_ANCHORS, joiner_template, make_adapter
    from bench._workloads import (
        StateDict,
        build_raw_buffer,
        build_state_dict,
        build_template,
        distinct_storages,
        get_workload,
        state_digest,
        tensor_leaves,
    )

    phase("import")
    timeout = timedelta(seconds=job.timeout_s)
    t_setup = monotonic_s()
    store = dist.TCPStore(  # type: ignore[attr-defined,unused-ignore]
        "127.0.0.1",
        job.store_port,
        None,
        False,
        timeout=timeout,
        wait_for_workers=False,
    )
    prefixed = dist.PrefixStore(job.prefix, store)  # type: ignore[attr-defined,unused-ignore]
    pg = dist.ProcessGroupGloo(prefixed, job.rank, WORLD_SIZE, timeout)
    counted = CountingProcessGroup(pg)
    phase("pg_init")

    def barrier() -> None:
        pg.barrier().wait(timeout)  # type: ignore[attr-defined,unused-ignore]

    w = get_workload(job.workload, quick=job.quick)
    raw = job.transport in RAW_ANCHORS
    sd: StateDict | None = None
    into: StateDict | None = None
    if job.rank == _DONOR:
        sd = build_raw_buffer(w.logical_bytes, seed=1) if raw else build_state_dict(w, seed=1)
    elif joiner_template(job.transport, w):
        into = build_raw_buffer(w.logical_bytes, seed=None) if raw else build_template(w)
    phase("build")
    # Bytes the joiner legitimately holds after an allocating receive (none when in place).
    retained_bytes = w.logical_bytes if (job.rank == _JOINER and into is None) else 0

    out: dict[str, Any] = {
        "rank": job.rank,
        "transport": job.transport,
        "workload": job.workload,
        "logical_bytes": w.logical_bytes,
        "retained_bytes": retained_bytes,
        "torch": torch.__version__,
        "repeats": [],
        "error": None,
    }
    if sd is not None:
        out["sender_digest"] = state_digest(sd)
    phase("digest")

    adapter = make_adapter(job.transport)
    adapter.open(
        Env(
            rank=job.rank,
            pg=counted,
            store=prefixed,
            timeout=timeout,
            sockets=SocketByteCounter(),
            logical_bytes=w.logical_bytes,
        )
    )
    adapter.ready(sd, into)
    phase("open")
    barrier()
    phase("barrier")
    out["setup_s"] = monotonic_s() - t_setup

    _maybe_inject_fault(job.rank)
    for r in range(job.repeats):
        step = 100 + r
        gc.collect()
        adapter.reset_counters()
        sampler = RssSampler()
        rec: dict[str, Any] = {"repeat": r}
        barrier()
        sampler.start()
        t0 = monotonic_s()
        if job.rank == _DONOR:
            assert sd is not None
            rec["extras"] = adapter.send(sd, step)
            rec["seconds"] = monotonic_s() - t0
            barrier()  # the joiner has received and checked everything
            sampler.stop()
            rec["final_rss"] = current_rss()
        else:
            got, extras = adapter.recv(into, step)
            rec["seconds"] = monotonic_s() - t0
            sampler.stop()
            rec["extras"] = extras
            rec["final_rss"] = current_rss()
            held = into if into is not None else got
            if _fault_for(job.rank) == "corrupt":
                tensor_leaves(held)[0][1].view(-1)[0] += 1
            if into is not None:
                theirs = dict(tensor_leaves(got))
                rec["in_place"] = all(
                    k in theirs and theirs[k].data_ptr() == t.data_ptr()
                    for k, t in tensor_leaves(into)
                )
            rec["digest"] = state_digest(held)
            rec["storages"] = distinct_storages(held)
            rec["tensors"] = len(tensor_leaves(held))
            del got, held
            barrier()
        rec["baseline_rss"] = sampler.baseline_rss
        rec["peak_rss"] = sampler.peak_rss
        rec["peak_source"] = sampler.peak_source
        rec["rss_samples"] = sampler.samples
        rec["wire"] = dataclasses.asdict(adapter.wire())
        out["repeats"].append(rec)

    phase("repeats")
    adapter.close()
    phase("close")
    out["phases_s"] = phases
    return out
