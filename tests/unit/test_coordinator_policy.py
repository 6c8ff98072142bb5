"""Membership health and donor choice, on plain data with a fake clock."""

from __future__ import annotations

from datetime import timedelta

import pytest

from recoveryd.coordinator.membership import Membership, ReplicaView
from recoveryd.coordinator.policy import choose_donor, fence, make_plan
from recoveryd.errors import ConfigError, UnknownMemberError
from recoveryd.protocol import MemberInfo


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _join(
    m: Membership,
    rid: str,
    *,
    world: int = 2,
    step: int | None = 10,
    fp: str = "L",
    node: str = "",
    zone: str = "",
) -> None:
    for r in range(world):
        m.register(
            MemberInfo(
                replica_id=rid,
                group_rank=r,
                group_world_size=world,
                layout_fingerprint=fp,
                rendezvous=f"{rid}-{r}:29500",
                labels={"node": node, "zone": zone},
            ),
            step=step,
        )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def members(clock: Clock) -> Membership:
    return Membership(heartbeat_timeout=timedelta(seconds=5), clock=clock)


def test_replica_is_healthy_only_with_every_rank_fresh(members: Membership, clock: Clock) -> None:
    members.register(
        MemberInfo(replica_id="a", group_rank=0, group_world_size=2, layout_fingerprint="L"),
        step=3,
    )
    view = members.replica("a")
    assert view is not None
    assert not view.healthy  # rank 1 missing
    assert view.step is None
    _join(members, "a", step=3)
    view = members.replica("a")
    assert view is not None
    assert view.healthy
    assert view.step == 3
    clock.now = 4.0
    members.heartbeat("a", 0, step=4, healthy=True)
    clock.now = 6.0  # rank 1 last heard at 0.0
    view = members.replica("a")
    assert view is not None
    assert not view.healthy
    assert view.step == 3  # the slowest rank's step


def test_self_reported_unhealthy_rank_makes_its_replica_unhealthy(members: Membership) -> None:
    _join(members, "a")
    members.heartbeat("a", 1, step=11, healthy=False)
    view = members.replica("a")
    assert view is not None
    assert not view.healthy


def test_forgotten_replica_is_gone(members: Membership) -> None:
    _join(members, "a")
    _join(members, "b")
    members.forget("a")
    assert set(members.replicas()) == {"b"}
    with pytest.raises(UnknownMemberError):
        members.heartbeat("a", 0, step=1, healthy=True)


def test_heartbeat_from_unknown_rank_asks_to_register(members: Membership) -> None:
    with pytest.raises(UnknownMemberError, match="register again") as e:
        members.heartbeat("ghost", 0, step=1, healthy=True)
    assert isinstance(e.value, KeyError)
    assert (e.value.replica_id, e.value.group_rank) == ("ghost", 0)


def test_conflicting_world_size_is_refused(members: Membership) -> None:
    _join(members, "a", world=2)
    with pytest.raises(ConfigError, match="registered with 2 ranks"):
        members.register(
            MemberInfo(replica_id="a", group_rank=0, group_world_size=4, layout_fingerprint="L")
        )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"replica_id": ""}, "replica_id"),
        ({"group_rank": 2}, "group_rank"),
        ({"group_world_size": 0}, "group_world_size"),
        ({"layout_fingerprint": ""}, "layout_fingerprint"),
    ],
)
def test_bad_member_info_names_the_field(kwargs: dict[str, object], field: str) -> None:
    base: dict[str, object] = {
        "replica_id": "a",
        "group_rank": 0,
        "group_world_size": 2,
        "layout_fingerprint": "L",
    }
    with pytest.raises(ConfigError) as e:
        MemberInfo(**{**base, **kwargs})  # type: ignore[arg-type]
    assert e.value.field == field


def _views(m: Membership) -> tuple[ReplicaView, list[ReplicaView]]:
    views = m.replicas()
    return views["joiner"], list(views.values())


def test_highest_step_wins_then_fewest_inflight_then_nearest_then_fastest(
    members: Membership,
) -> None:
    _join(members, "joiner", step=None, node="n1", zone="z1")
    _join(members, "old", step=9, node="n1")
    _join(members, "far", step=10, zone="z9")
    _join(members, "zone", step=10, zone="z1")
    _join(members, "node", step=10, node="n1")
    joiner, views = _views(members)
    best = choose_donor(joiner, views)
    assert best is not None
    assert best.replica_id == "node"  # same step: nearest
    best = choose_donor(joiner, views, inflight={"node": 1})
    assert best is not None
    assert best.replica_id == "zone"  # fewer transfers in flight beats nearness
    best = choose_donor(joiner, views, inflight={"node": 1, "zone": 1, "far": 1})
    assert best is not None
    assert best.replica_id == "node"
    best = choose_donor(joiner, views, exclude={"node", "zone"}, bandwidth_bps={"far": 1e9})
    assert best is not None
    assert best.replica_id == "far"  # higher step beats "old"


def test_only_healthy_same_layout_same_size_replicas_donate(
    members: Membership, clock: Clock
) -> None:
    _join(members, "joiner", step=None)
    _join(members, "other-layout", step=50, fp="X")
    _join(members, "other-size", step=50, world=4)
    _join(members, "sick", step=50)
    members.heartbeat("sick", 0, step=50, healthy=False)
    joiner, views = _views(members)
    assert choose_donor(joiner, views) is None
    _join(members, "good", step=5)
    joiner, views = _views(members)
    best = choose_donor(joiner, views)
    assert best is not None
    assert best.replica_id == "good"
    clock.now = 100.0  # everyone's heartbeats are stale
    joiner, views = _views(members)
    assert choose_donor(joiner, views) is None


def test_plan_pairs_rank_r_with_rank_r(members: Membership) -> None:
    _join(members, "joiner", step=None, world=3)
    _join(members, "donor", step=41, world=3)
    joiner, views = _views(members)
    donor = choose_donor(joiner, views)
    assert donor is not None
    plan = make_plan(7, joiner, [donor])
    assert (plan.plan_id, plan.joiner, plan.donor, plan.striped) == (7, "joiner", "donor", False)
    (stripe,) = plan.stripes
    assert stripe.share == 1.0
    assert [p.group_rank for p in stripe.pairs] == [0, 1, 2]
    assert [p.donor_rendezvous for p in stripe.pairs] == [f"donor-{r}:29500" for r in range(3)]


def test_fence_is_past_the_furthest_donor_rank() -> None:
    assert fence([41, 42, 41], 2) == 44
    assert fence([0], 1) == 1
