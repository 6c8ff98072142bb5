"""Every Prometheus metric recoveryd exports, defined once; the registry is passed in.

Names follow Prometheus practice: a ``recoveryd_`` prefix, base units
(seconds, bytes), ``_total`` counters. Labels are a small fixed set (role,
backend, phase, result, state), never a step, a tensor name, an address or
a replica id. Durations use buckets from 10 ms to 30 min: a recovery can be
a fraction of a second on one node or many minutes over a slow link.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from recoveryd._version import __version__
from recoveryd.errors import ConfigError
from recoveryd.protocol import REPLICA_STATES, RESULTS, ReplicaState

BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
"""Histogram buckets for every duration, in seconds."""

BUCKETS_BPS = (1e6, 1e7, 5e7, 1e8, 2.5e8, 5e8, 1e9, 2.5e9, 5e9, 1e10, 2.5e10, 5e10, 1e11)
"""Histogram buckets for throughput, in bytes per second: 1 MB/s (a broken
link) to 100 GB/s (NVLink); a transfer on the wrong interface stands out."""

PLAN_RESULTS = ("done", "failed", "no_donor")
"""How recovery rounds end: ``no_donor`` when state exists but cannot be had."""
DECISION_RESULTS = ("plan", "fresh", "no_donor")
"""``fresh``: nothing to recover from yet (a job's start), not a failure."""
RECOVERY_PHASES = (
    "plan",
    "rendezvous",
    "arm",
    "fence",
    "manifest",
    "prepare",
    "handshake",
    "data",
    "verify",
    "end_to_end",
)
"""The phases a joiner reports (the agent's, then the transport's receive
phases), and the whole; others a report may carry are not exported, so a
buggy or hostile agent cannot grow the label set. Their series exist from the start, at zero: a
histogram or counter child born with its first observation is invisible to
``rate()``/``increase()``, so the first recovery would not show."""
RECOVERY_RESULTS = ("recovered", "fresh", "no_donor", "timeout", "coordinator_unavailable")
TRANSFER_PHASES = {
    "donor": ("plan", "handshake", "data", "confirm", "total"),
    "joiner": ("manifest", "prepare", "handshake", "data", "verify", "total"),
}
"""Each role's transport phases (``total``: the whole call), created at zero
like :data:`RECOVERY_PHASES`."""


class CoordinatorMetrics:
    """The coordinator's metrics.

    Args:
        registry: where to register them (a fresh one per test).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.heartbeats = Counter(
            "recoveryd_coordinator_heartbeats_total",
            "Heartbeats received (one per rank per beat, batched or not).",
            registry=registry,
        )
        self.unknown_heartbeats = Counter(
            "recoveryd_coordinator_unknown_heartbeats_total",
            "Heartbeats from ranks the coordinator does not know (they register again).",
            registry=registry,
        )
        self.replicas = Gauge(
            "recoveryd_coordinator_replicas",
            "Replicas by state.",
            ["state"],
            registry=registry,
        )
        self.ranks = Gauge(
            "recoveryd_coordinator_ranks",
            "Registered ranks by health.",
            ["state"],
            registry=registry,
        )
        self.transfers_in_flight = Gauge(
            "recoveryd_coordinator_transfers_in_flight",
            "Recovery plans not finished yet.",
            registry=registry,
        )
        self.step = Gauge(
            "recoveryd_coordinator_replica_step",
            "Training step of the slowest and of the fastest healthy replica.",
            ["which"],
            registry=registry,
        )
        self.decisions = Counter(
            "recoveryd_coordinator_donor_decisions_total",
            "Donor decisions, by outcome: plan (a donor chosen), fresh (no replica holds "
            "this state yet: a job's start), no_donor (state exists but cannot be had).",
            ["result"],
            registry=registry,
        )
        self.decision_seconds = Histogram(
            "recoveryd_coordinator_donor_decision_seconds",
            "Time to choose a donor and make a plan.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
            registry=registry,
        )
        self.plans = Counter(
            "recoveryd_coordinator_plans_total",
            "Finished recovery plans, by result.",
            ["result"],
            registry=registry,
        )
        self.recovery_seconds = Histogram(
            "recoveryd_recovery_seconds",
            "Recovery time per phase as the joiner saw it (the slowest rank); phase "
            "'end_to_end' is from the replica's first ask to every rank holding the state.",
            ["phase"],
            buckets=BUCKETS_S,
            registry=registry,
        )
        self.recovery_bytes = Counter(
            "recoveryd_recovery_bytes_total",
            "Payload bytes of finished recoveries (all ranks of a replica).",
            registry=registry,
        )
        self.recovery_throughput = Histogram(
            "recoveryd_recovery_throughput_bytes_per_second",
            "Per finished recovery: bytes a joiner rank received over its transfer "
            "seconds (the slowest rank's rate).",
            buckets=BUCKETS_BPS,
            registry=registry,
        )
        self.last_recovery = Gauge(
            "recoveryd_coordinator_last_recovery_timestamp_seconds",
            "Unix time the last recovery finished (0: none since the coordinator started).",
            registry=registry,
        )
        self.heartbeat_misses = Counter(
            "recoveryd_coordinator_heartbeat_misses_total",
            "Ranks that went silent for longer than the heartbeat timeout.",
            registry=registry,
        )
        self.build = Info("recoveryd_build", "recoveryd version.", registry=registry)
        self.build.info({"version": __version__})
        for state in REPLICA_STATES:
            self.replicas.labels(state=state)
        for result in PLAN_RESULTS:
            self.plans.labels(result=result)
        for result in DECISION_RESULTS:
            self.decisions.labels(result=result)
        for phase in RECOVERY_PHASES:
            self.recovery_seconds.labels(phase=phase)

    def decision(self, result: str, seconds: float) -> None:
        """Records a donor decision (``plan``, ``fresh`` or ``no_donor``)."""
        self.decisions.labels(result=result).inc()
        self.decision_seconds.observe(seconds)
        if result == "no_donor":
            self.plans.labels(result="no_donor").inc()

    def observe_cluster(
        self,
        *,
        replicas: Mapping[ReplicaState, int],
        healthy_ranks: int,
        unhealthy_ranks: int,
        in_flight: int,
        slowest_step: int | None,
        fastest_step: int | None,
        new_misses: int,
    ) -> None:
        """Sets the cluster's gauges from the coordinator's counts.

        Args:
            replicas: how many replicas are in each of :data:`REPLICA_STATES`.
            healthy_ranks: ranks of healthy replicas.
            unhealthy_ranks: ranks of unhealthy replicas.
            in_flight: plans not finished yet.
            slowest_step: the lowest step of a healthy replica (``None``: none holds one).
            fastest_step: the highest.
            new_misses: ranks that went silent since the last call.
        """
        self.heartbeat_misses.inc(new_misses)
        for state in REPLICA_STATES:
            self.replicas.labels(state=state).set(replicas.get(state, 0))
        self.ranks.labels(state="healthy").set(healthy_ranks)
        self.ranks.labels(state="unhealthy").set(unhealthy_ranks)
        self.transfers_in_flight.set(in_flight)
        # No healthy replica holding a step: NaN (a gap), not the last value.
        nan = float("nan")
        self.step.labels(which="slowest").set(nan if slowest_step is None else slowest_step)
        self.step.labels(which="fastest").set(nan if fastest_step is None else fastest_step)

    def plan_finished(
        self,
        result: str,
        *,
        phases: Mapping[str, float],
        end_to_end_s: float,
        nbytes: int,
        rank_bytes_per_s: float = 0.0,
    ) -> None:
        """Records a finished plan and, when it succeeded, its phases."""
        self.plans.labels(result=result).inc()
        if result != "done":
            return
        for phase, seconds in phases.items():
            if phase in RECOVERY_PHASES and phase != "end_to_end":
                self.recovery_seconds.labels(phase=phase).observe(seconds)
        self.recovery_seconds.labels(phase="end_to_end").observe(end_to_end_s)
        self.recovery_bytes.inc(nbytes)
        if rank_bytes_per_s > 0:
            self.recovery_throughput.observe(rank_bytes_per_s)
        self.last_recovery.set_to_current_time()


class AgentMetrics:
    """One agent's metrics (a rank's transfers and recoveries).

    Args:
        registry: where to register them.
        backends: the backends this rank can transfer with; their series are
            created at zero (``gloo``; ``nccl`` too when it holds CUDA state).
    """

    def __init__(
        self, registry: CollectorRegistry, *, backends: tuple[str, ...] = ("gloo",)
    ) -> None:
        self.registry = registry
        self.transfers = Counter(
            "recoveryd_agent_transfers_total",
            "Transfers this rank took part in, by role, backend and result.",
            ["role", "backend", "result"],
            registry=registry,
        )
        self.transfer_seconds = Histogram(
            "recoveryd_agent_transfer_seconds",
            "Seconds per phase of this rank's successful transfers ('total': the whole call).",
            ["role", "backend", "phase"],
            buckets=BUCKETS_S,
            registry=registry,
        )
        self.transfer_bytes = Counter(
            "recoveryd_agent_transfer_bytes_total",
            "Payload bytes this rank sent or received in successful transfers.",
            ["role", "backend"],
            registry=registry,
        )
        self.transfer_throughput = Histogram(
            "recoveryd_agent_transfer_throughput_bytes_per_second",
            "Payload bytes over seconds of each successful transfer of this rank.",
            ["role", "backend"],
            buckets=BUCKETS_BPS,
            registry=registry,
        )
        self.recoveries = Counter(
            "recoveryd_agent_recoveries_total",
            "Calls to recover(), by outcome (recovered, fresh: nothing to recover from at a "
            "job's start, no_donor, timeout, coordinator_unavailable).",
            ["result"],
            registry=registry,
        )
        for result in RECOVERY_RESULTS:
            self.recoveries.labels(result=result)
        for backend in backends:
            for role, phases in TRANSFER_PHASES.items():
                self.transfer_bytes.labels(role=role, backend=backend)
                self.transfer_throughput.labels(role=role, backend=backend)
                for phase in phases:
                    self.transfer_seconds.labels(role=role, backend=backend, phase=phase)
                for result in RESULTS:
                    self.transfers.labels(role=role, backend=backend, result=result)
        self.recovery_seconds = Histogram(
            "recoveryd_agent_recovery_seconds",
            "From recover() to the state being ready on every rank of the replica.",
            buckets=BUCKETS_S,
            registry=registry,
        )
        self.build = Info("recoveryd_build", "recoveryd version.", registry=registry)
        self.build.info({"version": __version__})

    def transfer(
        self,
        role: str,
        backend: str,
        result: str,
        *,
        seconds: float,
        nbytes: int = 0,
        phases: Mapping[str, float] | None = None,
    ) -> None:
        """Records one transfer of this rank."""
        self.transfers.labels(role=role, backend=backend, result=result).inc()
        if result != "ok":
            return
        self.transfer_bytes.labels(role=role, backend=backend).inc(nbytes)
        self.transfer_seconds.labels(role=role, backend=backend, phase="total").observe(seconds)
        if seconds > 0 and nbytes > 0:
            self.transfer_throughput.labels(role=role, backend=backend).observe(nbytes / seconds)
        for phase, secs in (phases or {}).items():
            self.transfer_seconds.labels(role=role, backend=backend, phase=phase).observe(secs)


class MetricsServer:
    """Serves ``/metrics`` from a registry on ``host:port`` (port 0: any free port)."""

    def __init__(
        self, registry: CollectorRegistry, *, host: str = "0.0.0.0", port: int = 0
    ) -> None:
        if not 0 <= port < 65536:
            raise ConfigError("metrics_port", port, "must be a port number (0: any free one)")
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        self.port = int(self._server.server_port)

    def close(self) -> None:
        """Stops serving and frees the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
