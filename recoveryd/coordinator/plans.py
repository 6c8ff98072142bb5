"""A plan as it runs and a joiner's round, as plain data the planner keeps and mutates.

:class:`LivePlan` is one :class:`~recoveryd.coordinator.policy.RecoveryPlan`
under way (its acknowledgements, fence, reports and timings); :class:`Round`
is one joining replica's recovery across its plans. Both are the planner's
own bookkeeping; what leaves it are :class:`~recoveryd.protocol.PlanSnapshot`
and :class:`~recoveryd.protocol.Answer`.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from recoveryd.coordinator.policy import RecoveryPlan
from recoveryd.protocol import Answer, Order, PlanSnapshot, PlanState, Report

NOT_THE_DONORS = ("step_mismatch", "untrusted")
"""A joiner's failures that do not exclude the donor: an overshot fence (the next
plan fences wider), a stranger on the group (the donor is innocent of it)."""


@dataclass(slots=True)
class LivePlan:
    """A :class:`RecoveryPlan` as it runs: its state, fence, acknowledgements and reports."""

    plan: RecoveryPlan
    attempt: int
    created: float
    round_started: float
    timeout_s: float
    backend: str
    world_size: int
    state: PlanState = "preparing"
    step: int | None = None
    acks: dict[int, int] = field(default_factory=dict)
    idle: set[int] = field(default_factory=set)
    step_time_s: float = 0.0
    handed: set[int] = field(default_factory=set)
    joiner_reports: dict[int, Report] = field(default_factory=dict)
    donor_reports: dict[int, Report] = field(default_factory=dict)
    reason: str = ""
    ended: float | None = None

    prefix: str = ""
    key: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)
    """The plan's key: only its parties learn it, over their authenticated calls."""

    def order(self, kind: Literal["prepare", "arm"]) -> Order:
        """This plan's PREPARE or ARM order for its donor ranks."""
        return Order(
            kind=kind,
            plan_id=self.plan.plan_id,
            joiner=self.plan.joiner,
            step=self.step if kind == "arm" else None,
            timeout_s=self.timeout_s,
            rendezvous_prefix=self.prefix,
            backend=self.backend,
            plan_key=self.key,
        )

    def snapshot(self, now: float) -> PlanSnapshot:
        """The plan as ``recoveryd status`` shows it (``now``: the planner's clock)."""
        p = self
        phases: dict[str, float] = {}
        for rep in p.joiner_reports.values():
            for k, v in rep.phases.items():
                phases[k] = max(phases.get(k, 0.0), v)
        return PlanSnapshot(
            plan_id=p.plan.plan_id,
            joiner=p.plan.joiner,
            donor=p.plan.donor,
            step=p.step,
            state=p.state,
            attempt=p.attempt,
            age_s=now - p.created,
            ranks_done=sum(1 for r in p.joiner_reports.values() if r.result == "ok"),
            reason=p.reason,
            bytes=sum(r.bytes for r in p.joiner_reports.values()),
            transfer_s=max((r.seconds for r in p.joiner_reports.values()), default=0.0),
            recovery_s=(p.ended - p.round_started) if p.ended is not None else 0.0,
            phases=phases,
            addresses=tuple(sorted({r.address for r in p.donor_reports.values() if r.address})),
        )

    def done_answer(self) -> Answer:
        """What a joiner rank is told once every rank of the joiner has the state."""
        assert self.step is not None
        return Answer(
            state="done", plan_id=self.plan.plan_id, donor=self.plan.donor, step=self.step
        )

    def transfer_answer(self, group_rank: int) -> Answer:
        """What joiner rank ``group_rank`` is told while the plan runs (the step once armed)."""
        return Answer(
            state="transfer",
            plan_id=self.plan.plan_id,
            donor=self.plan.donor,
            step=self.step,
            rendezvous=self.plan.pairs[group_rank].donor_rendezvous,
            rendezvous_prefix=self.prefix,
            timeout_s=self.timeout_s,
            backend=self.backend,
            plan_key=self.key,
        )

    def slowest_rank_bps(self) -> float:
        """The slowest joiner rank's bytes per transfer second (0: none measured)."""
        rates = [r.bytes / r.seconds for r in self.joiner_reports.values() if r.seconds > 0]
        return min(rates, default=0.0)

    def bandwidth_bps(self) -> float:
        """The joiner's bytes over its slowest rank's seconds (0: none measured)."""
        secs = max((r.seconds for r in self.joiner_reports.values()), default=0.0)
        nbytes = sum(r.bytes for r in self.joiner_reports.values())
        return nbytes / secs if secs > 0 and nbytes > 0 else 0.0


@dataclass(slots=True)
class Round:
    """One joining replica's recovery: the plans tried, and its final answer once it has one."""

    joiner: str
    started: float
    world_size: int
    fence_steps: int
    excluded: set[str] = field(default_factory=set)
    attempts: int = 0
    plan: LivePlan | None = None
    final: Answer | None = None
    told: set[int] = field(default_factory=set)
    last_failure: str = ""
    waiting: str = ""


class PlanObserver(Protocol):
    """What a planner reports as it goes (metrics)."""

    def decision(self, result: str, seconds: float) -> None:
        """A donor decision: ``plan`` (a plan made), ``fresh`` (nothing to recover
        from: no replica holds this state yet) or ``no_donor`` (state exists, but
        no replica can donate it, or every attempt failed)."""

    def plan_finished(
        self,
        result: str,
        *,
        phases: Mapping[str, float],
        end_to_end_s: float,
        nbytes: int,
        rank_bytes_per_s: float = 0.0,
    ) -> None:
        """A plan ended: ``done`` or ``failed`` (``rank_bytes_per_s``: the slowest
        joiner rank's rate)."""
