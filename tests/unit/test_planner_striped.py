"""Striped plans (several donors, one fence) in the Planner, on plain data with a fake clock."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest

from recoveryd.coordinator.config import CoordinatorConfig
from recoveryd.coordinator.policy import MIN_SHARE, shares
from recoveryd.errors import ConfigError
from recoveryd.protocol import ClusterStatus, Report
from recoveryd.status import render
from tests.unit.test_planner import Coord, _coord


def _striped(n: int = 2, **kw: object) -> Coord:
    return _coord(CoordinatorConfig(max_donors=n, **kw))  # type: ignore[arg-type]


def _donor_report(
    c: Coord, plan_id: int, donor: str, rank: int, result: str = "ok", **kw: object
) -> None:
    c.planner.report(
        Report(
            plan_id=plan_id,
            replica_id=donor,
            group_rank=rank,
            role="donor",
            result=result,
            **kw,  # type: ignore[arg-type]
        )
    )


def _armed(c: Coord, donors: tuple[str, ...] = ("d1", "d2"), step: int = 10) -> int:
    """Registers the donors and a joiner 'j', makes the plan and arms it; returns its id."""
    for d in donors:
        c.join(d, step=step)
    c.join("j", step=None)
    ans = c.planner.recover("j", 0)
    assert ans.state == "transfer"
    for d in donors:
        c.ack(ans.plan_id, d, [step, step])
    snap = c.planner.plan(ans.plan_id)
    assert snap is not None
    assert snap.state == "armed"
    return ans.plan_id


def test_a_striped_plan_names_every_donor_with_its_own_prefix_and_a_share() -> None:
    c = _striped(2)
    c.join("d1", step=10)
    c.join("d2", step=10)
    c.join("d3", step=10)
    c.join("j", step=None)
    ans = c.planner.recover("j", 1)
    assert (ans.state, ans.step) == ("transfer", None)
    assert [s.donor for s in ans.stripes] == ["d1", "d2"]  # max_donors of the three
    assert [s.rendezvous for s in ans.stripes] == ["d1-1:29500", "d2-1:29500"]
    prefixes = [s.rendezvous_prefix for s in ans.stripes]
    assert prefixes == ["recoveryd/plan/1", "recoveryd/plan/1/d1"]
    assert sum(s.share for s in ans.stripes) == pytest.approx(1.0)
    assert (ans.donor, ans.rendezvous, ans.rendezvous_prefix) == (
        "d1",
        "d1-1:29500",
        "recoveryd/plan/1",
    )
    # Every rank of both donors is told to prepare, each under its donor's prefix.
    prepared = {(rid, r): o.rendezvous_prefix for rid, r, o in c.sent if o.kind == "prepare"}
    assert prepared == {
        ("d1", 0): "recoveryd/plan/1",
        ("d1", 1): "recoveryd/plan/1",
        ("d2", 0): "recoveryd/plan/1/d1",
        ("d2", 1): "recoveryd/plan/1/d1",
    }
    assert c.planner.inflight() == {"d1": 1, "d2": 1}


def test_the_fence_waits_for_every_rank_of_every_donor() -> None:
    c = _striped(2, fence_steps=2)
    c.join("d1", step=10)
    c.join("d2", step=12)
    c.join("j", step=None)
    ans = c.planner.recover("j", 0)
    c.ack(ans.plan_id, "d1", [10, 11])
    c.sent.clear()
    assert c.planner.acknowledge(ans.plan_id, "d2", 0, 12)
    assert c.planner.plan(ans.plan_id).state == "preparing"  # type: ignore[union-attr]
    assert [k for k in c.kinds() if k[2] == "arm"] == []
    assert c.planner.acknowledge(ans.plan_id, "d2", 1, 12)
    snap = c.planner.plan(ans.plan_id)
    assert snap is not None
    assert (snap.state, snap.step) == ("armed", 14)  # max + fence
    assert sorted(k for k in c.kinds() if k[2] == "arm") == [
        ("d1", 0, "arm"),
        ("d1", 1, "arm"),
        ("d2", 0, "arm"),
        ("d2", 1, "arm"),
    ]
    # A rank of a replica that is no donor of the plan cannot acknowledge it.
    assert not c.planner.acknowledge(ans.plan_id, "j", 0, 12)


def test_a_donor_lost_after_the_fence_leaves_the_plan_to_the_others() -> None:
    c = _striped(2)
    plan_id = _armed(c)
    c.sent.clear()
    c.planner.on_leave("d2", 0)
    snap = c.planner.plan(plan_id)
    assert snap is not None
    assert snap.state == "armed"  # not failed: d1 sends d2's part
    assert c.kinds() == [("d2", 0, "cancel"), ("d2", 1, "cancel")]  # d2 alone is dropped
    assert c.planner.inflight() == {"d1": 1}
    ans = c.planner.recover("j", 0)
    assert [s.donor for s in ans.stripes] == ["d1"]  # the joiner stops waiting for d2
    assert c.planner.orders_for("d2", 0) == []
    assert [o.kind for o in c.planner.orders_for("d1", 0)] == ["prepare", "arm"]
    c.ok(plan_id, "j", 0)
    c.ok(plan_id, "j", 1)
    snap = c.planner.plan(plan_id)
    assert snap is not None
    assert snap.state == "done"
    assert [(d.replica_id, d.state) for d in snap.donors] == [("d1", ""), ("d2", "lost")]
    assert c.planner.recover("j", 0).state == "done"


def test_losing_the_last_donor_fails_the_plan_and_blames_it() -> None:
    c = _striped(2, heartbeat_timeout=timedelta(seconds=5))
    plan_id = _armed(c)
    c.clock.now = 6.0  # every donor silent past the heartbeat timeout; the joiner beats
    c.beat("j")
    c.planner.tick()
    snap = c.planner.plan(plan_id)
    assert snap is not None
    assert snap.state == "failed"
    assert "became unhealthy" in snap.reason
    # One was lost while the other sent on; the other then failed the plan: both left out.
    c.clock.now = 6.5
    c.beat("d1")
    c.beat("d2")
    ans = c.planner.recover("j", 0)
    assert ans.state == "no_donor", ans
    assert "every donor failed this recovery (d1, d2)" in ans.reason


def test_a_donor_lost_before_the_fence_fails_the_plan_and_the_next_goes_without_it() -> None:
    c = _striped(3)
    for d in ("d1", "d2", "d3"):
        c.join(d, step=10)
    c.join("j", step=None)
    ans = c.planner.recover("j", 0)
    assert [s.donor for s in ans.stripes] == ["d1", "d2", "d3"]
    c.ack(ans.plan_id, "d1", [10, 10])
    c.planner.on_leave("d2", 0)  # before the plan is armed
    snap = c.planner.plan(ans.plan_id)
    assert snap is not None
    assert snap.state == "failed"
    again = c.planner.recover("j", 0)
    assert again.state == "transfer"
    assert again.plan_id != ans.plan_id
    assert [s.donor for s in again.stripes] == ["d1", "d3"]


def test_a_joiner_failure_excludes_the_donor_it_blames_or_else_stripes_no_more() -> None:
    c = _striped(3)
    plan_id = _armed(c, ("d1", "d2", "d3"))
    c.planner.report(
        Report(
            plan_id=plan_id,
            replica_id="j",
            group_rank=0,
            role="joiner",
            result="error",
            blame="d2",
            message="bad bytes",
        )
    )
    nxt = c.planner.recover("j", 0)
    assert [s.donor for s in nxt.stripes] == ["d1", "d3"]
    for d in ("d1", "d3"):
        c.ack(nxt.plan_id, d, [10, 10])
    # No donor named: none is excluded, and the next plans take one donor each.
    c.fail(nxt.plan_id, "j", "timeout")
    last = c.planner.recover("j", 0)
    assert (last.state, last.stripes, last.donor) == ("transfer", (), "d1")
    # A joiner cannot blame a replica that is no donor of the plan.
    c.ack(last.plan_id, "d1", [10, 10])
    c.planner.report(
        Report(
            plan_id=last.plan_id,
            replica_id="j",
            group_rank=0,
            role="joiner",
            result="error",
            blame="d3",
        )
    )
    assert c.planner.recover("j", 0).donor == "d3"  # d1 (the plan's one donor) is left out


def test_cuda_joiners_take_one_donor() -> None:
    c = _striped(2)
    c.join("d1", step=10, device="cuda")
    c.join("d2", step=10, device="cuda")
    c.join("j", step=None, device="cuda")
    ans = c.planner.recover("j", 0)
    assert (ans.donor, ans.stripes, ans.backend) == ("d1", (), "nccl")


def test_shares_follow_the_bandwidth_each_donor_showed() -> None:
    c = _striped(2)
    plan_id = _armed(c)
    mib = 1 << 20
    for r in range(2):  # d1 streamed its part at 3x d2's rate
        _donor_report(c, plan_id, "d1", r, bytes=30 * mib, step=10, phases={"data": 1.0})
        _donor_report(c, plan_id, "d2", r, bytes=10 * mib, step=10, phases={"data": 1.0})
    c.ok(plan_id, "j", 0)
    c.ok(plan_id, "j", 1)
    snap = c.planner.plan(plan_id)
    assert snap is not None
    assert snap.state == "done"
    assert [(d.replica_id, d.bytes, d.state) for d in snap.donors] == [
        ("d1", 60 * mib, "ok"),
        ("d2", 20 * mib, "ok"),
    ]
    c.join("j2", step=None)
    ans = c.planner.recover("j2", 0)
    assert [s.donor for s in ans.stripes] == ["d1", "d2"]
    assert [round(s.share, 3) for s in ans.stripes] == [0.75, 0.25]
    text = render(
        ClusterStatus(coordinator_id="c", uptime_s=1.0, replicas=[], active=[], recent=[snap])
    )
    assert "d1:50%,d2:50%" in text  # the finished plan's planned shares
    assert "stripes of striped plans:" in text
    assert any(line.split()[:3] == [str(plan_id), "d1", "50.0%"] for line in text.splitlines())


def test_shares_leave_out_a_donor_too_slow_to_matter() -> None:
    assert shares(["a", "b"], {}) == [0.5, 0.5]
    # c, not measured yet, counts as the median of the measured ones (200).
    assert shares(["a", "b", "c"], {"a": 300.0, "b": 100.0}) == pytest.approx([0.5, 1 / 6, 1 / 3])
    got = shares(["a", "b"], {"a": 100.0, "b": 1.0})
    assert got == [1.0, 0.0]  # b would get ~1 %, under MIN_SHARE
    assert MIN_SHARE > 1.0 / 101
    assert shares(["slow", "fast"], {"slow": 1.0, "fast": 100.0})[0] > 0  # the best keeps one


def test_a_slow_donor_is_dropped_from_the_plan() -> None:
    c = _striped(2)
    c.join("d1", step=10)
    c.join("d2", step=10)
    c.join("j", step=None)
    c.planner._bandwidth_bps.update({"d1": 1e9, "d2": 1e7})  # seen in earlier plans
    ans = c.planner.recover("j", 0)
    assert (ans.donor, ans.stripes) == ("d1", ())  # one donor left: an ordinary plan


def test_max_donors_is_checked() -> None:
    for bad in (0, 17):
        with pytest.raises(ConfigError, match="max_donors"):
            dataclasses.replace(CoordinatorConfig(), max_donors=bad)


def test_donors_refused_by_the_joiner_leave_the_verdict_to_it() -> None:
    """An overshot fence: the joiner refuses every donor, each donor reports its send
    failed; that blames none of them, and the joiner's step_mismatch widens the fence."""
    c = _striped(2, fence_steps=2)
    plan_id = _armed(c)
    for d in ("d1", "d2"):
        for r in range(2):
            _donor_report(c, plan_id, d, r, "error", message="the joiner refused the step")
    snap = c.planner.plan(plan_id)
    assert snap is not None
    assert snap.state == "armed"  # the donors' own failures decide nothing
    assert c.planner.inflight() == {"d1": 1, "d2": 1}
    c.fail(plan_id, "j", "step_mismatch")
    nxt = c.planner.recover("j", 0)
    assert [s.donor for s in nxt.stripes] == ["d1", "d2"]  # none left out, still striped
    for d in ("d1", "d2"):
        c.ack(nxt.plan_id, d, [10, 10])
    again = c.planner.plan(nxt.plan_id)
    assert again is not None
    assert again.step == 14  # fenced twice as far ahead


def test_a_donor_parked_below_the_fence_is_dropped_when_the_plan_is_armed() -> None:
    """Parked donors serve at their own step: one parked lower could never send at the
    fence (the highest), so the plan goes on with the others."""
    c = _striped(2)
    c.join("d1", step=5)
    c.join("d2", step=6)
    c.join("j", step=None)
    ans = c.planner.recover("j", 0)
    assert [s.donor for s in ans.stripes] == ["d2", "d1"]  # the most advanced first
    c.ack(ans.plan_id, "d1", [5, 5], idle=True)
    c.sent.clear()
    c.ack(ans.plan_id, "d2", [6, 6], idle=True)
    snap = c.planner.plan(ans.plan_id)
    assert snap is not None
    assert (snap.state, snap.step) == ("armed", 6)
    assert [(d.replica_id, d.state) for d in snap.donors] == [("d2", ""), ("d1", "lost")]
    assert sorted(c.kinds()) == [
        ("d1", 0, "cancel"),
        ("d1", 1, "cancel"),
        ("d2", 0, "arm"),
        ("d2", 1, "arm"),
    ]
    assert [s.donor for s in c.planner.recover("j", 0).stripes] == ["d2"]


def test_a_finished_striped_plan_cancels_what_its_donors_still_hold() -> None:
    """A donor the joiner left out (its store unreachable from there) may be alive."""
    c = _striped(2)
    plan_id = _armed(c)
    c.sent.clear()
    c.ok(plan_id, "j", 0)
    c.ok(plan_id, "j", 1)
    assert sorted(c.kinds()) == [(d, r, "cancel") for d in ("d1", "d2") for r in range(2)]


def test_shares_ignore_bandwidths_that_are_no_positive_finite_number() -> None:
    inf, nan = float("inf"), float("nan")
    assert shares(["a", "b"], {"a": inf, "b": 100.0}) == [0.5, 0.5]
    assert shares(["a", "b"], {"a": nan, "b": -1.0}) == [0.5, 0.5]
    assert shares(["a", "b"], {"a": 1e308, "b": 1e308}) == [0.5, 0.5]  # no overflow
