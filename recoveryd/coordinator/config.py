"""The coordinator's knobs, with the defaults a real job wants."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from recoveryd.errors import ConfigError


@dataclass(frozen=True, kw_only=True, slots=True)
class CoordinatorConfig:
    """How the coordinator judges health and runs recoveries."""

    heartbeat_interval: timedelta = timedelta(seconds=2)
    """How often agents heartbeat (told to them when they register). A
    heartbeat costs the coordinator ~0.5 ms of CPU (bench/RESULTS.md), so a
    core serves ~2,000 a second: ranks / interval must stay well below that."""
    heartbeat_timeout: timedelta = timedelta(seconds=10)
    """A rank silent for this long is unhealthy, and so is its replica."""
    fence_steps: int = 2
    """Step boundaries between the furthest donor rank and the fence; doubled
    for a joiner each time a donor rank overshoots it."""
    max_fence_steps: int = 256
    """Upper bound of that doubling."""
    fence_time: timedelta = timedelta(milliseconds=100)
    """At least this much training time between the fence and the furthest
    donor rank, from the step times the donor ranks report (fast steps get
    more steps of margin: the ARM order must arrive before the boundary)."""
    prepare_timeout: timedelta = timedelta(seconds=60)
    """How long the donor ranks may take to all join a plan's transfer group
    (the joiner's ranks must start and reach the rendezvous in that time)."""
    transfer_timeout: timedelta = timedelta(minutes=10)
    """A plan that has not finished this long after it was made fails; it
    bounds the rendezvous, the wait for the fence and the bytes."""
    max_attempts: int = 4
    """Plans tried for one recovery before the joiner is told there is no donor."""
    max_donors: int = 1
    """Donor replicas one plan may stripe over (at most 16): every rank of the
    joiner pulls a disjoint part of its state from each, all fenced at one
    step, so their links add up; a donor lost after the fence costs only its
    part, which the others send. 1: one donor per plan."""
    recent_plans: int = 100
    """Finished plans kept for ``recoveryd status``."""
    warmup: timedelta = timedelta(seconds=5)
    """For this long after the coordinator starts, a joiner with no donor is
    told to wait rather than that there is none: a restarted coordinator
    knows nobody until the agents register again (they retry at least every
    2 s). A fresh job's first replicas start this much later."""
    max_replicas: int = 4096
    """The most replicas registered at once; more are refused
    ``RESOURCE_EXHAUSTED`` (a bound on what a misbehaving client can make
    the coordinator hold, and on a donor decision's cost: ~1 ms per 2,000 ranks)."""
    max_ranks: int = 32768
    """The most ranks registered at once (see :attr:`max_replicas`)."""
    forget_after: timedelta = timedelta(minutes=10)
    """A rank silent for this long is dropped from membership (its replica
    left the job); until then it shows as unhealthy."""

    def __post_init__(self) -> None:
        for name in (
            "heartbeat_interval",
            "heartbeat_timeout",
            "prepare_timeout",
            "transfer_timeout",
        ):
            if getattr(self, name) <= timedelta(0):
                raise ConfigError(name, getattr(self, name), "must be positive")
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ConfigError(
                "heartbeat_timeout",
                self.heartbeat_timeout,
                f"must exceed heartbeat_interval={self.heartbeat_interval} (allow a few missed beats)",
            )
        if self.warmup < timedelta(0):
            raise ConfigError("warmup", self.warmup, "must not be negative")
        if self.forget_after <= self.heartbeat_timeout:
            raise ConfigError(
                "forget_after",
                self.forget_after,
                f"must exceed heartbeat_timeout={self.heartbeat_timeout}",
            )
        if not 1 <= self.fence_steps <= self.max_fence_steps:
            raise ConfigError(
                "fence_steps",
                self.fence_steps,
                f"must be in [1, max_fence_steps={self.max_fence_steps}]",
            )
        if not 1 <= self.max_donors <= 16:
            raise ConfigError("max_donors", self.max_donors, "must be in [1, 16]")
        if self.max_attempts < 1:
            raise ConfigError("max_attempts", self.max_attempts, "must be >= 1")
        for name in ("max_replicas", "max_ranks"):
            if getattr(self, name) < 1:
                raise ConfigError(name, getattr(self, name), "must be >= 1")
        if self.recent_plans < 0:
            raise ConfigError("recent_plans", self.recent_plans, "must be >= 0")
