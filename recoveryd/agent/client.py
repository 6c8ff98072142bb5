"""The coordinator's client: plain data in and out, a deadline on every call.

Proto types stop here. gRPC status codes map back to recoveryd errors in one
place (:func:`_error_for`): UNAVAILABLE / DEADLINE_EXCEEDED become
:class:`CoordinatorUnavailableError`, NOT_FOUND :class:`UnknownMemberError`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import grpc

from recoveryd.coordinator.membership import MemberInfo
from recoveryd.coordinator.messages import Answer, Order, PlanSnapshot, Report
from recoveryd.errors import CoordinatorUnavailableError, RecoverydError, UnknownMemberError
from recoveryd.v1 import coordinator_pb2 as pb
from recoveryd.v1 import coordinator_pb2_grpc as pb_grpc

_T = TypeVar("_T")
_ORDER_KINDS = {pb.Order.PREPARE: "prepare", pb.Order.ARM: "arm", pb.Order.CANCEL: "cancel"}
_STATES = {
    pb.RecoverResponse.NO_DONOR: "no_donor",
    pb.RecoverResponse.WAIT: "wait",
    pb.RecoverResponse.TRANSFER: "transfer",
    pb.RecoverResponse.DONE: "done",
}
_ROLES = {"donor": pb.TransferReport.DONOR, "joiner": pb.TransferReport.JOINER}


@dataclass(frozen=True, kw_only=True, slots=True)
class Registration:
    """The coordinator's answer to a registration."""

    coordinator_id: str
    heartbeat_interval: timedelta
    heartbeat_timeout: timedelta


@dataclass(frozen=True, kw_only=True, slots=True)
class Beat:
    """One rank's heartbeat."""

    replica_id: str
    group_rank: int
    step: int | None
    healthy: bool = True


@dataclass(frozen=True, kw_only=True, slots=True)
class RankStatus:
    """A rank in ``recoveryd status``."""

    group_rank: int
    step: int | None
    healthy: bool
    last_seen_s: float
    rendezvous: str
    device_kind: str
    labels: Mapping[str, str]
    interface: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class ReplicaStatus:
    """A replica in ``recoveryd status``."""

    replica_id: str
    world_size: int
    step: int | None
    healthy: bool
    state: str
    ranks: Sequence[RankStatus]


@dataclass(frozen=True, kw_only=True, slots=True)
class ClusterStatus:
    """The cluster as the coordinator sees it."""

    coordinator_id: str
    uptime_s: float
    replicas: Sequence[ReplicaStatus]
    active: Sequence[PlanSnapshot]
    recent: Sequence[PlanSnapshot] = field(default_factory=list)


def _error_for(address: str, err: grpc.RpcError, who: tuple[str, int] = ("?", -1)) -> Exception:
    """The one mapping from gRPC status codes back to recoveryd errors.

    ``who``: the rank the call was about, for :class:`UnknownMemberError`.
    """
    code = err.code() if isinstance(err, grpc.Call) else None
    detail = err.details() if isinstance(err, grpc.Call) else str(err)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, None):
        return CoordinatorUnavailableError(address, f"{code}: {detail}")
    if code is grpc.StatusCode.NOT_FOUND:
        return UnknownMemberError(*who)
    return RecoverydError(f"coordinator {address} refused the call ({code}): {detail}")


class CoordinatorClient:
    """A channel to the coordinator.

    Args:
        address: ``host:port`` of the coordinator.
        timeout: deadline of each unary call.
    """

    def __init__(self, address: str, *, timeout: timedelta = timedelta(seconds=5)) -> None:
        self.address = address
        self._timeout = timeout.total_seconds()
        self._channel = grpc.insecure_channel(
            address,
            options=[
                ("grpc.keepalive_time_ms", 10_000),
                ("grpc.keepalive_timeout_ms", 5_000),
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 2_000),
            ],
        )
        self._stub = pb_grpc.CoordinatorStub(self._channel)

    def close(self) -> None:
        """Closes the channel (open watches end)."""
        self._channel.close()

    def _call(self, fn: Callable[..., _T], request: Any, timeout: float | None = None) -> _T:
        try:
            return fn(request, timeout=self._timeout if timeout is None else timeout)
        except grpc.RpcError as err:
            who = (getattr(request, "replica_id", "?"), getattr(request, "group_rank", -1))
            raise _error_for(self.address, err, who) from None

    def register(self, info: MemberInfo, *, step: int | None) -> Registration:
        """Registers (or re-registers) one rank."""
        member = pb.Member(
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
            member.step = step
        r = self._call(self._stub.Register, pb.RegisterRequest(member=member))
        return Registration(
            coordinator_id=r.coordinator_id,
            heartbeat_interval=timedelta(seconds=r.heartbeat_interval_s),
            heartbeat_timeout=timedelta(seconds=r.heartbeat_timeout_s),
        )

    def leave(self, replica_id: str, group_rank: int, agent_id: str) -> bool:
        """Tells the coordinator a rank goes away on purpose; returns whether it was known."""
        r = self._call(
            self._stub.Leave,
            pb.LeaveRequest(replica_id=replica_id, group_rank=group_rank, agent_id=agent_id),
        )
        return bool(r.left)

    def heartbeat(self, beats: Sequence[Beat]) -> tuple[str, list[int]]:
        """Sends beats in one call; returns the coordinator id and the indices it does not know."""
        req = pb.HeartbeatRequest()
        for b in beats:
            beat = req.beats.add(
                replica_id=b.replica_id, group_rank=b.group_rank, healthy=b.healthy
            )
            if b.step is not None:
                beat.step = b.step
        r = self._call(self._stub.Heartbeat, req)
        return r.coordinator_id, list(r.unknown)

    def watch(self, replica_id: str, group_rank: int) -> tuple[Iterator[Order], Callable[[], None]]:
        """The orders for one rank as they come, and a function that ends the stream.

        The iterator raises :class:`CoordinatorUnavailableError` when the
        stream breaks (e.g. the coordinator restarted).
        """
        call = self._stub.Watch(pb.WatchRequest(replica_id=replica_id, group_rank=group_rank))

        def orders() -> Iterator[Order]:
            try:
                for o in call:
                    yield Order(
                        kind=_ORDER_KINDS.get(o.kind, "cancel"),  # type: ignore[arg-type]
                        plan_id=o.plan_id,
                        joiner=o.joiner,
                        step=o.step if o.kind == pb.Order.ARM else None,
                        timeout_s=o.timeout_s,
                        rendezvous_prefix=o.rendezvous_prefix,
                        backend=o.backend or "gloo",
                    )
            except grpc.RpcError as err:
                if err.code() is grpc.StatusCode.CANCELLED:
                    return
                raise _error_for(self.address, err) from None
            raise CoordinatorUnavailableError(self.address, "the order stream ended")

        return orders(), call.cancel

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
        """A donor rank joined a plan's group at ``step``; returns whether the plan is live."""
        r = self._call(
            self._stub.Acknowledge,
            pb.AcknowledgeRequest(
                plan_id=plan_id,
                replica_id=replica_id,
                group_rank=group_rank,
                step=step,
                idle=idle,
                step_time_s=step_time_s,
            ),
        )
        return bool(r.active)

    def recover(
        self,
        replica_id: str,
        group_rank: int,
        *,
        wait: timedelta,
        received_plan_id: int = 0,
        joined_plan_id: int = 0,
    ) -> Answer:
        """Asks how this rank's recovery stands; held up to ``wait`` for news."""
        r = self._call(
            self._stub.Recover,
            pb.RecoverRequest(
                replica_id=replica_id,
                group_rank=group_rank,
                wait_s=wait.total_seconds(),
                received_plan_id=received_plan_id,
                joined_plan_id=joined_plan_id,
            ),
            timeout=self._timeout + wait.total_seconds(),
        )
        return Answer(
            state=_STATES.get(r.state, "wait"),  # type: ignore[arg-type]
            reason=r.reason,
            plan_id=r.plan_id,
            donor=r.donor,
            step=r.step if r.HasField("step") else None,
            rendezvous=r.rendezvous,
            rendezvous_prefix=r.rendezvous_prefix,
            timeout_s=r.timeout_s,
            backend=r.backend or "gloo",
            fresh=r.fresh,
        )

    def report(self, report: Report) -> None:
        """Reports one side of one transfer."""
        self._call(
            self._stub.ReportTransfer,
            pb.TransferReport(
                plan_id=report.plan_id,
                replica_id=report.replica_id,
                group_rank=report.group_rank,
                role=_ROLES[report.role],
                result=report.result,
                message=report.message[:2000],
                step=report.step or 0,
                bytes=report.bytes,
                seconds=report.seconds,
                phases=dict(report.phases),
                address=report.address,
            ),
        )

    def status(self, *, recent: int = 20) -> ClusterStatus:
        """The cluster as the coordinator sees it."""
        r = self._call(self._stub.GetStatus, pb.StatusRequest(recent=recent))
        return ClusterStatus(
            coordinator_id=r.coordinator_id,
            uptime_s=r.uptime_s,
            replicas=[
                ReplicaStatus(
                    replica_id=rep.replica_id,
                    world_size=rep.world_size,
                    step=rep.step if rep.HasField("step") else None,
                    healthy=rep.healthy,
                    state=rep.state,
                    ranks=[
                        RankStatus(
                            group_rank=k.group_rank,
                            step=k.step if k.HasField("step") else None,
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
            active=[_snapshot(p) for p in r.active],
            recent=[_snapshot(p) for p in r.recent],
        )


def _snapshot(p: pb.PlanStatus) -> PlanSnapshot:
    return PlanSnapshot(
        plan_id=p.plan_id,
        joiner=p.joiner,
        donor=p.donor,
        step=p.step if p.HasField("step") else None,
        state=p.state,  # type: ignore[arg-type]
        attempt=p.attempt,
        age_s=p.age_s,
        ranks_done=p.ranks_done,
        reason=p.reason,
        bytes=p.bytes,
        transfer_s=p.transfer_s,
        recovery_s=p.recovery_s,
        phases=dict(p.phases),
        addresses=tuple(p.addresses),
    )
