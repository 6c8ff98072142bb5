"""A plan as it runs and a joiner's round, as plain data the planner keeps and mutates.

:class:`LivePlan` is one :class:`~recoveryd.coordinator.policy.RecoveryPlan`
under way (its acknowledgements, fence, reports and timings); :class:`Round`
is one joining replica's recovery across its plans. Both are the planner's
own bookkeeping; what leaves it are :class:`~recoveryd.protocol.PlanSnapshot`
and :class:`~recoveryd.protocol.Answer`.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from recoveryd.coordinator.policy import RecoveryPlan, fence
from recoveryd.protocol import (
    Answer,
    DonorShare,
    Order,
    PlanSnapshot,
    PlanState,
    Report,
    StripeSource,
)

NOT_THE_DONORS = ("step_mismatch", "untrusted")
"""A joiner's failures that do not exclude the donor: an overshot fence (the next
plan fences wider), a stranger on the group (the donor is innocent of it)."""


@dataclass(slots=True)
class LivePlan:
    """A :class:`RecoveryPlan` as it runs: its state, fence, acknowledgements and reports.

    Donor ranks are keyed ``(donor replica, group rank)``: a striped plan has
    ``world_size`` of them per donor.
    """

    plan: RecoveryPlan
    attempt: int
    created: float
    round_started: float
    timeout_s: float
    backend: str
    world_size: int
    state: PlanState = "preparing"
    step: int | None = None
    acks: dict[tuple[str, int], int] = field(default_factory=dict)
    idle: set[tuple[str, int]] = field(default_factory=set)
    step_time_s: float = 0.0
    handed: set[int] = field(default_factory=set)
    joiner_reports: dict[int, Report] = field(default_factory=dict)
    donor_reports: dict[tuple[str, int], Report] = field(default_factory=dict)
    lost: dict[str, str] = field(default_factory=dict)
    """Donors of a striped plan lost after the fence, and why: the others send their part."""
    reason: str = ""
    ended: float | None = None

    prefix: str = ""
    key: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)
    """The plan's key: only its parties learn it, over their authenticated calls."""

    @property
    def donor_ranks(self) -> int:
        """How many donor ranks take part (every rank of every donor)."""
        return self.world_size * len(self.plan.stripes)

    def prefix_of(self, donor: str) -> str:
        """The key prefix of ``donor``'s groups (each donor hosts its own store)."""
        k = self.plan.donors.index(donor)
        return self.prefix if k == 0 else f"{self.prefix}/d{k}"

    def has_donor_rank(self, replica_id: str, group_rank: int, *, lost_too: bool = False) -> bool:
        """Whether rank ``group_rank`` of ``replica_id`` sends in this plan (or did,
        before it was lost: ``lost_too``)."""
        return (
            replica_id in self.plan.donors
            and (lost_too or replica_id not in self.lost)
            and 0 <= group_rank < self.world_size
        )

    def record(self, report: Report) -> bool:
        """Keeps a party's report; ``False`` (and not kept): not a party to this plan
        (e.g. a report from before a restart), or a success at another step than
        the plan's, or before it was armed, which cannot count."""
        if report.role == "joiner":
            if report.replica_id != self.plan.joiner or report.group_rank >= self.world_size:
                return False
            if report.result == "ok" and (report.step != self.step or self.state != "armed"):
                return False
            self.joiner_reports[report.group_rank] = report
            return True
        if not self.has_donor_rank(report.replica_id, report.group_rank, lost_too=True):
            return False
        self.donor_reports[(report.replica_id, report.group_rank)] = report
        return True

    def acknowledge(
        self, who: tuple[str, int], step: int, *, idle: bool, step_time_s: float
    ) -> bool:
        """Donor rank ``who`` is in its group at ``step``; returns whether every donor
        rank now is (``idle``: parked there; ``step_time_s``: its recent step time)."""
        self.acks[who] = step
        self.step_time_s = max(self.step_time_s, step_time_s)
        if idle:
            self.idle.add(who)
        else:
            self.idle.discard(who)
        return len(self.acks) == self.donor_ranks

    def orders(
        self, kind: Literal["prepare", "arm", "cancel"], *, only: str | None = None
    ) -> list[tuple[str, int, Order]]:
        """``(donor, group rank, order)`` for every rank of every donor still in the
        plan (``only``: of that donor alone, if it is)."""
        return [
            (d, r, self.order(kind, d))
            for d in self.plan.donors
            if d not in self.lost and (only is None or d == only)
            for r in range(self.world_size)
        ]

    def order(self, kind: Literal["prepare", "arm", "cancel"], donor: str) -> Order:
        """This plan's order of ``kind`` for ``donor``'s ranks."""
        if kind == "cancel":
            return Order(kind="cancel", plan_id=self.plan.plan_id, joiner=self.plan.joiner)
        return Order(
            kind=kind,
            plan_id=self.plan.plan_id,
            joiner=self.plan.joiner,
            step=self.step if kind == "arm" else None,
            timeout_s=self.timeout_s,
            rendezvous_prefix=self.prefix_of(donor),
            backend=self.backend,
            plan_key=self.key,
        )

    def can_lose(self, donor: str) -> bool:
        """Whether losing ``donor`` now leaves the plan alive: it is striped, armed
        (the joiner's ranks receive, or are about to, from every donor at the
        fenced step, and take a lost donor's part from the others), and
        another donor is still there."""
        return (
            self.plan.striped
            and self.state == "armed"
            and any(d != donor and d not in self.lost for d in self.plan.donors)
        )

    @property
    def live(self) -> bool:
        """Whether the plan is still under way (preparing or armed)."""
        return self.state in ("preparing", "armed")

    def overdue(self, age_s: float, prepare_s: float) -> tuple[str, str | None] | None:
        """Why the plan, ``age_s`` old, ran out of time, and the donor that blames
        (``None``: it is not on time)."""
        if self.state == "preparing" and age_s > prepare_s:
            missing = {
                d: [r for r in range(self.world_size) if (d, r) not in self.acks]
                for d in self.plan.donors
            }
            late = {d: ranks for d, ranks in missing.items() if ranks}
            said = "; ".join(
                f"{ranks}" + (f" of {d!r}" if self.plan.striped else "")
                for d, ranks in late.items()
            )
            return (
                f"donor ranks {said} did not join the transfer group within {prepare_s:g} s",
                next(iter(late)),
            )
        if age_s > self.timeout_s:
            # One donor: it was too slow. Several: the next plans take one each.
            return (
                f"not finished within {self.timeout_s:g} s",
                None if self.plan.striped else self.plan.donor,
            )
        return None

    def verdict(self, report: Report) -> tuple[str | None, bool]:
        """What a joiner's failure says of the donors: the one the round's next plans
        leave out (if any), and whether they take one donor each.

        An overshot fence or a stranger on the group is no donor's fault. One
        donor: it is left out. Striped: the donor the joiner names, if it is
        one of the plan's; when it names none, the next plans take one donor
        each (a bad one among several then shows, and is left out).
        """
        if report.result in NOT_THE_DONORS:
            return None, False
        if not self.plan.striped:
            return self.plan.donor, False
        if report.blame in self.plan.donors:
            return report.blame, False
        return None, True

    def arm(self, ahead: int) -> list[tuple[str, str]]:
        """Fences the plan ``ahead`` steps past its furthest donor rank (at its step
        when every donor rank is parked) and arms it.

        Returns:
            The donors of a striped plan with a rank parked below the fence
            (it can never send at it), and why, when another donor can: the
            caller drops them. Empty for one donor: as before striping, the
            joiner refuses the step and the plan is made again.
        """
        parked = len(self.idle) == self.donor_ranks
        self.step = fence(self.acks.values(), 0 if parked else ahead)
        self.state = "armed"
        behind = {
            d: self.acks[(d, r)]
            for d, r in sorted(self.idle)
            if self.acks[(d, r)] < self.step and d in self.plan.donors
        }
        if not self.plan.striped or len(behind) == len(self.plan.donors):
            return []
        return [
            (d, f"parked at step {at}, below the fence {self.step}") for d, at in behind.items()
        ]

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
            donors=tuple(self._donor_share(s.donor, s.share) for s in p.plan.stripes),
        )

    def _donor_share(self, donor: str, share: float) -> DonorShare:
        reports = [r for (d, _), r in self.donor_reports.items() if d == donor]
        failed = [r.result for r in reports if r.result != "ok"]
        if donor in self.lost:
            state = "lost"
        elif failed:
            state = failed[0]
        elif reports and len(reports) == self.world_size:
            state = "ok"
        else:
            state = ""
        return DonorShare(
            replica_id=donor, share=share, bytes=sum(r.bytes for r in reports), state=state
        )

    def done_answer(self) -> Answer:
        """What a joiner rank is told once every rank of the joiner has the state."""
        assert self.step is not None
        return Answer(
            state="done", plan_id=self.plan.plan_id, donor=self.plan.donor, step=self.step
        )

    def transfer_answer(self, group_rank: int) -> Answer:
        """What joiner rank ``group_rank`` is told while the plan runs (the step once
        armed); a striped plan's donors lost so far are left out of it."""
        live = [s for s in self.plan.stripes if s.donor not in self.lost]
        return Answer(
            state="transfer",
            plan_id=self.plan.plan_id,
            donor=live[0].donor,
            step=self.step,
            rendezvous=live[0].pairs[group_rank].donor_rendezvous,
            rendezvous_prefix=self.prefix_of(live[0].donor),
            timeout_s=self.timeout_s,
            backend=self.backend,
            plan_key=self.key,
            stripes=tuple(
                StripeSource(
                    donor=s.donor,
                    rendezvous=s.pairs[group_rank].donor_rendezvous,
                    rendezvous_prefix=self.prefix_of(s.donor),
                    share=s.share,
                )
                for s in live
            )
            if self.plan.striped
            else (),
        )

    def slowest_rank_bps(self) -> float:
        """The slowest joiner rank's bytes per transfer second (0: none measured)."""
        rates = [r.bytes / r.seconds for r in self.joiner_reports.values() if r.seconds > 0]
        return min(rates, default=0.0)

    def bandwidth_bps(self) -> dict[str, float]:
        """The bandwidth seen from each donor (absent: none measured).

        One donor: the joiner's bytes over its slowest rank's seconds. Striped:
        each donor's bytes sent over its slowest rank's data phase (a donor
        done early then waits for the others: that wait is not its link's).
        """
        if self.lost:  # the survivors resent its part after their own data phase
            return {}
        if not self.plan.striped:
            secs = max((r.seconds for r in self.joiner_reports.values()), default=0.0)
            nbytes = sum(r.bytes for r in self.joiner_reports.values())
            return {self.plan.donor: nbytes / secs} if secs > 0 and nbytes > 0 else {}
        out: dict[str, float] = {}
        for donor in self.plan.donors:
            rates = [
                r.bytes / r.phases["data"]
                for (d, _), r in self.donor_reports.items()
                if d == donor and r.result == "ok" and r.bytes and r.phases.get("data", 0) > 0
            ]
            if rates and donor not in self.lost:
                out[donor] = self.world_size * min(rates)
        return out


class PlanBook:
    """The plans a planner holds: those under way, and the last ``keep`` finished."""

    def __init__(self, keep: int) -> None:
        self._keep = keep
        self.active: dict[int, LivePlan] = {}
        """Plans under way, by id (oldest first)."""
        self._recent: OrderedDict[int, LivePlan] = OrderedDict()

    def get(self, plan_id: int) -> LivePlan | None:
        """A plan under way or recently finished."""
        return self.active.get(plan_id) or self._recent.get(plan_id)

    def finished(self, plan_id: int) -> LivePlan | None:
        """A recently finished plan."""
        return self._recent.get(plan_id)

    def newest(self, n: int) -> list[LivePlan]:
        """Up to ``n`` finished plans, newest first."""
        return list(self._recent.values())[::-1][:n]

    def retire(self, plan: LivePlan) -> None:
        """Moves a plan that ended to the finished ones (forgetting the oldest)."""
        self.active.pop(plan.plan.plan_id, None)
        self._recent[plan.plan.plan_id] = plan
        while len(self._recent) > self._keep:
            self._recent.popitem(last=False)

    def inflight(self) -> dict[str, int]:
        """Plans under way, by donor replica (a striped plan counts for each donor left)."""
        out: dict[str, int] = {}
        for plan in self.active.values():
            for donor in plan.plan.donors:
                if donor not in plan.lost:
                    out[donor] = out.get(donor, 0) + 1
        return out

    def orders_for(self, replica_id: str, group_rank: int) -> list[Order]:
        """The orders a donor rank should hold now (replayed when it watches again)."""
        out: list[Order] = []
        for plan in self.active.values():
            kinds: tuple[Literal["prepare", "arm"], ...] = (
                ("prepare", "arm") if plan.state == "armed" else ("prepare",)
            )
            for kind in kinds:
                out += [o for _, r, o in plan.orders(kind, only=replica_id) if r == group_rank]
        return out


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
    single: bool = False
    """A striped plan of this round failed with no donor to blame: the next ones
    take one donor (a bad one among several then shows, and is left out)."""


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
