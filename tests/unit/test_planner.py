"""Recovery rounds and plans (the coordinator's Planner), on plain data with a fake clock."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import timedelta

import pytest

from recoveryd.coordinator.config import CoordinatorConfig
from recoveryd.coordinator.membership import Membership
from recoveryd.coordinator.planner import Planner
from recoveryd.errors import ConfigError, UnknownMemberError
from recoveryd.protocol import MemberInfo, Order, Report


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Coord:
    """A planner with its membership, fake clock and a record of every order sent."""

    clock: Clock
    members: Membership
    planner: Planner
    sent: list[tuple[str, int, Order]] = field(default_factory=list)

    def join(
        self,
        rid: str,
        *,
        world: int = 2,
        step: int | None = 10,
        device: str = "cpu",
        fp: str = "L",
        agent: str = "",
    ) -> None:
        """Registers every rank of ``rid`` the way the servicer does."""
        for r in range(world):
            self.register(rid, r, world=world, step=step, device=device, fp=fp, agent=agent)

    def register(
        self,
        rid: str,
        rank: int,
        *,
        world: int = 2,
        step: int | None = None,
        device: str = "cpu",
        fp: str = "L",
        agent: str = "",
    ) -> bool:
        info = MemberInfo(
            replica_id=rid,
            group_rank=rank,
            group_world_size=world,
            layout_fingerprint=fp,
            device_kind=device,
            rendezvous=f"{rid}-{rank}:29500",
            agent_id=agent,
        )
        restarted = self.members.register(info, step=step)
        self.planner.on_register(info, restarted=restarted)
        return restarted

    def beat(self, rid: str, *, world: int = 2, step: int | None = None) -> None:
        for r in range(world):
            self.members.heartbeat(rid, r, step=step, healthy=True)

    def ack(self, plan_id: int, donor: str, steps: list[int], *, idle: bool = False) -> None:
        for r, s in enumerate(steps):
            assert self.planner.acknowledge(plan_id, donor, r, s, idle=idle)

    def ok(self, plan_id: int, joiner: str, rank: int, **kw: object) -> None:
        """A joiner rank's success, at the plan's step unless ``step=`` says otherwise."""
        if "step" not in kw:
            snap = self.planner.plan(plan_id)
            kw["step"] = snap.step if snap is not None else None
        self.planner.report(
            Report(
                plan_id=plan_id,
                replica_id=joiner,
                group_rank=rank,
                role="joiner",
                result="ok",
                **kw,  # type: ignore[arg-type]
            )
        )

    def fail(self, plan_id: int, joiner: str, result: str, rank: int = 0) -> None:
        self.planner.report(
            Report(
                plan_id=plan_id,
                replica_id=joiner,
                group_rank=rank,
                role="joiner",
                result=result,
                message="boom",
            )
        )

    def kinds(self) -> list[tuple[str, int, str]]:
        return [(rid, r, o.kind) for rid, r, o in self.sent]


def _coord(config: CoordinatorConfig | None = None, *, warmup: float = 0.0) -> Coord:
    config = dataclasses.replace(config or CoordinatorConfig(), warmup=timedelta(seconds=warmup))
    clock = Clock()
    members = Membership(heartbeat_timeout=config.heartbeat_timeout, clock=clock)
    sent: list[tuple[str, int, Order]] = []
    planner = Planner(members, config, send=lambda rid, r, o: sent.append((rid, r, o)), clock=clock)
    return Coord(clock=clock, members=members, planner=planner, sent=sent)


@pytest.fixture
def c() -> Coord:
    return _coord()


def test_first_replica_has_no_donor(c: Coord) -> None:
    c.join("j", step=None)
    a = c.planner.recover("j", 0)
    assert a.state == "no_donor"
    assert "first replica" in a.reason
    assert "no other replica is registered" in a.reason
    assert c.sent == []


def test_replica_of_another_layout_is_no_donor(c: Coord) -> None:
    c.join("j", step=None)
    c.join("other", step=10, fp="X")
    a = c.planner.recover("j", 0)
    assert a.state == "no_donor"
    assert "1 other replica(s) hold a step, none with this state layout" in a.reason
    assert a.fresh is False
    assert "different model, optimizer, sharding or dtypes" in a.reason


def test_same_layout_without_a_step_is_no_donor(c: Coord) -> None:
    c.join("j", step=None)
    c.join("fresh", step=None)
    a = c.planner.recover("j", 0)
    assert a.state == "no_donor"
    assert "none holding a step yet" in a.reason


def test_unknown_rank_must_register(c: Coord) -> None:
    with pytest.raises(UnknownMemberError):
        c.planner.recover("ghost", 0)


def test_each_plan_has_its_own_key_for_its_parties_only(c: Coord) -> None:
    c.join("d1", step=10)
    c.join("d2", step=10)
    c.join("j", step=None)
    first = c.planner.recover("j", 0)
    prepares = [o for _, _, o in c.sent if o.kind == "prepare"]
    assert len(first.plan_key) == 32
    assert {o.plan_key for o in prepares} == {first.plan_key}  # every donor rank, the same key
    c.fail(first.plan_id, "j", "peer_lost")
    second = c.planner.recover("j", 0)
    assert second.plan_id != first.plan_id
    assert len(second.plan_key) == 32
    assert second.plan_key != first.plan_key
    assert "plan_key" not in repr(second)  # never in logs


def test_a_normal_round(c: Coord) -> None:
    c.join("d", step=10)
    c.join("j", step=None)

    a = c.planner.recover("j", 0)
    assert (a.state, a.plan_id, a.donor, a.step) == ("transfer", 1, "d", None)
    assert a.rendezvous == "d-0:29500"
    assert a.rendezvous_prefix == "recoveryd/plan/1"
    assert a.backend == "gloo"
    assert a.timeout_s == 600.0
    prepare = Order(
        kind="prepare",
        plan_id=1,
        joiner="j",
        timeout_s=600.0,
        rendezvous_prefix="recoveryd/plan/1",
        backend="gloo",
    )
    assert c.sent == [("d", 0, prepare), ("d", 1, prepare)]
    assert c.planner.recovering() == {"j"}

    c.sent.clear()
    assert c.planner.acknowledge(1, "d", 0, 10)
    assert c.sent == []  # rank 1 has not joined yet
    assert c.planner.acknowledge(1, "d", 1, 11)
    arm = Order(
        kind="arm",
        plan_id=1,
        joiner="j",
        step=13,  # max(10, 11) + fence_steps (2)
        timeout_s=600.0,
        rendezvous_prefix="recoveryd/plan/1",
        backend="gloo",
    )
    assert c.sent == [("d", 0, arm), ("d", 1, arm)]

    a = c.planner.recover("j", 1)
    assert (a.state, a.plan_id, a.step, a.rendezvous) == ("transfer", 1, 13, "d-1:29500")
    a = c.planner.recover("j", 0)
    assert (a.state, a.step, a.rendezvous) == ("transfer", 13, "d-0:29500")

    c.ok(1, "j", 0)
    c.ok(1, "j", 1)
    snap = c.planner.plan(1)
    assert snap is not None
    assert snap.state == "done"
    for r in (0, 1):
        a = c.planner.recover("j", r, received_plan_id=1)
        assert (a.state, a.plan_id, a.donor, a.step) == ("done", 1, "d", 13)
    assert c.planner.recovering() == set()

    # Every rank was told: the next ask is a new recovery.
    a = c.planner.recover("j", 0)
    assert (a.state, a.plan_id) == ("transfer", 2)


def test_a_rank_that_had_its_answer_starts_a_new_round(c: Coord) -> None:
    c.join("d", step=10)
    c.join("j", step=None)
    c.planner.recover("j", 0)
    c.ack(1, "d", [10, 10])
    c.ok(1, "j", 0)
    c.ok(1, "j", 1)
    assert c.planner.recover("j", 0).state == "done"
    a = c.planner.recover("j", 0)  # rank 0 already had "done": it is recovering anew
    assert (a.state, a.plan_id) == ("transfer", 2)


def test_one_answer_per_round(c: Coord) -> None:
    c.join("j", step=None)
    first = c.planner.recover("j", 0)
    assert first.state == "no_donor"
    c.join("d", step=10)
    # Rank 1 is in the same round: it gets the same answer, so the replica stays consistent.
    assert c.planner.recover("j", 1) == first
    assert c.sent == []
    # Both ranks were told; the next ask starts a round that finds the donor.
    a = c.planner.recover("j", 0)
    assert (a.state, a.donor) == ("transfer", "d")


def test_rank_that_received_the_plan_waits_for_the_others(c: Coord) -> None:
    c.join("d", step=10)
    c.join("j", step=None)
    assert c.planner.recover("j", 0).state == "transfer"
    a = c.planner.recover("j", 0, received_plan_id=1)
    assert (a.state, a.plan_id, a.donor) == ("wait", 1, "d")
    c.ack(1, "d", [10, 10])
    c.planner.recover("j", 1)
    c.ok(1, "j", 0)
    a = c.planner.recover("j", 0, received_plan_id=1)
    assert a.state == "wait"
    c.ok(1, "j", 1)
    a = c.planner.recover("j", 0, received_plan_id=1)
    assert (a.state, a.step) == ("done", 12)


def test_peer_lost_cancels_and_replans_with_another_donor(c: Coord) -> None:
    c.join("d1", step=10)
    c.join("d2", step=10)
    c.join("j", step=None)
    a = c.planner.recover("j", 0)
    assert a.donor == "d1"  # equal donors: the id breaks the tie
    c.sent.clear()

    c.fail(1, "j", "peer_lost")
    cancel = Order(kind="cancel", plan_id=1, joiner="j")
    assert c.sent == [("d1", 0, cancel), ("d1", 1, cancel)]
    snap = c.planner.plan(1)
    assert snap is not None
    assert snap.state == "failed"
    # What status shows names the side and the result, never the agent's own
    # message (it may name the state's paths and shapes).
    assert snap.reason == "joiner rank 0 ('j'): peer_lost"

    c.sent.clear()
    a = c.planner.recover("j", 0)
    assert (a.state, a.plan_id, a.donor) == ("transfer", 2, "d2")
    assert c.kinds() == [("d2", 0, "prepare"), ("d2", 1, "prepare")]
    snap = c.planner.plan(2)
    assert snap is not None
    assert snap.attempt == 2


def test_step_mismatch_keeps_the_donor_and_doubles_the_fence(c: Coord) -> None:
    c.join("d1", step=10)
    c.join("d2", step=10)
    c.join("j", step=None)
    c.planner.recover("j", 0)
    c.ack(1, "d1", [10, 10])
    assert c.sent[-1][2].step == 12

    c.fail(1, "j", "step_mismatch")
    a = c.planner.recover("j", 0)
    assert (a.plan_id, a.donor) == (2, "d1")  # an overshot fence is not the donor's fault
    c.sent.clear()
    c.ack(2, "d1", [20, 21])
    assert [(r, o.kind, o.step) for _, r, o in c.sent] == [(0, "arm", 25), (1, "arm", 25)]

    c.fail(2, "j", "step_mismatch")
    c.planner.recover("j", 0)
    c.ack(3, "d1", [30, 30])
    assert c.sent[-1][2].step == 38


def test_fence_widening_stops_at_max_fence_steps() -> None:
    c = _coord(CoordinatorConfig(fence_steps=2, max_fence_steps=3))
    c.join("d", step=10)
    c.join("j", step=None)
    c.planner.recover("j", 0)
    c.fail(1, "j", "step_mismatch")
    c.planner.recover("j", 0)
    c.fail(2, "j", "step_mismatch")
    c.planner.recover("j", 0)
    c.ack(3, "d", [10, 10])
    assert c.sent[-1][2].step == 13


def test_every_donor_failing_is_no_donor_naming_the_failures(c: Coord) -> None:
    c.join("d1", step=10)
    c.join("d2", step=10)
    c.join("j", step=None)
    c.planner.recover("j", 0)
    c.fail(1, "j", "peer_lost")
    c.planner.recover("j", 0)
    c.fail(2, "j", "timeout")
    a = c.planner.recover("j", 0)
    assert a.state == "no_donor"
    assert "every donor failed this recovery (d1, d2)" in a.reason
    assert "timeout: boom" in a.reason
    assert c.planner.recover("j", 1) == a


def test_max_attempts_bounds_the_plans_of_a_round() -> None:
    c = _coord(CoordinatorConfig(max_attempts=2))
    c.join("d", step=10)
    c.join("j", step=None)
    for plan_id in (1, 2):
        a = c.planner.recover("j", 0)
        assert (a.state, a.plan_id) == ("transfer", plan_id)
        c.fail(plan_id, "j", "step_mismatch")  # the donor stays eligible
    a = c.planner.recover("j", 0)
    assert a.state == "no_donor"
    assert a.reason.startswith("2 plans failed; the last: ")
    assert "step_mismatch" in a.reason


def test_prepare_timeout_fails_the_plan_and_excludes_the_donor() -> None:
    c = _coord(CoordinatorConfig(prepare_timeout=timedelta(seconds=5)))
    c.join("d1", step=10)
    c.join("d2", step=10)
    c.join("j", step=None)
    c.planner.recover("j", 0)
    assert c.planner.acknowledge(1, "d1", 0, 10)
    c.clock.now = 5.0
    c.planner.tick()
    snap = c.planner.plan(1)
    assert snap is not None
    assert snap.state == "preparing"  # not yet past the timeout

    c.sent.clear()
    c.clock.now = 5.5
    c.planner.tick()
    snap = c.planner.plan(1)
    assert snap is not None
    assert snap.state == "failed"
    assert snap.reason == "donor ranks [1] did not join the transfer group within 5 s"
    assert c.kinds() == [("d1", 0, "cancel"), ("d1", 1, "cancel")]
    assert not c.planner.acknowledge(1, "d1", 1, 10)  # too late: the plan is gone
    a = c.planner.recover("j", 0)
    assert (a.plan_id, a.donor) == (2, "d2")


def test_transfer_timeout_fails_an_armed_plan() -> None:
    c = _coord(CoordinatorConfig(transfer_timeout=timedelta(seconds=30)))
    c.join("d", step=10)
    c.join("j", step=None)
    c.planner.recover("j", 0)
    c.ack(1, "d", [10, 10])
    c.clock.now = 31.0
    c.beat("d")
    c.beat("j")
    c.planner.tick()
    snap = c.planner.plan(1)
    assert snap is not None
    assert (snap.state, snap.reason) == ("failed", "not finished within 30 s")


def test_donor_without_heartbeats_fails_its_plan(c: Coord) -> None:
    c.join("d1", step=10)
    c.join("d2", step=10)
    c.join("j", step=None)
    c.planner.recover("j", 0)
    c.clock.now = 9.0
    c.beat("j")
    c.beat("d2", step=10)
    c.planner.tick()
    snap = c.planner.plan(1)
    assert snap is not None
    assert snap.state == "preparing"  # d1 last heard 9 s ago, within the 10 s timeout

    c.clock.now = 10.5
    c.beat("j")
    c.beat("d2", step=10)
    c.planner.tick()
    snap = c.planner.plan(1)
    assert snap is not None
    assert (snap.state, snap.reason) == ("failed", "donor 'd1' became unhealthy")
    a = c.planner.recover("j", 0)
    assert (a.plan_id, a.donor) == (2, "d2")


def test_donor_reporting_itself_unhealthy_fails_its_plan(c: Coord) -> None:
    c.join("d", step=10)
    c.join("j", step=None)
    c.planner.recover("j", 0)
    c.members.heartbeat("d", 1, step=10, healthy=False)
    a = c.planner.recover("j", 0)
    assert a.state == "no_donor"
    assert "every donor failed this recovery (d)" in a.reason
    assert "donor 'd' became unhealthy" in a.reason


def test_restarted_donor_rank_fails_its_plans(c: Coord) -> None:
    c.join("d1", step=10)
    c.join("d2", step=10)
    c.join("j", step=None)
    c.planner.recover("j", 0)
    c.sent.clear()
    assert c.register("d1", 1, step=10, agent="new")
    snap = c.planner.plan(1)
    assert snap is not None
    assert (snap.state, snap.reason) == ("failed", "rank 1 of 'd1' restarted")
    assert c.kinds() == [("d1", 0, "cancel"), ("d1", 1, "cancel")]
    a = c.planner.recover("j", 0)
    assert a.donor == "d2"


def test_restarted_joiner_rank_that_was_handed_the_plan_fails_it(c: Coord) -> None:
    c.join("d", step=10)
    c.join("j", step=None)
    c.planner.recover("j", 0)
    c.sent.clear()
    assert c.register("j", 0, agent="new")
    snap = c.planner.plan(1)
    assert snap is not None
    assert (snap.state, snap.reason) == ("failed", "rank 0 of 'j' restarted")
    assert c.kinds() == [("d", 0, "cancel"), ("d", 1, "cancel")]
    a = c.planner.recover("j", 0)
    # A new round (first attempt), and the donor was not blamed.
    assert (a.state, a.plan_id, a.donor) == ("transfer", 2, "d")
    snap = c.planner.plan(2)
    assert snap is not None
    assert snap.attempt == 1


def test_restarted_joiner_rank_not_yet_handed_the_plan_keeps_it(c: Coord) -> None:
    c.join("d", step=10)
    c.join("j", step=None)
    c.planner.recover("j", 0)
    c.sent.clear()
    assert c.register("j", 1, agent="new")
    snap = c.planner.plan(1)
    assert snap is not None
    assert snap.state == "preparing"
    assert c.sent == []
    a = c.planner.recover("j", 1)
    assert (a.state, a.plan_id) == ("transfer", 1)


def test_reregistering_without_a_restart_keeps_the_plan(c: Coord) -> None:
    c.join("d", step=10)
    c.join("j", step=None)
    c.planner.recover("j", 0)
    assert not c.register("d", 0, step=10)  # same agent id: not a restart
    snap = c.planner.plan(1)
    assert snap is not None
    assert snap.state == "preparing"


def test_idle_donor_ranks_fence_at_their_step(c: Coord) -> None:
    c.join("d", step=10)
    c.join("j", step=None)
    c.planner.recover("j", 0)
    c.sent.clear()
    c.ack(1, "d", [10, 10], idle=True)
    assert [(o.kind, o.step) for _, _, o in c.sent] == [("arm", 10), ("arm", 10)]


def test_one_busy_donor_rank_keeps_the_fence_ahead(c: Coord) -> None:
    c.join("d", step=10)
    c.join("j", step=None)
    c.planner.recover("j", 0)
    assert c.planner.acknowledge(1, "d", 0, 10, idle=True)
    assert c.planner.acknowledge(1, "d", 1, 11)
    assert c.sent[-1][2].step == 13


def test_acknowledgement_from_a_non_donor_or_unknown_plan_is_refused(c: Coord) -> None:
    c.join("d", step=10)
    c.join("j", step=None)
    c.planner.recover("j", 0)
    assert not c.planner.acknowledge(1, "j", 0, 10)
    assert not c.planner.acknowledge(99, "d", 0, 10)
    snap = c.planner.plan(1)
    assert snap is not None
    assert snap.state == "preparing"


def test_cuda_replicas_transfer_over_nccl(c: Coord) -> None:
    c.join("d", step=10, device="cuda")
    c.join("j", step=None, device="cuda")
    a = c.planner.recover("j", 0)
    assert a.backend == "nccl"
    assert {o.backend for _, _, o in c.sent} == {"nccl"}


def test_two_joiners_at_once_spread_over_equal_donors(c: Coord) -> None:
    c.join("d1", step=10)
    c.join("d2", step=10)
    c.join("j1", step=None)
    c.join("j2", step=None)
    assert c.planner.recover("j1", 0).donor == "d1"
    assert c.planner.recover("j2", 0).donor == "d2"  # d1 has one in flight
    assert c.planner.inflight() == {"d1": 1, "d2": 1}
    assert c.planner.recovering() == {"j1", "j2"}


def test_snapshots_of_active_and_recent_plans(c: Coord) -> None:
    c.join("d", step=10)
    c.join("j", step=None)
    c.clock.now = 1.0
    c.planner.recover("j", 0)
    c.fail(1, "j", "step_mismatch")
    c.clock.now = 2.0
    c.planner.recover("j", 0)
    c.ack(2, "d", [10, 10])
    c.clock.now = 5.0
    [active] = c.planner.active()
    assert (active.plan_id, active.joiner, active.donor) == (2, "j", "d")
    assert (active.state, active.step, active.attempt, active.age_s) == ("armed", 14, 2, 3.0)
    assert c.planner.inflight() == {"d": 1}

    c.ok(2, "j", 0, bytes=100, seconds=1.0, phases={"data": 0.5, "verify": 0.2})
    [active] = c.planner.active()
    assert (active.ranks_done, active.bytes, active.recovery_s) == (1, 100, 0.0)
    c.clock.now = 6.0
    c.ok(2, "j", 1, bytes=300, seconds=2.0, phases={"data": 0.7})
    for r, address in ((0, "10.0.0.2:4000"), (1, "10.0.0.1:4000")):
        c.planner.report(  # late donor reports: kept for their addresses
            Report(
                plan_id=2, replica_id="d", group_rank=r, role="donor", result="ok", address=address
            )
        )
    assert c.planner.active() == []
    assert c.planner.inflight() == {}

    done, failed = c.planner.recent(5)
    assert (done.plan_id, done.state, done.ranks_done) == (2, "done", 2)
    assert done.bytes == 400
    assert done.transfer_s == 2.0  # the slowest joiner rank
    assert done.recovery_s == 5.0  # from the round's start (t=1), across both plans
    assert done.phases == {"data": 0.7, "verify": 0.2}
    assert done.addresses == ("10.0.0.1:4000", "10.0.0.2:4000")
    assert (failed.plan_id, failed.state, failed.step) == (1, "failed", None)
    assert [p.plan_id for p in c.planner.recent(1)] == [2]
    assert c.planner.plan(3) is None


def test_recent_plans_are_bounded() -> None:
    c = _coord(CoordinatorConfig(recent_plans=1))
    c.join("d", step=10)
    c.join("j", step=None)
    for plan_id in (1, 2):
        c.planner.recover("j", 0)
        c.fail(plan_id, "j", "step_mismatch")
    assert [p.plan_id for p in c.planner.recent(5)] == [2]
    assert c.planner.plan(1) is None


def test_ack_from_a_rank_outside_the_donor_world_does_not_arm(c: Coord) -> None:
    c.join("d", step=10)
    c.join("j", step=None)
    c.planner.recover("j", 0)
    c.planner.acknowledge(1, "d", 0, 10)
    c.planner.acknowledge(1, "d", 5, 10)
    snap = c.planner.plan(1)
    assert snap is not None
    assert snap.state == "preparing"


def test_no_donor_reason_does_not_call_a_healthy_replica_unhealthy(c: Coord) -> None:
    c.join("j", world=2, step=None)
    c.join("big", world=4, step=10)
    big = c.members.replica("big")
    assert big is not None
    assert big.healthy
    a = c.planner.recover("j", 0)
    assert a.state == "no_donor"
    assert "unhealthy" not in a.reason


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"heartbeat_interval": timedelta(0)}, "heartbeat_interval"),
        ({"heartbeat_timeout": timedelta(seconds=-1)}, "heartbeat_timeout"),
        (
            {"heartbeat_interval": timedelta(seconds=5), "heartbeat_timeout": timedelta(seconds=5)},
            "heartbeat_timeout",
        ),
        ({"prepare_timeout": timedelta(0)}, "prepare_timeout"),
        ({"transfer_timeout": timedelta(seconds=-1)}, "transfer_timeout"),
        ({"fence_steps": 0}, "fence_steps"),
        ({"fence_steps": 9, "max_fence_steps": 8}, "fence_steps"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"recent_plans": -1}, "recent_plans"),
    ],
)
def test_bad_coordinator_config_names_the_field(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(ConfigError) as e:
        CoordinatorConfig(**kwargs)  # type: ignore[arg-type]
    assert e.value.field == name
    assert f"invalid {name}=" in str(e.value)
    assert isinstance(e.value, ValueError)


def test_long_silent_ranks_are_forgotten_and_their_rounds_dropped() -> None:
    c = _coord(
        CoordinatorConfig(
            heartbeat_timeout=timedelta(seconds=5), forget_after=timedelta(seconds=60)
        )
    )
    c.join("gone", step=None)
    assert c.planner.recover("gone", 0).state == "no_donor"
    c.clock.now = 59.0
    c.planner.housekeep()
    view = c.members.replica("gone")
    assert view is not None  # unhealthy, still listed
    assert not view.healthy
    c.clock.now = 61.5
    c.planner.housekeep()
    assert c.members.replica("gone") is None
    assert c.members.rank_count() == 0


def test_a_young_coordinator_tells_joiners_to_wait_not_that_there_is_no_donor() -> None:
    # Just restarted: the donors have not registered again yet.
    c = _coord(warmup=5.0)
    c.join("joiner", step=None)
    early = c.planner.recover("joiner", 0)
    assert early.state == "wait"
    assert "register again" in early.reason
    c.clock.now = 2.0
    c.join("donor", step=10)  # a donor's agent registers again
    got = c.planner.recover("joiner", 0)
    assert got.state == "transfer"
    assert got.donor == "donor"


def test_after_the_warmup_no_donor_is_final() -> None:
    c = _coord(warmup=5.0)
    c.join("joiner", step=None)
    assert c.planner.recover("joiner", 0).state == "wait"
    c.clock.now = 5.5
    assert c.planner.recover("joiner", 0).state == "no_donor"
    assert c.planner.recover("joiner", 1).state == "no_donor"


def test_fast_steps_get_a_fence_far_enough_ahead_in_time() -> None:
    # 10 ms steps: 100 ms of fence_time is 10 steps, more than fence_steps=2.
    c = _coord(CoordinatorConfig(fence_steps=2, fence_time=timedelta(milliseconds=100)))
    c.join("donor", step=50)
    c.join("joiner", step=None)
    plan = c.planner.recover("joiner", 0).plan_id
    for r in range(2):
        assert c.planner.acknowledge(plan, "donor", r, 50, step_time_s=0.01)
    assert c.planner.recover("joiner", 0).step == 60
    # Slow steps (1 s) keep the minimum of fence_steps.
    c2 = _coord(CoordinatorConfig(fence_steps=2, fence_time=timedelta(milliseconds=100)))
    c2.join("donor", step=50)
    c2.join("joiner", step=None)
    plan2 = c2.planner.recover("joiner", 0).plan_id
    for r in range(2):
        assert c2.planner.acknowledge(plan2, "donor", r, 50, step_time_s=1.0)
    assert c2.planner.recover("joiner", 0).step == 52


def test_asking_again_while_nothing_changed_is_not_news() -> None:
    # Held long polls wake on every version change: an unchanged answer must
    # not bump it, or two waiting ranks would wake each other in a loop.
    c = _coord(warmup=5.0)
    c.join("joiner", step=None)
    c.planner.recover("joiner", 0)  # opens the round
    before = c.planner.version
    assert c.planner.recover("joiner", 0).state == "wait"  # warm-up: nobody to ask yet
    assert c.planner.recover("joiner", 1).state == "wait"
    assert c.planner.version == before
    c.join("donor", step=10)
    plan = c.planner.recover("joiner", 0)
    assert plan.state == "transfer"
    before = c.planner.version
    assert c.planner.recover("joiner", 0, received_plan_id=0).state == "transfer"
    assert c.planner.version == before


def test_reports_from_outsiders_or_at_another_step_do_not_count() -> None:
    c = _coord()
    c.join("donor", step=10)
    c.join("joiner", step=None)
    c.join("other", step=None)
    plan = c.planner.recover("joiner", 0).plan_id
    c.ack(plan, "donor", [10, 10])
    c.ok(plan, "other", 0)  # not the plan's joiner
    c.ok(plan, "joiner", 5)  # no such rank
    c.ok(plan, "joiner", 0, step=11)  # not the fenced step (12)
    snap = c.planner.plan(plan)
    assert snap is not None
    assert snap.ranks_done == 0
    assert snap.state == "armed"
    c.ok(plan, "joiner", 0)
    c.ok(plan, "joiner", 1)
    assert c.planner.recover("joiner", 0).state == "done"


def test_a_lost_done_is_answered_again_not_a_new_round() -> None:
    c = _coord()
    c.join("donor", step=10)
    c.join("joiner", step=None)
    plan = c.planner.recover("joiner", 0).plan_id
    c.planner.recover("joiner", 1)
    c.ack(plan, "donor", [10, 10])
    c.ok(plan, "joiner", 0)
    c.ok(plan, "joiner", 1)
    assert c.planner.recover("joiner", 0, received_plan_id=plan).state == "done"
    assert c.planner.recover("joiner", 1, received_plan_id=plan).state == "done"  # round closed
    again = c.planner.recover("joiner", 0, received_plan_id=plan)  # the answer was lost: retry
    assert (again.state, again.plan_id, again.step) == ("done", plan, 12)


def test_ranks_with_different_layouts_match_rank_by_rank() -> None:
    # Pipeline stages: rank 0 and rank 1 hold different layouts.
    c = _coord()
    for rid, step in (("donor", 10), ("joiner", None)):
        for r, fp in enumerate(("stage0", "stage1")):
            c.register(rid, r, step=step, fp=fp)
    got = c.planner.recover("joiner", 0)
    assert (got.state, got.donor) == ("transfer", "donor")


def test_steps_within_the_slack_count_as_equal_and_load_decides() -> None:
    c = _coord(CoordinatorConfig(fence_steps=2))
    c.join("busy", step=101)
    c.join("idle", step=100)
    c.join("j1", step=None)
    c.join("j2", step=None)
    assert c.planner.recover("j1", 0).donor == "busy"  # ahead by one: ties go to the step
    assert c.planner.recover("j2", 0).donor == "idle"  # busy has a transfer in flight


def test_a_rank_watching_again_gets_the_orders_it_should_hold() -> None:
    c = _coord()
    c.join("donor", step=10)
    c.join("joiner", step=None)
    plan = c.planner.recover("joiner", 0).plan_id
    assert [o.kind for o in c.planner.orders_for("donor", 1)] == ["prepare"]
    c.ack(plan, "donor", [10, 10])
    orders = c.planner.orders_for("donor", 1)
    assert [(o.kind, o.plan_id) for o in orders] == [("prepare", plan), ("arm", plan)]
    assert orders[1].step == 12
    assert c.planner.orders_for("joiner", 0) == []


def test_decisions_tell_a_fresh_start_from_a_missing_donor() -> None:
    seen: list[str] = []

    class Observer:
        def decision(self, result: str, seconds: float) -> None:
            assert seconds >= 0
            seen.append(result)

        def plan_finished(self, result: str, **kw: object) -> None:
            seen.append(f"plan {result}")

    c = _coord(CoordinatorConfig(max_attempts=1))
    c.planner._observer = Observer()
    c.join("first", step=None)
    a = c.planner.recover("first", 0)
    assert (a.state, a.fresh) == ("no_donor", True)  # a job's start: nothing was lost
    c.beat("first", step=10)
    c.join("other-model", step=None, fp="f2")
    a = c.planner.recover("other-model", 0)  # state exists, not of this layout
    assert (a.state, a.fresh) == ("no_donor", False)
    c.join("j", step=None)
    assert c.planner.recover("j", 0).state == "transfer"
    c.fail(1, "j", "peer_lost")
    assert c.planner.recover("j", 0).state == "no_donor"  # max_attempts spent
    assert seen == ["fresh", "no_donor", "plan", "plan failed", "no_donor"]


def test_a_whole_job_restart_is_no_donor_whichever_registers_first() -> None:
    for order in ("old registrations still there", "peers came back first"):
        c = _coord()
        c.join("a", step=10)
        c.join("b", step=10)
        c.planner.housekeep()  # the coordinator saw this layout hold a step
        c.join("b", step=None, agent="b2")  # b restarted: its state is gone
        if order == "peers came back first":
            c.join("a", step=None, agent="a2")
        else:
            c.clock.now += 60  # a's old ranks went silent
        a = c.planner.recover("b", 0)
        assert (a.state, a.fresh) == ("no_donor", False), order


def test_a_donor_that_leaves_fails_its_plan_and_is_not_tried_again() -> None:
    c = _coord()
    c.join("d1", step=10, agent="d1")
    c.join("d2", step=10, agent="d2")
    c.join("j", step=None)
    first = c.planner.recover("j", 0)
    assert first.state == "transfer"
    for r in range(2):
        assert c.members.leave(first.donor, r, first.donor) is True
    c.planner.on_leave(first.donor, 1)
    assert c.members.replica(first.donor) is None
    again = c.planner.recover("j", 0)
    assert again.state == "transfer"
    assert again.donor != first.donor
    assert again.plan_id != first.plan_id


def test_a_stranger_on_the_group_fails_the_plan_without_blaming_the_donor(c: Coord) -> None:
    c.join("d", step=10)  # the only donor
    c.join("j", step=None)
    first = c.planner.recover("j", 0)
    c.fail(first.plan_id, "j", "untrusted")
    snap = c.planner.plan(first.plan_id)
    assert snap is not None
    assert (snap.state, snap.reason) == ("failed", "joiner rank 0 ('j'): untrusted")
    again = c.planner.recover("j", 0)
    assert (again.state, again.donor) == ("transfer", "d")  # tried again, not excluded
    assert again.plan_id != first.plan_id
