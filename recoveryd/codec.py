"""The one codec between :mod:`recoveryd.protocol` and the ``recoveryd.v1`` messages.

The coordinator's servicer and the agent's client both convert here, so each
field is mapped once, in both directions, side by side. What comes from the
network is checked as it is decoded: a report with an unknown role or result
is refused with a :class:`~recoveryd.errors.ConfigError` (the servicer answers
``INVALID_ARGUMENT``); enum values this version does not know read as the
safest meaning (an unknown order is a cancel, an unknown answer a wait).
"""

from __future__ import annotations

import math
from datetime import timedelta
from typing import cast

from recoveryd.errors import ConfigError
from recoveryd.protocol import (
    MAX_ADDRESS_CHARS,
    MAX_DONORS,
    MAX_NAME_CHARS,
    RESULTS,
    Answer,
    Beat,
    ClusterStatus,
    DonorShare,
    MemberInfo,
    Order,
    PlanSnapshot,
    PlanState,
    RankStatus,
    Registration,
    ReplicaState,
    ReplicaStatus,
    Report,
    Role,
    StripeSource,
    check_text,
)
from recoveryd.v1 import coordinator_pb2 as pb

MAX_MESSAGE_CHARS = 2000
"""A report's message is cut to this many characters (before it is sent, and when it arrives)."""
MAX_PHASES = 32
"""The most phase timings one report may carry."""
MAX_REPORT_SECONDS = 7 * 24 * 3600.0
"""The longest time a report may state (a week: far past any transfer's deadline)."""

_ORDER_KINDS = {"prepare": pb.Order.PREPARE, "arm": pb.Order.ARM, "cancel": pb.Order.CANCEL}
_ORDER_NAMES = {v: k for k, v in _ORDER_KINDS.items()}
_ANSWER_STATES = {
    "no_donor": pb.RecoverResponse.NO_DONOR,
    "wait": pb.RecoverResponse.WAIT,
    "transfer": pb.RecoverResponse.TRANSFER,
    "done": pb.RecoverResponse.DONE,
}
_ANSWER_NAMES = {v: k for k, v in _ANSWER_STATES.items()}
_ROLES: dict[Role, pb.TransferReport.Role] = {
    "donor": pb.TransferReport.DONOR,
    "joiner": pb.TransferReport.JOINER,
}
_ROLE_NAMES = {v: k for k, v in _ROLES.items()}


def _opt(msg: object, name: str) -> int | None:
    """An ``optional int64`` field, ``None`` when unset."""
    return getattr(msg, name) if msg.HasField(name) else None  # type: ignore[attr-defined]


# ---- membership ----------------------------------------------------------------


def member_to_pb(info: MemberInfo, *, step: int | None) -> pb.Member:
    out = pb.Member(
        replica_id=info.replica_id,
        group_rank=info.group_rank,
        group_world_size=info.group_world_size,
        layout_fingerprint=info.layout_fingerprint,
        device_kind=info.device_kind,
        rendezvous=info.rendezvous,
        labels=dict(info.labels),
        agent_id=info.agent_id,
        interface=info.interface,
    )
    if step is not None:
        out.step = step
    return out


def member_from_pb(m: pb.Member) -> tuple[MemberInfo, int | None]:
    """The member and the step it registers with.

    Raises:
        ConfigError: the member is invalid (see :class:`MemberInfo`).
    """
    info = MemberInfo(
        replica_id=m.replica_id,
        group_rank=m.group_rank,
        group_world_size=m.group_world_size,
        layout_fingerprint=m.layout_fingerprint,
        device_kind=m.device_kind or "cpu",
        rendezvous=m.rendezvous,
        labels=dict(m.labels),
        agent_id=m.agent_id,
        interface=m.interface,
    )
    return info, _opt(m, "step")


def registration_to_pb(reg: Registration) -> pb.RegisterResponse:
    return pb.RegisterResponse(
        coordinator_id=reg.coordinator_id,
        heartbeat_interval_s=reg.heartbeat_interval.total_seconds(),
        rank_secret=reg.rank_secret,
    )


def registration_from_pb(r: pb.RegisterResponse) -> Registration:
    return Registration(
        coordinator_id=r.coordinator_id,
        heartbeat_interval=timedelta(seconds=r.heartbeat_interval_s),
        rank_secret=r.rank_secret,
    )


def beats_to_pb(beats: list[Beat]) -> pb.HeartbeatRequest:
    out = pb.HeartbeatRequest()
    for b in beats:
        beat = out.beats.add(replica_id=b.replica_id, group_rank=b.group_rank, healthy=b.healthy)
        if b.step is not None:
            beat.step = b.step
    return out


def beats_from_pb(req: pb.HeartbeatRequest) -> list[Beat]:
    return [
        Beat(
            replica_id=b.replica_id,
            group_rank=b.group_rank,
            step=_opt(b, "step"),
            healthy=b.healthy,
        )
        for b in req.beats
    ]


# ---- plans ---------------------------------------------------------------------


def order_to_pb(o: Order) -> pb.Order:
    return pb.Order(
        kind=_ORDER_KINDS[o.kind],
        plan_id=o.plan_id,
        joiner=o.joiner,
        step=o.step or 0,
        timeout_s=o.timeout_s,
        rendezvous_prefix=o.rendezvous_prefix,
        backend=o.backend,
        plan_key=o.plan_key,
    )


def order_from_pb(o: pb.Order) -> Order:
    kind = _ORDER_NAMES.get(o.kind, "cancel")  # an order this version does not know: drop the plan
    return Order(
        kind=kind,  # type: ignore[arg-type]
        plan_id=o.plan_id,
        joiner=o.joiner,
        step=o.step if o.kind == pb.Order.ARM else None,
        timeout_s=o.timeout_s,
        rendezvous_prefix=o.rendezvous_prefix,
        backend=o.backend or "gloo",
        plan_key=o.plan_key,
    )


def answer_to_pb(a: Answer) -> pb.RecoverResponse:
    out = pb.RecoverResponse(
        state=_ANSWER_STATES[a.state],
        reason=a.reason,
        plan_id=a.plan_id,
        donor=a.donor,
        rendezvous=a.rendezvous,
        rendezvous_prefix=a.rendezvous_prefix,
        timeout_s=a.timeout_s,
        backend=a.backend,
        fresh=a.fresh,
        plan_key=a.plan_key,
    )
    if a.step is not None:
        out.step = a.step
    for st in a.stripes:
        out.stripes.add(
            donor=st.donor,
            rendezvous=st.rendezvous,
            rendezvous_prefix=st.rendezvous_prefix,
            share=st.share,
        )
    return out


def _stripes_from_pb(r: pb.RecoverResponse) -> tuple[StripeSource, ...]:
    """A striped answer's donors, checked (the joiner opens a group per entry)."""
    if len(r.stripes) > MAX_DONORS:
        raise ConfigError("stripes", len(r.stripes), f"at most {MAX_DONORS} donors per plan")
    out = []
    for st in r.stripes:
        if not (math.isfinite(st.share) and st.share > 0):
            raise ConfigError("stripes.share", st.share, "must be finite and positive")
        check_text("stripes.donor", st.donor, MAX_NAME_CHARS)
        check_text("stripes.rendezvous", st.rendezvous, MAX_ADDRESS_CHARS)
        check_text("stripes.rendezvous_prefix", st.rendezvous_prefix, MAX_ADDRESS_CHARS)
        out.append(
            StripeSource(
                donor=st.donor,
                rendezvous=st.rendezvous,
                rendezvous_prefix=st.rendezvous_prefix,
                share=st.share,
            )
        )
    if len({st.donor for st in out}) != len(out):
        raise ConfigError("stripes", [st.donor for st in out], "must name each donor once")
    if out and out[0].donor != r.donor:
        raise ConfigError("stripes", out[0].donor, f"must start with the donor named ({r.donor!r})")
    return tuple(out)


def answer_from_pb(r: pb.RecoverResponse) -> Answer:
    """A coordinator's answer, checked.

    Raises:
        ConfigError: a striped answer with too many donors, a donor twice or a bad share.
    """
    return Answer(
        state=_ANSWER_NAMES.get(r.state, "wait"),  # type: ignore[arg-type]
        reason=r.reason,
        plan_id=r.plan_id,
        donor=r.donor,
        step=_opt(r, "step"),
        rendezvous=r.rendezvous,
        rendezvous_prefix=r.rendezvous_prefix,
        timeout_s=r.timeout_s,
        backend=r.backend or "gloo",
        plan_key=r.plan_key,
        fresh=r.fresh,
        stripes=_stripes_from_pb(r),
    )


def report_to_pb(r: Report) -> pb.TransferReport:
    return pb.TransferReport(
        plan_id=r.plan_id,
        replica_id=r.replica_id,
        group_rank=r.group_rank,
        role=_ROLES[r.role],
        result=r.result,
        message=r.message[:MAX_MESSAGE_CHARS],
        step=r.step or 0,
        bytes=r.bytes,
        seconds=r.seconds,
        phases=dict(r.phases),
        address=r.address,
        blame=r.blame,
    )


def report_from_pb(r: pb.TransferReport) -> Report:
    """A transfer report, checked (its numbers feed the donors' bandwidth and shares).

    Raises:
        ConfigError: an unknown role or result, or a time that is not a finite
            number of seconds in [0, :data:`MAX_REPORT_SECONDS`].
    """
    role = _ROLE_NAMES.get(r.role)
    if role is None:
        raise ConfigError("role", r.role, "must be DONOR or JOINER")
    if r.result not in RESULTS:
        raise ConfigError("result", r.result[:40], f"must be one of {RESULTS}")
    if len(r.phases) > MAX_PHASES:
        raise ConfigError("phases", len(r.phases), f"at most {MAX_PHASES} phases")
    for name, seconds in (("seconds", r.seconds), *r.phases.items()):
        if name != "seconds":
            check_text("phase", name, 64)
        if not (math.isfinite(seconds) and 0 <= seconds <= MAX_REPORT_SECONDS):
            raise ConfigError(name, seconds, f"must be in [0, {MAX_REPORT_SECONDS:g}] seconds")
    check_text("address", r.address, MAX_ADDRESS_CHARS, empty=True)
    check_text("blame", r.blame, MAX_NAME_CHARS, empty=True)
    return Report(
        plan_id=r.plan_id,
        replica_id=r.replica_id,
        group_rank=r.group_rank,
        role=role,
        result=r.result,
        message=r.message[:MAX_MESSAGE_CHARS],
        step=r.step,
        bytes=r.bytes,
        seconds=r.seconds,
        phases=dict(r.phases),
        address=r.address,
        blame=r.blame,
    )


# ---- status --------------------------------------------------------------------


def plan_to_pb(p: PlanSnapshot) -> pb.PlanStatus:
    out = pb.PlanStatus(
        plan_id=p.plan_id,
        joiner=p.joiner,
        donor=p.donor,
        state=p.state,
        age_s=p.age_s,
        ranks_done=p.ranks_done,
        reason=p.reason,
        bytes=p.bytes,
        recovery_s=p.recovery_s,
        transfer_s=p.transfer_s,
        phases=dict(p.phases),
        addresses=list(p.addresses),
        attempt=p.attempt,
    )
    if p.step is not None:
        out.step = p.step
    for d in p.donors:
        out.donors.add(replica_id=d.replica_id, share=d.share, bytes=d.bytes, state=d.state)
    return out


def plan_from_pb(p: pb.PlanStatus) -> PlanSnapshot:
    return PlanSnapshot(
        plan_id=p.plan_id,
        joiner=p.joiner,
        donor=p.donor,
        step=_opt(p, "step"),
        state=cast(PlanState, p.state),  # shown, never acted on
        attempt=p.attempt,
        age_s=p.age_s,
        ranks_done=p.ranks_done,
        reason=p.reason,
        bytes=p.bytes,
        transfer_s=p.transfer_s,
        recovery_s=p.recovery_s,
        phases=dict(p.phases),
        addresses=tuple(p.addresses),
        donors=tuple(
            DonorShare(replica_id=d.replica_id, share=d.share, bytes=d.bytes, state=d.state)
            for d in p.donors
        ),
    )


def status_to_pb(s: ClusterStatus) -> pb.StatusResponse:
    out = pb.StatusResponse(
        coordinator_id=s.coordinator_id, uptime_s=s.uptime_s, next_page_token=s.next_page_token
    )
    for rep in s.replicas:
        r = out.replicas.add(
            replica_id=rep.replica_id,
            world_size=rep.world_size,
            healthy=rep.healthy,
            state=rep.state,
        )
        if rep.step is not None:
            r.step = rep.step
        for k in rep.ranks:
            rank = r.ranks.add(
                group_rank=k.group_rank,
                healthy=k.healthy,
                last_seen_s=k.last_seen_s,
                rendezvous=k.rendezvous,
                device_kind=k.device_kind,
                labels=dict(k.labels),
                interface=k.interface,
            )
            if k.step is not None:
                rank.step = k.step
    out.active.extend(plan_to_pb(p) for p in s.active)
    out.recent.extend(plan_to_pb(p) for p in s.recent)
    return out


def status_from_pb(r: pb.StatusResponse) -> ClusterStatus:
    return ClusterStatus(
        coordinator_id=r.coordinator_id,
        uptime_s=r.uptime_s,
        replicas=[
            ReplicaStatus(
                replica_id=rep.replica_id,
                world_size=rep.world_size,
                step=_opt(rep, "step"),
                healthy=rep.healthy,
                state=cast(ReplicaState, rep.state),  # shown, never acted on
                ranks=[
                    RankStatus(
                        group_rank=k.group_rank,
                        step=_opt(k, "step"),
                        healthy=k.healthy,
                        last_seen_s=k.last_seen_s,
                        rendezvous=k.rendezvous,
                        device_kind=k.device_kind,
                        labels=dict(k.labels),
                        interface=k.interface,
                    )
                    for k in rep.ranks
                ],
            )
            for rep in r.replicas
        ],
        active=[plan_from_pb(p) for p in r.active],
        recent=[plan_from_pb(p) for p in r.recent],
        next_page_token=r.next_page_token,
    )
