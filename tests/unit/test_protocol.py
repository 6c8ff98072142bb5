"""The protocol's one codec, the one replica-state rule, and the one agent face."""

from __future__ import annotations

import dataclasses
import inspect
from datetime import timedelta

import pytest

from recoveryd import codec
from recoveryd.agent.agent import Agent
from recoveryd.agent.interface import RankAgent
from recoveryd.coordinator.census import replica_state
from recoveryd.coordinator.membership import ReplicaView
from recoveryd.errors import ConfigError
from recoveryd.protocol import (
    Answer,
    Beat,
    ClusterStatus,
    DonorShare,
    MemberInfo,
    Order,
    PlanSnapshot,
    RankStatus,
    Registration,
    ReplicaStatus,
    Report,
    StripeSource,
)
from recoveryd.sidecar.client import Attachment
from recoveryd.v1 import coordinator_pb2 as pb


def _wire(msg: object) -> object:
    """The message as the other end parses it."""
    out = type(msg)()  # type: ignore[call-arg]
    out.ParseFromString(msg.SerializeToString())  # type: ignore[attr-defined]
    return out


_SNAPSHOT = PlanSnapshot(
    plan_id=7001,
    joiner="j",
    donor="d",
    step=None,
    state="preparing",
    attempt=1,
    age_s=0.5,
    ranks_done=0,
    reason="",
    bytes=0,
    transfer_s=0.0,
    recovery_s=0.0,
    phases={},
    addresses=("10.0.0.1",),
)


def test_every_type_survives_the_codec_both_ways() -> None:
    info = MemberInfo(
        replica_id="r", group_rank=1, group_world_size=2, layout_fingerprint="L",
        device_kind="cuda", rendezvous="10.0.0.1:5", labels={"zone": "a"}, agent_id="x",
        interface="eth0",
    )  # fmt: skip
    for step in (None, 0, 41):
        assert codec.member_from_pb(_wire(codec.member_to_pb(info, step=step))) == (info, step)  # type: ignore[arg-type]
    reg = Registration(coordinator_id="c", heartbeat_interval=timedelta(seconds=2))
    assert codec.registration_from_pb(_wire(codec.registration_to_pb(reg))) == reg  # type: ignore[arg-type]
    beats = [
        Beat(replica_id="r", group_rank=0, step=None),
        Beat(replica_id="r", group_rank=1, step=3, healthy=False),
    ]
    assert codec.beats_from_pb(_wire(codec.beats_to_pb(beats))) == beats  # type: ignore[arg-type]
    for order in (
        Order(
            kind="prepare",
            plan_id=1,
            joiner="j",
            timeout_s=60,
            rendezvous_prefix="p",
            backend="nccl",
        ),
        Order(kind="arm", plan_id=1, joiner="j", step=0, timeout_s=60, rendezvous_prefix="p"),
        Order(kind="cancel", plan_id=1, joiner="j"),
    ):
        assert codec.order_from_pb(_wire(codec.order_to_pb(order))) == order  # type: ignore[arg-type]
    for answer in (
        Answer(state="no_donor", reason="why", fresh=True),
        Answer(state="transfer", plan_id=2, donor="d", step=None, rendezvous="h:1", timeout_s=5),
        Answer(state="done", plan_id=2, donor="d", step=0),
        Answer(
            state="transfer",
            plan_id=3,
            donor="a",
            step=9,
            rendezvous="h:1",
            rendezvous_prefix="p",
            stripes=(
                StripeSource(donor="a", rendezvous="h:1", rendezvous_prefix="p", share=0.75),
                StripeSource(donor="b", rendezvous="h:2", rendezvous_prefix="p/d1", share=0.25),
            ),
        ),
    ):
        assert codec.answer_from_pb(_wire(codec.answer_to_pb(answer))) == answer  # type: ignore[arg-type]
    report = Report(
        plan_id=2, replica_id="j", group_rank=0, role="joiner", result="step_mismatch",
        message="m", step=12, bytes=10, seconds=0.5, phases={"data": 0.25}, address="10.0.0.2",
        blame="d2",
    )  # fmt: skip
    assert codec.report_from_pb(_wire(codec.report_to_pb(report))) == report  # type: ignore[arg-type]
    status = ClusterStatus(
        coordinator_id="c",
        uptime_s=3.0,
        replicas=[
            ReplicaStatus(
                replica_id="r",
                world_size=1,
                step=None,
                healthy=False,
                state="unhealthy",
                ranks=[
                    RankStatus(
                        group_rank=0,
                        step=None,
                        healthy=False,
                        last_seen_s=1.0,
                        rendezvous="h:1",
                        device_kind="cpu",
                        labels={},
                        interface="lo",
                    )
                ],
            )
        ],
        active=[_SNAPSHOT],
        recent=[
            dataclasses.replace(
                _SNAPSHOT,
                plan_id=7002,
                donors=(
                    DonorShare(replica_id="d", share=0.5, bytes=10, state="ok"),
                    DonorShare(replica_id="e", share=0.5, bytes=3, state="lost"),
                ),
            )
        ],
    )
    assert codec.status_from_pb(_wire(codec.status_to_pb(status))) == status  # type: ignore[arg-type]


def test_a_report_message_is_cut_before_it_is_sent() -> None:
    long = Report(
        plan_id=1, replica_id="r", group_rank=0, role="donor", result="error", message="x" * 5000
    )
    assert len(codec.report_to_pb(long).message) == codec.MAX_MESSAGE_CHARS


@pytest.mark.parametrize(
    ("report", "field"),
    [
        (pb.TransferReport(plan_id=1, replica_id="r", result="ok"), "role"),
        (
            pb.TransferReport(
                plan_id=1, replica_id="r", role=pb.TransferReport.DONOR, result="great"
            ),
            "result",
        ),
    ],
)
def test_a_report_with_an_unknown_role_or_result_is_refused(
    report: pb.TransferReport, field: str
) -> None:
    with pytest.raises(ConfigError) as e:
        codec.report_from_pb(report)
    assert e.value.field == field


def test_what_this_version_does_not_know_reads_as_the_safest_meaning() -> None:
    assert codec.order_from_pb(pb.Order(kind=99, plan_id=3)).kind == "cancel"  # type: ignore[arg-type]
    assert codec.answer_from_pb(pb.RecoverResponse(state=99)).state == "wait"  # type: ignore[arg-type]


def _view(*, complete: bool, ranks_healthy: bool) -> ReplicaView:
    return ReplicaView(
        replica_id="r",
        world_size=2,
        ranks={},
        step=3,
        healthy=complete and ranks_healthy,
        fingerprint="L",
        labels={},
        ranks_healthy=ranks_healthy,
    )


def test_one_rule_says_a_replica_s_state() -> None:
    assert replica_state(_view(complete=True, ranks_healthy=True), set()) == "healthy"
    assert replica_state(_view(complete=True, ranks_healthy=True), {"r"}) == "recovering"
    # A joiner whose ranks are still starting is recovering, not unhealthy...
    assert replica_state(_view(complete=False, ranks_healthy=True), {"r"}) == "recovering"
    # ...but one with a dead or silent rank is unhealthy, in a round or not.
    assert replica_state(_view(complete=True, ranks_healthy=False), {"r"}) == "unhealthy"
    assert replica_state(_view(complete=False, ranks_healthy=True), set()) == "unhealthy"


@pytest.mark.parametrize("cls", [Agent, Attachment])
def test_both_faces_have_every_call_of_the_rank_agent(cls: type) -> None:
    for name, member in inspect.getmembers(RankAgent):
        if name.startswith("_"):
            continue
        assert hasattr(cls, name) or name in _instance_attributes(cls), name
        if inspect.isfunction(member):
            want = inspect.signature(member)
            have = inspect.signature(getattr(cls, name))
            extra = [p for p in have.parameters if p not in want.parameters]
            assert list(want.parameters) == [p for p in have.parameters if p in want.parameters]
            # Beyond the protocol's parameters only keyword-only ones with defaults.
            for p in extra:
                param = have.parameters[p]
                assert param.kind is inspect.Parameter.KEYWORD_ONLY, (name, p)
                assert param.default is not inspect.Parameter.empty, (name, p)
            assert str(have.return_annotation) == str(want.return_annotation), name


def _instance_attributes(cls: type) -> set[str]:
    """Attributes ``__init__`` sets (``self.name = ...`` or ``self.name: T = ...``)."""
    src = inspect.getsource(cls.__init__)  # type: ignore[misc]
    return {
        line.split("self.", 1)[1].split("=")[0].split(":")[0].strip()
        for line in src.splitlines()
        if line.strip().startswith("self.")
    }


@pytest.mark.parametrize(
    ("stripes", "why"),
    [
        ([("a", 1.0)] * 2, "each donor once"),
        ([("a", 1.0), ("b", float("nan"))], "finite and positive"),
        ([("a", 1.0), ("b", 0.0)], "finite and positive"),
        ([(f"d{k}", 1.0) for k in range(17)], "at most 16"),
    ],
)
def test_a_striped_answer_the_joiner_cannot_follow_is_refused(
    stripes: list[tuple[str, float]], why: str
) -> None:
    msg = pb.RecoverResponse(state=pb.RecoverResponse.TRANSFER, plan_id=1, donor="a")
    for donor, share in stripes:
        msg.stripes.add(donor=donor, rendezvous="h:1", rendezvous_prefix="p", share=share)
    with pytest.raises(ConfigError, match=why):
        codec.answer_from_pb(msg)


@pytest.mark.parametrize(
    ("field", "value"),
    [("seconds", float("inf")), ("seconds", -1.0), ("data", float("nan")), ("data", -1e-9)],
)
def test_a_report_with_a_time_that_is_no_time_is_refused(field: str, value: float) -> None:
    """Its numbers feed the donors' bandwidth (and so the shares of later plans)."""
    msg = codec.report_to_pb(
        Report(plan_id=1, replica_id="d", group_rank=0, role="donor", result="ok", bytes=1 << 30)
    )
    if field == "seconds":
        msg.seconds = value
    else:
        msg.phases[field] = value
    with pytest.raises(ConfigError, match=field):
        codec.report_from_pb(msg)


def test_a_striped_answer_must_start_with_the_donor_it_names() -> None:
    msg = pb.RecoverResponse(state=pb.RecoverResponse.TRANSFER, plan_id=1, donor="a")
    for donor in ("b", "a"):
        msg.stripes.add(donor=donor, rendezvous="h:1", rendezvous_prefix="p", share=1.0)
    with pytest.raises(ConfigError, match="must start with the donor named"):
        codec.answer_from_pb(msg)


def test_a_report_blaming_an_unprintable_name_is_refused() -> None:
    msg = codec.report_to_pb(
        Report(plan_id=1, replica_id="j", group_rank=0, role="joiner", result="error")
    )
    msg.blame = "bad name"
    with pytest.raises(ConfigError, match="blame"):
        codec.report_from_pb(msg)
