"""``recoveryd demo``: kill a replica mid-training, restart it, watch it recover from a live peer.

On this machine: a coordinator, ``replicas`` x ``ranks`` trainer processes
(a small MLP with Adam on CPU, Gloo), one replica SIGKILLed at a step and
restarted. The restarted ranks ask the coordinator, get a donor, receive its
live state in place, and train on. The demo prints a timeline and checks,
bit for bit, that (1) each recovered rank holds exactly the state its donor
rank sent, and (2) every replica ends the run with identical state.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TextIO

from recoveryd._format import human_bytes, phases_line
from recoveryd.demo.cluster import LocalCluster
from recoveryd.demo.jobs import MODELS, Model
from recoveryd.demo.trainer import Event
from recoveryd.errors import ConfigError
from recoveryd.status import render


@dataclass(frozen=True, kw_only=True, slots=True)
class DemoConfig:
    """The demo's shape."""

    replicas: int = 3
    ranks: int = 2
    steps: int = 300
    kill_at: int = 60
    """Kill the last replica once it reached this step."""
    hidden: int = 512
    layers: int = 4
    extra_bytes: int = 0
    step_delay_s: float = 0.02
    timeout_s: float = 120.0
    prometheus_sd: str | None = None
    """Serve ``/metrics`` on the coordinator and every rank, and list them in
    this file as Prometheus ``file_sd_configs`` targets."""
    linger_s: float = 0.0
    """Keep everything running this long after training ends (for scrapes)."""
    model: Model = "mlp"
    """``mlp`` (data parallel, plain tensors) or ``fsdp2`` (each replica shards
    the MLP over its ranks with FSDP2 and AdamW: DTensor state)."""
    sidecars: bool = False
    """Run each rank's agent as a sidecar process (``recoveryd agent``) that
    survives the kill; the restarted ranks attach to it again."""

    def __post_init__(self) -> None:
        if self.replicas < 2:
            raise ConfigError(
                "replicas", self.replicas, "must be >= 2 (one is killed, another donates)"
            )
        if self.ranks < 1:
            raise ConfigError("ranks", self.ranks, "must be >= 1")
        if not 0 < self.kill_at < self.steps:
            raise ConfigError("kill_at", self.kill_at, f"must be in (0, steps={self.steps})")
        if self.hidden < 8:
            raise ConfigError("hidden", self.hidden, "must be >= 8")
        if self.layers < 1:
            raise ConfigError("layers", self.layers, "must be >= 1")
        if self.extra_bytes < 0:
            raise ConfigError("extra_bytes", self.extra_bytes, "must be >= 0")
        if self.model not in MODELS:
            raise ConfigError("model", self.model, f"must be one of {MODELS}")
        if self.linger_s < 0:
            raise ConfigError("linger_s", self.linger_s, "must be >= 0")


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _fmt(ev: Event, t0: float) -> str | None:
    who = f"{ev.replica_id}/{ev.group_rank}"
    if ev.incarnation:
        who += f" (restart {ev.incarnation})"
    d = ev.data
    at = f"{ev.time - t0:7.2f}s  "
    if ev.kind == "fresh":
        return f"{at}{who}: starts fresh: {d['reason']}"
    if ev.kind == "recovered":
        return (
            f"{at}{who}: RECOVERED step {d['step']} from {d['donor']!r} (plan {d['plan_id']}, "
            f"{d['attempts']} attempt(s)): {human_bytes(d['bytes'])} in {d['seconds']:.3f} s "
            f"join->ready [{phases_line(d['phases'])}]"
        )
    if ev.kind == "sent":
        return (
            f"{at}{who}: sent step {d['step']} (plan {d['plan_id']}): {d['result']}, "
            f"{human_bytes(d['bytes'])} in {d['seconds']:.3f} s"
        )
    if ev.kind == "finished":
        return f"{at}{who}: finished at step {d['step']}"
    return None


def run_demo(config: DemoConfig, *, out: TextIO = sys.stdout, as_json: bool = False) -> int:
    """Runs the demo; returns 0 when every check passed.

    SIGTERM ends it like Ctrl-C: every rank is killed on the way out.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    timeout = timedelta(seconds=config.timeout_s)
    names = [f"replica-{i}" for i in range(config.replicas)]
    victim = names[-1]
    say: Any = (lambda *a: None) if as_json else (lambda *a: print(*a, file=out, flush=True))
    with LocalCluster(
        steps=config.steps,
        hidden=config.hidden,
        layers=config.layers,
        extra_bytes=config.extra_bytes,
        step_delay_s=config.step_delay_s,
        prometheus_sd=config.prometheus_sd,
        sidecars=config.sidecars,
        model=config.model,
    ) as cluster:
        t0 = cluster.t0
        say(
            f"recoveryd demo: coordinator on {cluster.address}; {config.replicas} replicas x "
            f"{config.ranks} ranks training an MLP ({config.layers}x{config.hidden}"
            f"{', sharded with FSDP2' if config.model == 'fsdp2' else ''}) for "
            f"{config.steps} steps; {victim} is killed at step {config.kill_at} and restarted\n"
        )
        if config.sidecars:
            say(
                "agents run as sidecar processes (recoveryd agent); the kill takes the "
                "trainers only, and the restarted ones attach to their sidecars again\n"
            )
        if config.prometheus_sd is not None and cluster.coordinator is not None:
            say(
                f"metrics: coordinator http://{cluster.coordinator.metrics_address}/metrics; "
                f"every rank's in {config.prometheus_sd} (Prometheus file_sd targets)\n"
            )
        if config.sidecars:
            cluster.start_sidecars(dict.fromkeys(names, config.ranks))
        for name in names:
            cluster.start_replica(name, config.ranks)
        cluster.wait_for(
            lambda e: e.kind in ("fresh", "recovered"),
            count=len(names) * config.ranks,
            timeout=timeout,
        )
        say(f"{time.time() - t0:7.2f}s  all {len(names) * config.ranks} ranks started")
        end = time.monotonic() + config.timeout_s
        while cluster.step_of(victim) < config.kill_at:
            if time.monotonic() > end:
                raise TimeoutError(f"{victim} did not reach step {config.kill_at} in {timeout}")
            cluster.drain(0.05)
        killed_at = cluster.step_of(victim)
        cluster.kill_replica(victim)
        t_kill = time.time()
        notes = [
            (
                t_kill,
                f"KILL -9 {victim} (all {config.ranks} trainer ranks) at step ~{killed_at}",
            )
        ]
        say(f"{t_kill - t0:7.2f}s  {notes[-1][1]}")
        cluster.start_replica(victim, config.ranks)
        notes.append((time.time(), f"restarted {victim}"))
        say(f"{notes[-1][0] - t0:7.2f}s  {notes[-1][1]}")
        recovered = cluster.wait_for(
            lambda e: (
                e.replica_id == victim and e.incarnation == 1 and e.kind in ("recovered", "fresh")
            ),
            count=config.ranks,
            timeout=timeout,
        )
        cluster.wait_for(
            lambda e: e.kind == "finished" and (e.replica_id != victim or e.incarnation == 1),
            count=len(names) * config.ranks,
            timeout=timeout,
        )
        if config.linger_s:
            say(f"{time.time() - t0:7.2f}s  lingering {config.linger_s:g} s (metrics stay up)")
            end = time.monotonic() + config.linger_s
            while time.monotonic() < end:
                cluster.drain(min(0.2, max(0.0, end - time.monotonic())))
        client = cluster.client()
        status = client.status(recent=10)
        client.close()
        cluster.stop()
        events = sorted(cluster.events, key=lambda e: e.time)

    # ---- checks ----------------------------------------------------------------
    checks: list[tuple[str, bool, str]] = []
    ok_recovery = all(e.kind == "recovered" for e in recovered)
    checks.append(
        (
            f"{victim} recovered from a live donor on every rank",
            ok_recovery,
            ", ".join(f"rank {e.group_rank}: {e.kind}" for e in recovered),
        )
    )
    for e in recovered:
        if e.kind != "recovered":
            continue
        sent = [
            s
            for s in events
            if s.kind == "sent"
            and s.data["plan_id"] == e.data["plan_id"]
            and s.group_rank == e.group_rank
            and s.data["result"] == "ok"
        ]
        same = bool(sent) and sent[0].data["digest"] == e.data["digest"]
        checks.append(
            (
                f"rank {e.group_rank}: recovered state == state {e.data['donor']}/{e.group_rank} sent "
                f"at step {e.data['step']} (bit for bit)",
                same,
                f"digest {e.data['digest'][:12]} vs {sent[0].data['digest'][:12] if sent else 'no send seen'}",
            )
        )
    finals: dict[int, set[str]] = {}
    for e in events:
        if e.kind == "finished" and (e.replica_id != victim or e.incarnation == 1):
            finals.setdefault(e.group_rank, set()).add(e.data["digest"])
    checks.append(
        (
            f"all {config.replicas} replicas end at step {config.steps} with identical state",
            all(len(d) == 1 for d in finals.values()) and len(finals) == config.ranks,
            ", ".join(f"rank {r}: {len(d)} distinct" for r, d in sorted(finals.items())),
        )
    )
    passed = all(ok for _, ok, _ in checks)

    rec_times = [e.data["seconds"] for e in recovered if e.kind == "recovered"]
    restarted = [
        e for e in events if e.replica_id == victim and e.incarnation == 1 and e.kind == "started"
    ]
    summary: dict[str, Any] = {
        "passed": passed,
        "killed_at_step": killed_at,
        "recovered_step": recovered[0].data.get("step") if ok_recovery else None,
        "recover_seconds": max(rec_times, default=None),
        "restart_to_ready_seconds": (max(e.time for e in recovered) - t_kill)
        if recovered
        else None,
        "process_start_seconds": (max(e.time for e in restarted) - t_kill) if restarted else None,
        "bytes_per_rank": recovered[0].data.get("bytes") if ok_recovery else None,
        "phases": [e.data.get("phases") for e in recovered],
        "checks": [{"check": c, "ok": ok, "detail": d} for c, ok, d in checks],
    }
    if as_json:
        print(json.dumps(summary, indent=2), file=out)
        return 0 if passed else 1

    say("\ntimeline (seconds since start):")
    lines = [(t, f"{t - t0:7.2f}s  {text}") for t, text in notes]
    for ev in events:
        line = _fmt(ev, t0)
        if line is not None and (ev.kind != "finished" or ev.replica_id == victim):
            lines.append((ev.time, line))
    for _, line in sorted(lines):
        say(line)
    say("\ncoordinator status at the end of the run:")
    say(render(status))
    say("\nchecks:")
    for c, ok, d in checks:
        say(f"  [{'PASS' if ok else 'FAIL'}] {c} ({d})")
    if summary["recover_seconds"] is not None:
        say(
            f"\nrecovery: join->ready {summary['recover_seconds']:.3f} s for "
            f"{human_bytes(summary['bytes_per_rank'] or 0)} per rank; kill->training again "
            f"{summary['restart_to_ready_seconds']:.2f} s, of which process start "
            f"(python + torch import) {summary['process_start_seconds']:.2f} s"
        )
    say("demo " + ("PASSED" if passed else "FAILED"))
    return 0 if passed else 1
