"""The coordinator's client: plain data in and out, a deadline on every call.

Proto types stop here. gRPC status codes map back to recoveryd errors in one
place (:func:`_error_for`): UNAVAILABLE / DEADLINE_EXCEEDED become
:class:`CoordinatorUnavailableError` (a failed TLS handshake
:class:`AuthenticationError`), NOT_FOUND :class:`UnknownMemberError`,
UNAUTHENTICATED :class:`AuthenticationError`, PERMISSION_DENIED
:class:`PermissionDeniedError`.

The client keeps the secret ``Register`` hands out for each rank it
registered, and sends it with every later call for that rank.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from datetime import timedelta
from typing import Any, TypeVar

import grpc

from recoveryd import codec
from recoveryd.credentials import Credentials
from recoveryd.errors import (
    AuthenticationError,
    CoordinatorUnavailableError,
    PermissionDeniedError,
    RecoverydError,
    UnknownMemberError,
)
from recoveryd.protocol import Answer, Beat, ClusterStatus, MemberInfo, Order, Registration, Report
from recoveryd.v1 import coordinator_pb2 as pb
from recoveryd.v1 import coordinator_pb2_grpc as pb_grpc

_T = TypeVar("_T")


def _tls_hint(detail: str) -> str:
    """What an UNAVAILABLE over TLS most likely means, from grpc's details."""
    if "CERTIFICATE_VERIFY_FAILED" in detail:
        return (
            " (this process does not trust the coordinator's certificate: check that "
            "--tls-ca/RECOVERYD_TLS_CA holds the CA that signed it)"
        )
    if "Peer name" in detail or "hostname" in detail.lower():
        return (
            " (the coordinator's certificate does not name the address dialled: set "
            "--tls-server-name/RECOVERYD_TLS_SERVER_NAME to a name it has)"
        )
    return (
        " (over TLS this is also how a coordinator refusing this client's certificate "
        "looks: check that --tls-cert/RECOVERYD_TLS_CERT is of the job's CA)"
    )


def _error_for(
    address: str, err: grpc.RpcError, who: tuple[str, int] = ("?", -1), *, tls: bool = False
) -> Exception:
    """The one mapping from gRPC status codes back to recoveryd errors.

    ``who``: the rank the call was about, for :class:`UnknownMemberError`.
    ``tls``: the channel speaks TLS (a server refusing its certificate then
    just closes the connection, which reads as UNAVAILABLE: the message says so).
    """
    code = err.code() if isinstance(err, grpc.Call) else None
    detail = err.details() if isinstance(err, grpc.Call) else str(err)
    if code is grpc.StatusCode.UNAUTHENTICATED:
        return AuthenticationError(address, detail or str(code))
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, None):
        # Still "unavailable" (retried): a certificate renewed on one side before
        # the other has the new CA heals by itself, and must not end recoveries.
        hint = _tls_hint(detail or "") if tls and code is grpc.StatusCode.UNAVAILABLE else ""
        return CoordinatorUnavailableError(address, f"{code}: {detail}{hint}")
    if code is grpc.StatusCode.NOT_FOUND:
        return UnknownMemberError(*who)
    if code is grpc.StatusCode.PERMISSION_DENIED:
        return PermissionDeniedError(who[0], who[1], detail or "")
    return RecoverydError(f"coordinator {address} refused the call ({code}): {detail}")


class CoordinatorClient:
    """A channel to the coordinator.

    Args:
        address: ``host:port`` of the coordinator.
        timeout: deadline of each unary call.
        credentials: what to present (default: ``RECOVERYD_TOKEN_FILE`` and
            ``RECOVERYD_TLS_*``, nothing when unset).
    """

    def __init__(
        self,
        address: str,
        *,
        timeout: timedelta = timedelta(seconds=5),
        credentials: Credentials | None = None,
    ) -> None:
        self.address = address
        self._timeout = timeout.total_seconds()
        self.credentials = credentials if credentials is not None else Credentials.from_env()
        self._channel = self.credentials.channel(
            address,
            options=[
                ("grpc.keepalive_time_ms", 10_000),
                ("grpc.keepalive_timeout_ms", 5_000),
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 2_000),
            ],
        )
        self._stub = pb_grpc.CoordinatorStub(self._channel)
        self._lock = threading.Lock()
        self._secrets: dict[tuple[str, int], str] = {}

    def secret(self, replica_id: str, group_rank: int) -> str:
        """The secret of this rank's registration, if this client holds one ("" if not)."""
        with self._lock:
            return self._secrets.get((replica_id, group_rank), "")

    def hold(self, replica_id: str, group_rank: int, secret: str) -> None:
        """Takes a rank's secret kept from before (a restarted agent replacing its own rank)."""
        with self._lock:
            self._secrets[(replica_id, group_rank)] = secret

    def close(self) -> None:
        """Closes the channel (open watches end)."""
        self._channel.close()

    def _call(self, fn: Callable[..., _T], request: Any, timeout: float | None = None) -> _T:
        try:
            return fn(request, timeout=self._timeout if timeout is None else timeout)
        except grpc.RpcError as err:
            about = getattr(request, "member", request)  # Register names its rank in member
            who = (getattr(about, "replica_id", "?"), getattr(about, "group_rank", -1))
            raise _error_for(self.address, err, who, tls=self.credentials.tls) from None

    def register(self, info: MemberInfo, *, step: int | None) -> Registration:
        """Registers (or re-registers) one rank."""
        r = self._call(
            self._stub.Register,
            pb.RegisterRequest(
                member=codec.member_to_pb(info, step=step),
                rank_secret=self.secret(info.replica_id, info.group_rank),
            ),
        )
        reg = codec.registration_from_pb(r)
        self.hold(info.replica_id, info.group_rank, reg.rank_secret)
        return reg

    def leave(self, replica_id: str, group_rank: int, agent_id: str) -> bool:
        """Tells the coordinator a rank goes away on purpose; returns whether it was known."""
        r = self._call(
            self._stub.Leave,
            pb.LeaveRequest(
                replica_id=replica_id,
                group_rank=group_rank,
                agent_id=agent_id,
                rank_secret=self.secret(replica_id, group_rank),
            ),
        )
        return bool(r.left)

    def heartbeat(self, beats: Sequence[Beat]) -> tuple[str, list[int]]:
        """Sends beats in one call; returns the coordinator id and the indices it does not know."""
        request = codec.beats_to_pb(list(beats))
        for b in request.beats:
            b.rank_secret = self.secret(b.replica_id, b.group_rank)
        r = self._call(self._stub.Heartbeat, request)
        return r.coordinator_id, list(r.unknown)

    def watch(self, replica_id: str, group_rank: int) -> tuple[Iterator[Order], Callable[[], None]]:
        """The orders for one rank as they come, and a function that ends the stream.

        The iterator raises :class:`CoordinatorUnavailableError` when the
        stream breaks (e.g. the coordinator restarted).
        """
        call = self._stub.Watch(
            pb.WatchRequest(
                replica_id=replica_id,
                group_rank=group_rank,
                rank_secret=self.secret(replica_id, group_rank),
            )
        )

        def orders() -> Iterator[Order]:
            try:
                for o in call:
                    yield codec.order_from_pb(o)
            except grpc.RpcError as err:
                if err.code() is grpc.StatusCode.CANCELLED:
                    return
                raise _error_for(
                    self.address, err, (replica_id, group_rank), tls=self.credentials.tls
                ) from None
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
                rank_secret=self.secret(replica_id, group_rank),
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
                rank_secret=self.secret(replica_id, group_rank),
            ),
            timeout=self._timeout + wait.total_seconds(),
        )
        return codec.answer_from_pb(r)

    def report(self, report: Report) -> None:
        """Reports one side of one transfer."""
        request = codec.report_to_pb(report)
        request.rank_secret = self.secret(report.replica_id, report.group_rank)
        self._call(self._stub.ReportTransfer, request)

    def status(self, *, recent: int = 20, max_pages: int = 1000) -> ClusterStatus:
        """The cluster as the coordinator sees it (every page of it, up to ``max_pages``)."""
        status = codec.status_from_pb(
            self._call(self._stub.GetStatus, pb.StatusRequest(recent=recent))
        )
        replicas = list(status.replicas)
        token = status.next_page_token
        for _ in range(max_pages - 1):
            if not token:
                break
            page = codec.status_from_pb(
                self._call(self._stub.GetStatus, pb.StatusRequest(recent=0, page_token=token))
            )
            if page.next_page_token and page.next_page_token <= token:
                break  # a token that does not move on would loop
            replicas.extend(page.replicas)
            token = page.next_page_token
        return replace(status, replicas=replicas, next_page_token=token)
