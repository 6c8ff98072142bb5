"""Striped recoveries end to end: real trainer processes, a coordinator with
``max_donors`` > 1, a joiner that pulls a part of its state from each donor,
and a donor SIGKILLed after the fence whose part the other sends (resume, not
restart).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta

import pytest

from recoveryd.coordinator.config import CoordinatorConfig
from recoveryd.demo.cluster import LocalCluster
from recoveryd.demo.trainer import Event
from recoveryd.status import render

pytestmark = pytest.mark.integration

WAIT = timedelta(seconds=120)
SMALL = {"hidden": 64, "layers": 2, "steps": 100_000, "step_delay_s": 0.01}
CONFIG = CoordinatorConfig(
    heartbeat_interval=timedelta(seconds=0.2),
    heartbeat_timeout=timedelta(seconds=2),
    warmup=timedelta(seconds=1),
    max_donors=2,
)


def _outcome(cluster: LocalCluster, replica: str, ranks: int = 2) -> list[Event]:
    return cluster.wait_for(
        lambda e: e.replica_id == replica and e.kind in ("recovered", "fresh"),
        count=ranks,
        timeout=WAIT,
    )


def _sends(cluster: LocalCluster, plan_id: int, donor: str, ranks: int = 2) -> dict[int, Event]:
    got = cluster.wait_for(
        lambda e: e.kind == "sent" and e.replica_id == donor and e.data["plan_id"] == plan_id,
        count=ranks,
        timeout=timedelta(seconds=60),
    )
    return {e.group_rank: e for e in got}


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(coordinator_config=CONFIG, **SMALL) as c:
        yield c


def _two_donors(cluster: LocalCluster, **kw: object) -> None:
    """'a' starts fresh and parks at step 5; 'b' recovers from it and parks there too:
    two healthy donors at one step (replicas of a data-parallel job step together)."""
    cluster.start_replica("a", 2, hold_at=5, **kw)  # type: ignore[arg-type]
    assert all(e.kind == "fresh" for e in _outcome(cluster, "a"))
    cluster.start_replica("b", 2, hold_at=5, **kw)  # type: ignore[arg-type]
    got = _outcome(cluster, "b")
    assert all(e.kind == "recovered" and e.data["donor"] == "a" for e in got), got


def test_a_joiner_pulls_a_part_from_each_donor_at_one_step(cluster: LocalCluster) -> None:
    # Parts are runs of whole messages: many tensors (an MLP of 6 layers of 1 MiB
    # weights with Adam's moments), not one blob, so that each donor gets some.
    _two_donors(cluster, hidden=512, layers=6)
    cluster.start_replica("j", 2, hidden=512, layers=6)
    got = _outcome(cluster, "j")

    assert all(e.kind == "recovered" for e in got), [e.data for e in got]
    [plan_id] = {e.data["plan_id"] for e in got}
    assert {e.data["step"] for e in got} == {5}
    assert all(set(e.data["donor"].split(",")) == {"a", "b"} for e in got)
    assert all(e.data["attempts"] == 1 for e in got)
    for donor in ("a", "b"):  # each sent its part of the same bytes, at the same step
        for rank, sent in _sends(cluster, plan_id, donor).items():
            [mine] = [e for e in got if e.group_rank == rank]
            assert sent.data["result"] == "ok"
            assert sent.data["digest"] == mine.data["digest"]
            assert sent.data["step"] == mine.data["step"]
            # A part, not the whole state (the joiner received it all).
            assert 0 < sent.data["bytes"] < 0.8 * mine.data["bytes"], (sent.data, mine.data)

    status = cluster.client().status()
    [plan] = [p for p in status.recent if p.plan_id == plan_id]
    assert plan.state == "done"
    assert sorted(d.replica_id for d in plan.donors) == ["a", "b"]
    assert sum(d.share for d in plan.donors) == pytest.approx(1.0)
    assert all(d.state == "ok" and d.bytes > 0 for d in plan.donors), plan.donors
    text = render(status)
    assert "stripes of striped plans:" in text
    assert any(line.startswith(f"{plan_id}  ") and "%" in line for line in text.splitlines())


@pytest.mark.parametrize("after_s", [0.0, 0.1])
def test_a_donor_killed_after_the_fence_costs_only_its_part(
    cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch, after_s: float
) -> None:
    """``after_s`` after the plan is armed (at 0, it is mostly before its go; later,
    mostly while it streams: either way the plan goes on without it)."""
    # Gloo does not always wake a receive whose peer was SIGKILLed mid-message; the
    # joiner sees the death through the donor's store at once, far inside this bound.
    monkeypatch.setenv("RECOVERYD_STALL_TIMEOUT", "30")
    monkeypatch.setenv("RECOVERYD_HANDSHAKE_TIMEOUT", "5")
    _two_donors(cluster, hidden=2048, layers=6)  # 16 MiB tensors, 290 MiB per rank
    client = cluster.client()
    cluster.start_replica("j", 2, hidden=2048, layers=6)
    end = time.monotonic() + WAIT.total_seconds()
    while not any(p.joiner == "j" and p.state == "armed" for p in client.status().active):
        assert time.monotonic() < end, "the striped plan was never armed"
        time.sleep(0.005)
    time.sleep(after_s)
    cluster.kill_replica("b")  # fenced, waiting for the go, or streaming its part
    got = _outcome(cluster, "j")

    assert all(e.kind == "recovered" for e in got), [e.data for e in got]
    # One plan: 'a' finished it (a restart would show a second attempt).
    assert all(e.data["attempts"] == 1 for e in got), [e.data for e in got]
    assert all(e.data["phases"].get("data", 0) < 10 for e in got), [e.data for e in got]
    [plan_id] = {e.data["plan_id"] for e in got}
    for rank, sent in _sends(cluster, plan_id, "a").items():
        [mine] = [e for e in got if e.group_rank == rank]
        assert sent.data["digest"] == mine.data["digest"]
    assert not any(e.kind == "sent" and e.replica_id == "b" and e.data["plan_id"] == plan_id
                   for e in cluster.events)  # fmt: skip
    [plan] = [p for p in client.status().recent if p.plan_id == plan_id]
    assert (plan.state, plan.attempt) == ("done", 1)
    assert sorted(d.replica_id for d in plan.donors) == ["a", "b"]
