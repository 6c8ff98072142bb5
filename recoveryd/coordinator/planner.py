"""Recovery rounds and plans: the coordinator's state machine, on plain data.

A *round* starts when a joining replica's first rank asks to recover, and ends
when every rank of the replica has been given the same final answer: ``done``
at one step, or ``no_donor``. Within a round, plans are tried one after the
other (at most ``max_attempts``); each names one donor replica for all ranks,
or up to ``max_donors`` of them (a striped plan: each sends a part).

A plan is ``preparing`` until every donor rank has joined the transfer group
and acknowledged the step it is at, then ``armed`` at a fenced step, then
``done`` when every joiner rank has reported success, or ``failed`` (a report
of failure, a timeout, the donor turning unhealthy, or a rank restarting).
After a failure the next ``recover`` call makes the next plan: a failing donor
is excluded for the rest of the round, and a donor rank that overshot the
fence widens it instead. A donor of a striped plan lost after the fence does
not fail it while another donor is left: the joiner takes its part from them
(*resume*); the plan fails, and the next one is made, only when none is.

Nothing here blocks or talks to the network; orders for donor ranks go out
through the ``send`` callback, and the clock is injectable.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Mapping

from recoveryd.coordinator.config import CoordinatorConfig
from recoveryd.coordinator.membership import Membership, ReplicaView
from recoveryd.coordinator.plans import LivePlan, PlanBook, PlanObserver, Round
from recoveryd.coordinator.policy import (
    choose_donors,
    fence_ahead,
    make_plan,
    why_no_donor,
)
from recoveryd.errors import UnknownMemberError
from recoveryd.protocol import Answer, MemberInfo, Order, PlanSnapshot, Report

logger = logging.getLogger(__name__)


class Planner:
    """Runs every replica's recovery round.

    Args:
        membership: who is registered, and their health.
        config: timeouts, fences, attempts.
        send: delivers an order to one donor rank (replica id, group rank).
        clock: seconds on a monotonic clock (injectable for tests).
    """

    def __init__(
        self,
        membership: Membership,
        config: CoordinatorConfig,
        *,
        send: Callable[[str, int, Order], None],
        clock: Callable[[], float] = time.monotonic,
        namespace: str = "",
        first_plan_id: int = 1,
        observer: PlanObserver | None = None,
    ) -> None:
        self._members = membership
        self._observer = observer
        # Rendezvous keys outlive a coordinator (they live in the donors'
        # stores): a restarted coordinator names its plans apart.
        self._namespace = namespace
        self._config = config
        self._send = send
        self._clock = clock
        self._ids = itertools.count(first_plan_id)
        self._rounds: dict[str, Round] = {}
        self._plans = PlanBook(config.recent_plans)
        self._bandwidth_bps: dict[str, float] = {}
        self._stepped: set[str] = set()
        """Layout fingerprints some replica held a step with, since this coordinator
        started: a replica of one of them that finds no donor lost live state."""
        self._started = clock()
        self.version = 0
        """Bumped by every change a waiting joiner could care about (long polls wait on it)."""

    # ---- membership events -------------------------------------------------

    def on_register(self, info: MemberInfo, *, restarted: bool) -> None:
        """A rank registered; if it restarted, the plans it took part in are void.

        A donor rank that restarted lost its orders. A joiner rank that
        restarted after it was handed its plan will never finish it; one that
        had not been handed it yet (its replica's other ranks started first)
        simply joins the plan under way.
        """
        if not restarted:
            return
        rid = info.replica_id
        self._void(rid, f"rank {info.group_rank} of {rid!r} restarted", info.group_rank)
        rnd = self._rounds.get(info.replica_id)
        if rnd is not None and rnd.final is not None:
            self._rounds.pop(info.replica_id, None)  # a finished round: the next ask starts anew

    def on_leave(self, replica_id: str, group_rank: int) -> None:
        """A rank left on purpose: the plans it took part in are void."""
        self.version += 1
        self._void(replica_id, f"rank {group_rank} of {replica_id!r} left", None)
        if self._members.replica(replica_id) is None:
            self._rounds.pop(replica_id, None)

    def _void(self, replica_id: str, who: str, restarted: int | None) -> None:
        """Ends the plans a replica's rank takes part in (as a donor: the plan may go
        on without it; as a joiner: once handed the plan, when it ``restarted``)."""
        for plan in list(self._plans.active.values()):
            if replica_id in plan.plan.donors:
                self._lose(plan, replica_id, who)
            elif replica_id == plan.plan.joiner and restarted in (None, *plan.handed):
                self._fail(plan, who, blame=None)
                if restarted is not None:
                    self._rounds.pop(replica_id, None)

    # ---- joiner side --------------------------------------------------------

    def recover(self, replica_id: str, group_rank: int, *, received_plan_id: int = 0) -> Answer:
        """Answers a joining rank: no donor, wait, transfer (with the plan), or done.

        Raises:
            UnknownMemberError: the rank is not registered.
        """
        member = self._members.member(replica_id, group_rank)
        if member is None:
            raise UnknownMemberError(replica_id, group_rank)
        self.tick()
        now = self._clock()
        rnd = self._rounds.get(replica_id)
        done = self._plans.finished(received_plan_id) if received_plan_id else None
        if (
            done is not None
            and done.state == "done"
            and done.plan.joiner == replica_id
            and (rnd is None or (rnd.final is not None and group_rank in rnd.told))
        ):
            return done.done_answer()  # the rank received it and asks again: its DONE was lost
        if rnd is not None and rnd.final is not None and group_rank in rnd.told:
            rnd = None  # this rank already has its final answer: it is recovering anew
        if rnd is None:
            rnd = Round(
                joiner=replica_id,
                started=now,
                world_size=member.group_world_size,
                fence_steps=self._config.fence_steps,
            )
            self._rounds[replica_id] = rnd
            self.version += 1
        if rnd.final is None:
            self._advance(rnd)
        if rnd.final is not None:
            rnd.told.add(group_rank)
            if len(rnd.told) >= rnd.world_size:
                del self._rounds[replica_id]
            return rnd.final
        plan = rnd.plan
        if plan is None or plan.state not in ("preparing", "armed"):
            return Answer(state="wait", reason=rnd.waiting)
        if received_plan_id == plan.plan.plan_id or group_rank >= plan.world_size:
            return Answer(state="wait", plan_id=plan.plan.plan_id, donor=plan.plan.donor)
        plan.handed.add(group_rank)
        return plan.transfer_answer(group_rank)

    def _advance(self, rnd: Round) -> None:
        """Gives a round a live plan, or its final answer."""
        plan = rnd.plan
        if plan is not None and plan.state in ("preparing", "armed"):
            return
        if plan is not None and plan.state == "done":
            self.version += 1
            rnd.final = plan.done_answer()
            return
        decided = time.perf_counter()
        if rnd.attempts >= self._config.max_attempts:
            self.version += 1
            rnd.final = Answer(
                state="no_donor",
                reason=f"{rnd.attempts} plans failed; the last: {rnd.last_failure}",
            )
            self._decided("no_donor", decided)
            return
        joiner = self._members.replica(rnd.joiner)
        assert joiner is not None
        replicas = self._members.replicas()
        donors = choose_donors(
            joiner,
            replicas.values(),
            max_donors=1
            if rnd.single or joiner.device_kinds == {"cuda"}
            else self._config.max_donors,
            inflight=self.inflight(),
            bandwidth_bps=self._bandwidth_bps,
            exclude=rnd.excluded,
            step_slack=self._config.fence_steps,
        )
        if not donors:
            up = self._clock() - self._started
            if up < self._config.warmup.total_seconds() and not rnd.excluded:
                rnd.waiting = (
                    f"the coordinator started {up:.1f} s ago; waiting "
                    f"{self._config.warmup.total_seconds():g} s for replicas to register again"
                )
                return
            self.version += 1
            self._remember_steps(replicas)
            fresh, reason = why_no_donor(
                joiner,
                replicas,
                excluded=rnd.excluded,
                last_failure=rnd.last_failure,
                stepped=self._stepped,
            )
            rnd.final = Answer(state="no_donor", reason=reason, fresh=fresh)
            self._decided("fresh" if fresh else "no_donor", decided)
            return
        self.version += 1
        rnd.waiting = ""
        rnd.attempts += 1
        kinds = joiner.device_kinds.union(*(d.device_kinds for d in donors))
        plan = LivePlan(
            plan=make_plan(next(self._ids), joiner, donors, bandwidth_bps=self._bandwidth_bps),
            attempt=rnd.attempts,
            created=self._clock(),
            round_started=rnd.started,
            timeout_s=self._config.transfer_timeout.total_seconds(),
            backend="nccl" if kinds == {"cuda"} else "gloo",
            world_size=joiner.world_size,
        )
        plan.prefix = "/".join(
            p for p in ("recoveryd", self._namespace, "plan", str(plan.plan.plan_id)) if p
        )
        rnd.plan = plan
        self._plans.active[plan.plan.plan_id] = plan
        self._decided("plan", decided)
        self._send_all(plan.orders("prepare"))

    def _decided(self, result: str, since: float) -> None:
        if self._observer is not None:
            self._observer.decision(result, time.perf_counter() - since)

    def _remember_steps(self, replicas: Mapping[str, ReplicaView]) -> None:
        """Notes the layouts some replica holds a step with (see ``_stepped``)."""
        for v in replicas.values():
            if v.step is not None and v.fingerprint is not None:
                self._stepped.add(v.fingerprint)

    # ---- donor side -------------------------------------------------------------

    def acknowledge(
        self,
        plan_id: int,
        replica_id: str,
        group_rank: int,
        step: int,
        *,
        idle: bool = False,
        step_time_s: float = 0.0,
    ) -> bool:
        """A donor rank joined the plan's group at ``step``; returns whether the plan is live.

        ``idle``: the rank is parked at ``step`` (it will not pass another
        boundary); when every donor rank is, the fence is their step.
        ``step_time_s``: the rank's recent seconds per step (0: unknown).
        """
        plan = self._plans.active.get(plan_id)
        if plan is None or not plan.has_donor_rank(replica_id, group_rank):
            return False
        if plan.state == "preparing":
            self.version += 1
            if plan.acknowledge((replica_id, group_rank), step, idle=idle, step_time_s=step_time_s):
                rnd = self._rounds.get(plan.plan.joiner)
                ahead = fence_ahead(
                    rnd.fence_steps if rnd else self._config.fence_steps,
                    step_time_s=plan.step_time_s,
                    fence_time=self._config.fence_time,
                    max_fence_steps=self._config.max_fence_steps,
                )
                for donor, why in plan.arm(ahead):  # parked below the fence: never at it
                    self._lose(plan, donor, why)
                self._send_all(plan.orders("arm"))
        return True

    # ---- both sides -------------------------------------------------------------

    def report(self, report: Report) -> None:
        """Records one side's outcome; a failure fails the plan, the last success ends it."""
        plan = self._plans.get(report.plan_id)
        if plan is None or not plan.record(report):
            return
        self.version += 1
        if plan.state in ("done", "failed"):
            return  # a late report: kept for its timings only
        if report.result != "ok":
            if report.role == "donor" and plan.plan.striped and plan.state == "armed":
                return  # its send failed (or the joiner refused it): the joiner's report decides
            who = f"{report.role} rank {report.group_rank} ({report.replica_id!r})"
            blame, narrow = plan.verdict(report) if report.role == "joiner" else (None, False)
            self._fail(
                plan,
                f"{who}: {report.result}",
                detail=report.message,
                blame=blame,
                widen=report.result == "step_mismatch",
                narrow=narrow,
            )
            return
        if report.role == "joiner":
            ok = [r for r in plan.joiner_reports.values() if r.result == "ok"]
            if len(ok) == plan.world_size:
                self._finish(plan)

    def _finish(self, plan: LivePlan) -> None:
        plan.state = "done"
        plan.ended = self._clock()
        self._plans.retire(plan)
        if self._observer is not None:
            snap = plan.snapshot(self._clock())
            self._observer.plan_finished(
                "done",
                phases=snap.phases,
                end_to_end_s=snap.recovery_s,
                nbytes=snap.bytes,
                rank_bytes_per_s=plan.slowest_rank_bps(),
            )
        if plan.plan.striped:  # a donor the joiner left out may still hold its order
            self._send_all(plan.orders("cancel"))
        for donor, seen in plan.bandwidth_bps().items():
            old = self._bandwidth_bps.get(donor)
            self._bandwidth_bps[donor] = seen if old is None else 0.5 * (old + seen)
        rnd = self._rounds.get(plan.plan.joiner)
        if rnd is not None and rnd.plan is plan:
            self._advance(rnd)

    def _lose(self, plan: LivePlan, donor: str, why: str) -> None:
        """A donor of ``plan`` failed or went away: the plan goes on without it
        when it can (see :meth:`LivePlan.can_lose`), else fails blaming it."""
        if not plan.live or donor in plan.lost:
            return
        if not plan.can_lose(donor):
            self._fail(plan, why, blame=donor)
            return
        self.version += 1
        logger.warning("plan %d: donor %r lost after the fence (%s); the other donors send "
                       "its part", plan.plan.plan_id, donor, why)  # fmt: skip
        # One that has not sent yet must not start now: the joiner stops waiting for it.
        self._send_all(plan.orders("cancel", only=donor))
        plan.lost[donor] = why

    def _fail(
        self,
        plan: LivePlan,
        reason: str,
        *,
        blame: str | None,
        widen: bool = False,
        narrow: bool = False,
        detail: str = "",
    ) -> None:
        """Fails a plan: ``reason`` is for anyone (status), ``detail`` (an agent's
        message: it may name the state's paths) for the joiner's final answer only;
        ``blame``: the donor left out of the round's next plans; ``widen``: fence
        them further ahead; ``narrow``: one donor each (a striped plan failed and
        no donor is known to be at fault)."""
        self.version += 1
        plan.state = "failed"
        plan.reason = reason
        plan.ended = self._clock()
        self._plans.retire(plan)
        if self._observer is not None:
            self._observer.plan_finished("failed", phases={}, end_to_end_s=0.0, nbytes=0)
        self._send_all(plan.orders("cancel"))
        rnd = self._rounds.get(plan.plan.joiner)
        if rnd is None or rnd.plan is not plan:
            return
        rnd.last_failure = f"{reason}: {detail}" if detail else reason
        rnd.excluded.update(plan.lost)  # donors that failed on the way, as well
        if blame is not None:
            rnd.excluded.add(blame)
        if narrow and plan.plan.striped:
            rnd.single = True
        if widen:
            rnd.fence_steps = min(2 * rnd.fence_steps, self._config.max_fence_steps)

    def _send_all(self, orders: list[tuple[str, int, Order]]) -> None:
        for replica_id, group_rank, order in orders:
            self._send(replica_id, group_rank, order)

    # ---- time -------------------------------------------------------------------

    def housekeep(self) -> None:
        """Forgets ranks silent for ``forget_after`` (a walk over every rank: call it
        from a timer, not on a request's path)."""
        self._remember_steps(self._members.replicas())
        gone = self._members.expire(self._config.forget_after)
        if gone:
            self.version += 1
            for rid in {rid for rid, _ in gone}:
                if self._members.replica(rid) is None:
                    self._rounds.pop(rid, None)

    def tick(self) -> None:
        """Fails plans that ran out of time or lost their donor."""
        now = self._clock()
        prepare_s = self._config.prepare_timeout.total_seconds()
        for plan in list(self._plans.active.values()):
            for d in plan.plan.donors:
                donor = self._members.replica(d)
                if plan.live and d not in plan.lost and (donor is None or not donor.healthy):
                    self._lose(plan, d, f"donor {d!r} became unhealthy")
            if not plan.live:
                continue
            late = plan.overdue(now - plan.created, prepare_s)
            if late is not None:  # a striped plan out of time, no donor named: one each
                self._fail(plan, late[0], blame=late[1], narrow=late[1] is None)

    def orders_for(self, replica_id: str, group_rank: int) -> list[Order]:
        """The orders a donor rank should hold now (replayed when it watches again)."""
        return self._plans.orders_for(replica_id, group_rank)

    # ---- views ------------------------------------------------------------------

    def inflight(self) -> dict[str, int]:
        """Plans not finished yet, by donor replica (a striped plan counts for each)."""
        return self._plans.inflight()

    def plans_in_flight(self) -> int:
        """Plans not finished yet."""
        return len(self._plans.active)

    def recovering(self) -> set[str]:
        """Replicas in a recovery round without a final answer."""
        return {rid for rid, rnd in self._rounds.items() if rnd.final is None}

    def active(self) -> list[PlanSnapshot]:
        """Plans not finished yet, oldest first."""
        return [p.snapshot(self._clock()) for p in self._plans.active.values()]

    def recent(self, n: int) -> list[PlanSnapshot]:
        """Up to ``n`` finished plans, newest first."""
        return [p.snapshot(self._clock()) for p in self._plans.newest(n)]

    def plan(self, plan_id: int) -> PlanSnapshot | None:
        """One plan, active or recent."""
        p = self._plans.get(plan_id)
        return p.snapshot(self._clock()) if p is not None else None
