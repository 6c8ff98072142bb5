"""The coordinator's client: plain data in and out, a deadline on every call.

Proto types stop here. gRPC status codes map back to recoveryd errors in one
place (:func:`_error_for`): UNAVAILABLE / DEADLINE_EXCEEDED become
:class:`CoordinatorUnavailableError`, NOT_FOUND :class:`UnknownMemberError`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import grpc

from recoveryd import codec
from recoveryd.errors import CoordinatorUnavailableError, RecoverydError, UnknownMemberError
from recoveryd.protocol import Answer, Beat, ClusterStatus, MemberInfo, Order, Registration, Report
from recoveryd.v1 import coordinator_pb2 as pb
from recoveryd.v1 import coordinator_pb2_grpc as pb_grpc

_T = TypeVar("_T")


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
        r = self._call(
            self._stub.Register,
            pb.RegisterRequest(member=codec.member_to_pb(info, step=step)),
        )
        return codec.registration_from_pb(r)

    def leave(self, replica_id: str, group_rank: int, agent_id: str) -> bool:
        """Tells the coordinator a rank goes away on purpose; returns whether it was known."""
        r = self._call(
            self._stub.Leave,
            pb.LeaveRequest(replica_id=replica_id, group_rank=group_rank, agent_id=agent_id),
        )
        return bool(r.left)

    def heartbeat(self, beats: Sequence[Beat]) -> tuple[str, list[int]]:
        """Sends beats in one call; returns the coordinator id and the indices it does not know."""
        r = self._call(self._stub.Heartbeat, codec.beats_to_pb(list(beats)))
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
                    yield codec.order_from_pb(o)
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
        return codec.answer_from_pb(r)

    def report(self, report: Report) -> None:
        """Reports one side of one transfer."""
        self._call(self._stub.ReportTransfer, codec.report_to_pb(report))

    def status(self, *, recent: int = 20) -> ClusterStatus:
        """The cluster as the coordinator sees it."""
        r = self._call(self._stub.GetStatus, pb.StatusRequest(recent=recent))
        return codec.status_from_pb(r)
