"""The gRPC servicer: proto in, policy calls, proto out (nothing else lives here).

It runs on grpc's asyncio server, so thousands of open ``Watch`` streams and
held ``Recover`` long polls cost no threads, and the policy objects are only
ever touched from the event loop's thread (no locks). Messages are converted
by :mod:`recoveryd.codec`; every unary RPC runs under :func:`_mapped`, the one
place errors become status codes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeAlias, TypeVar

import grpc

from recoveryd import codec
from recoveryd._time import Deadline
from recoveryd.coordinator.census import cluster_status, take_census
from recoveryd.coordinator.config import CoordinatorConfig
from recoveryd.coordinator.gate import certificate_names
from recoveryd.coordinator.membership import Membership
from recoveryd.coordinator.planner import Planner
from recoveryd.errors import (
    AuthenticationError,
    ConfigError,
    LimitExceededError,
    PermissionDeniedError,
    UnknownMemberError,
)
from recoveryd.metrics import CoordinatorMetrics
from recoveryd.protocol import MemberInfo, Order, Registration
from recoveryd.v1 import coordinator_pb2 as pb
from recoveryd.v1 import coordinator_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

_MAX_WAIT_S = 30.0
"""The longest a ``Recover`` long poll is held, whatever the agent asks."""
_QUEUED_ORDERS = 1024  # per rank; orders for a rank that never watches are dropped oldest first
MAX_BEATS = 4096
"""The most beats one Heartbeat call may carry."""
STATUS_PAGE_REPLICAS = 500
"""Replicas per GetStatus page, at most (and by default)."""
STATUS_PAGE_RANKS = 20_000
"""Ranks per GetStatus page, at most (a page holds at least one replica)."""

_Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
_Self = TypeVar("_Self", bound="CoordinatorService")


def _status_for(err: Exception) -> tuple[grpc.StatusCode, str]:
    """The one mapping from recoveryd errors to gRPC status codes."""
    if isinstance(err, UnknownMemberError):
        return grpc.StatusCode.NOT_FOUND, str(err)
    if isinstance(err, AuthenticationError):
        return grpc.StatusCode.UNAUTHENTICATED, err.detail
    if isinstance(err, PermissionDeniedError):
        return grpc.StatusCode.PERMISSION_DENIED, err.detail  # the caller knows whom it named
    if isinstance(err, LimitExceededError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(err)
    if isinstance(err, ConfigError | ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(err)
    return grpc.StatusCode.INTERNAL, f"{type(err).__name__}: {err}"


def _mapped(
    rpc: Callable[[_Self, _Req, _Context], Awaitable[_Resp]],
) -> Callable[[_Self, _Req, _Context], Awaitable[_Resp]]:
    """Runs a unary RPC; an error it raises aborts the call with its status code."""

    @functools.wraps(rpc)
    async def handler(self: _Self, request: _Req, context: _Context) -> _Resp:
        try:
            return await rpc(self, request, context)
        except grpc.aio.AbortError:
            raise  # the handler chose its status itself
        except Exception as err:
            code, message = _status_for(err)
            if code is grpc.StatusCode.INTERNAL:
                logger.exception("internal error in the coordinator", exc_info=err)
            await context.abort(code, message)
            raise  # unreachable: abort raises

    return handler


class CoordinatorService(pb_grpc.CoordinatorServicer):  # type: ignore[misc]
    """The servicer; create it inside the server's event loop.

    Args:
        config: timeouts and fences.
        clock: seconds on a monotonic clock (injectable for tests).
        metrics: where to count (``None``: nowhere).
        check_identities: callers hold client certificates, and a call for a
            replica must come with a certificate that names it.
    """

    def __init__(
        self,
        config: CoordinatorConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        metrics: CoordinatorMetrics | None = None,
        check_identities: bool = False,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self._check_identities = check_identities
        self.coordinator_id = uuid.uuid4().hex[:12]
        self.members = Membership(heartbeat_timeout=config.heartbeat_timeout, clock=clock)
        self.planner = Planner(
            self.members,
            config,
            send=self._send,
            clock=clock,
            namespace=self.coordinator_id,
            # Ids apart across restarts (a new block of 1,000 in 9,000), so a stale
            # id from an agent does not match a new plan; short enough to read.
            first_plan_id=1000 * (1 + secrets.randbelow(9000)) + 1,
            observer=metrics,
        )
        self._clock = clock
        self._started = clock()
        self._queues: dict[tuple[str, int], asyncio.Queue[Order | None]] = {}
        self._news = asyncio.Event()
        self._silent: set[tuple[str, int]] = set()

    # ---- plumbing --------------------------------------------------------------

    def _send(self, replica_id: str, group_rank: int, order: Order) -> None:
        q = self._queues.setdefault((replica_id, group_rank), asyncio.Queue(_QUEUED_ORDERS))
        if q.full():
            q.get_nowait()
        q.put_nowait(order)

    def _end_watch(self, key: tuple[str, int]) -> None:
        """Ends the rank's open order stream, if any (orders queued for it stay queued)."""
        q = self._queues.get(key)
        if q is not None:
            if q.full():
                q.get_nowait()
            q.put_nowait(None)

    def _changed(self) -> None:
        """Wakes every held long poll (they re-read their answer)."""
        self._news.set()
        self._news = asyncio.Event()

    def _tick(self) -> None:
        """Fails plans that ran out of time, waking long polls if anything changed."""
        before = self.planner.version
        self.planner.tick()
        if self.planner.version != before:
            self._changed()

    def _observe(self) -> None:
        """Hands the cluster's counts to the metrics."""
        if self.metrics is None:
            return
        census = take_census(self.members, self.planner)
        silent = self.members.silent_ranks()
        new_misses, self._silent = len(silent - self._silent), silent
        self.metrics.observe_cluster(
            replicas=census.replicas,
            healthy_ranks=census.healthy_ranks,
            unhealthy_ranks=census.unhealthy_ranks,
            in_flight=census.in_flight,
            slowest_step=census.slowest_step,
            fastest_step=census.fastest_step,
            new_misses=new_misses,
        )

    async def tick_forever(self, period_s: float) -> None:
        """Fails timed-out plans and wakes long polls, every ``period_s``; once a
        second, forgets long-silent ranks and updates the metrics."""
        housekept = 0.0
        while True:
            await asyncio.sleep(period_s)
            before = self.planner.version
            try:
                self.planner.tick()
                if self._clock() - housekept >= 1.0:
                    housekept = self._clock()
                    self.planner.housekeep()
                    self._observe()
            except Exception:
                logger.exception("coordinator tick failed")
            if self.planner.version != before:
                self._changed()

    # ---- who may act for a rank ------------------------------------------------

    def _check_replica(self, context: _Context, replica_id: str) -> None:
        """With client certificates, the caller's must name the replica it acts for."""
        if not self._check_identities:
            return
        names = certificate_names(context)
        if replica_id not in names:
            # Not a passing refusal: these credentials will never act for the replica.
            raise AuthenticationError(
                "",
                f"the client certificate names {names[:4]}, not replica {replica_id!r}: give "
                "each replica's agents a certificate whose CN or a SAN is its replica id",
            )

    def _authorize(self, context: _Context, replica_id: str, group_rank: int, secret: str) -> None:
        """The caller holds this rank: its certificate (if any) names the replica, and it
        carries the rank's secret.

        Raises:
            UnknownMemberError: the rank is not registered.
            AuthenticationError: the caller's certificate does not name the replica.
            PermissionDeniedError: the caller does not hold the rank.
        """
        self._check_replica(context, replica_id)
        self.members.authorize(replica_id, group_rank, secret)

    def _check_room(self, info: MemberInfo) -> None:
        """A new replica or rank fits under the coordinator's caps."""
        if self.members.member(info.replica_id, info.group_rank) is not None:
            return
        replicas, ranks = self.members.counts()
        if self.members.replica(info.replica_id) is None and replicas >= self.config.max_replicas:
            raise LimitExceededError("max_replicas", replicas + 1, self.config.max_replicas)
        if ranks >= self.config.max_ranks:
            raise LimitExceededError("max_ranks", ranks + 1, self.config.max_ranks)

    # ---- RPCs ------------------------------------------------------------------

    @_mapped
    async def Register(self, request: pb.RegisterRequest, context: _Context) -> pb.RegisterResponse:
        info, step = codec.member_from_pb(request.member)
        self._check_replica(context, info.replica_id)
        why = self.members.may_replace(info.replica_id, info.group_rank, request.rank_secret)
        if why:
            raise PermissionDeniedError(info.replica_id, info.group_rank, why)
        self._check_room(info)
        secret = secrets.token_urlsafe(32)
        restarted = self.members.register(info, step=step, secret=secret)
        self._end_watch((info.replica_id, info.group_rank))  # it was opened under the old secret
        self.planner.on_register(info, restarted=restarted)
        logger.info(
            "registered rank %d/%d of %r at %r%s",
            info.group_rank,
            info.group_world_size,
            info.replica_id,
            info.rendezvous,
            " (restarted)" if restarted else "",
        )
        self._changed()
        return codec.registration_to_pb(
            Registration(
                coordinator_id=self.coordinator_id,
                heartbeat_interval=self.config.heartbeat_interval,
                rank_secret=secret,
            )
        )

    @_mapped
    async def Leave(self, request: pb.LeaveRequest, context: _Context) -> pb.LeaveResponse:
        try:
            self._authorize(context, request.replica_id, request.group_rank, request.rank_secret)
        except UnknownMemberError:
            return pb.LeaveResponse(left=False)
        left = self.members.leave(request.replica_id, request.group_rank, request.agent_id)
        if left:
            self._end_watch((request.replica_id, request.group_rank))
            self.planner.on_leave(request.replica_id, request.group_rank)
            logger.info("rank %d of %r left", request.group_rank, request.replica_id)
            self._changed()
        return pb.LeaveResponse(left=left)

    @_mapped
    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: _Context
    ) -> pb.HeartbeatResponse:
        if len(request.beats) > MAX_BEATS:
            raise LimitExceededError("beats", len(request.beats), MAX_BEATS, "beats in one call")
        beats = codec.beats_from_pb(request)
        unknown: list[int] = []
        for i, (b, sent) in enumerate(zip(beats, request.beats, strict=True)):
            try:
                self._authorize(context, b.replica_id, b.group_rank, sent.rank_secret)
            except UnknownMemberError:
                unknown.append(i)
        # Every beat was authorised before any is recorded: a call is taken whole or not at all.
        skip = set(unknown)
        for i, b in enumerate(beats):
            if i not in skip:
                self.members.heartbeat(b.replica_id, b.group_rank, step=b.step, healthy=b.healthy)
        if self.metrics is not None:
            self.metrics.heartbeats.inc(len(beats))
            if unknown:
                self.metrics.unknown_heartbeats.inc(len(unknown))
        return pb.HeartbeatResponse(coordinator_id=self.coordinator_id, unknown=unknown)

    async def Watch(self, request: pb.WatchRequest, context: _Context) -> AsyncIterator[pb.Order]:
        try:
            self._authorize(context, request.replica_id, request.group_rank, request.rank_secret)
        except (UnknownMemberError, PermissionDeniedError, AuthenticationError) as err:
            code, message = _status_for(err)
            await context.abort(code, message)
        key = (request.replica_id, request.group_rank)
        old = self._queues.get(key)
        q: asyncio.Queue[Order | None] = asyncio.Queue(_QUEUED_ORDERS)
        queued: set[tuple[str, int]] = set()
        if old is not None:
            # A rank re-watching (it reconnected): keep what was queued, end the old stream.
            while not old.empty():
                item = old.get_nowait()
                if item is not None:
                    q.put_nowait(item)
                    queued.add((item.kind, item.plan_id))
            old.put_nowait(None)
        # Orders the rank should hold now, in case earlier ones were lost with
        # an old stream (the agent ignores the ones it already has).
        for replay in self.planner.orders_for(*key):
            if (replay.kind, replay.plan_id) not in queued and not q.full():
                q.put_nowait(replay)
        self._queues[key] = q
        try:
            while True:
                order = await q.get()
                if order is None:
                    return
                yield codec.order_to_pb(order)
        finally:
            if self._queues.get(key) is q:
                del self._queues[key]

    @_mapped
    async def Acknowledge(
        self, request: pb.AcknowledgeRequest, context: _Context
    ) -> pb.AcknowledgeResponse:
        self._authorize(context, request.replica_id, request.group_rank, request.rank_secret)
        active = self.planner.acknowledge(
            request.plan_id,
            request.replica_id,
            request.group_rank,
            request.step,
            idle=request.idle,
            step_time_s=request.step_time_s,
        )
        self._changed()
        return pb.AcknowledgeResponse(active=active)

    @_mapped
    async def Recover(self, request: pb.RecoverRequest, context: _Context) -> pb.RecoverResponse:
        self._authorize(context, request.replica_id, request.group_rank, request.rank_secret)
        deadline = Deadline(timedelta(seconds=min(max(request.wait_s, 0.0), _MAX_WAIT_S)))
        while True:
            before = self.planner.version
            answer = self.planner.recover(
                request.replica_id,
                request.group_rank,
                received_plan_id=request.received_plan_id,
            )
            if self.planner.version != before:
                self._changed()
            news = self._news  # taken after our own news, so only others' wake us
            pending = answer.state == "wait" or (
                answer.state == "transfer"
                and answer.step is None
                and answer.plan_id == request.joined_plan_id
            )
            if not pending or deadline.expired:
                return codec.answer_to_pb(answer)
            try:
                await asyncio.wait_for(news.wait(), deadline.remaining_s())
            except TimeoutError:
                pass

    @_mapped
    async def ReportTransfer(
        self, request: pb.TransferReport, context: _Context
    ) -> pb.ReportTransferResponse:
        report = codec.report_from_pb(request)
        self._authorize(context, report.replica_id, report.group_rank, request.rank_secret)
        self.planner.report(report)
        if report.result == "untrusted":
            logger.warning(
                "plan %d: a process without the plan's key joined its transfer group at %r "
                "(%s rank %d of %r saw it): someone who reaches the job's rendezvous stores "
                "is interfering; the plan is made again",
                report.plan_id,
                report.address,
                report.role,
                report.group_rank,
                report.replica_id,
            )
        log = logger.info if report.result == "ok" else logger.warning
        log(
            "plan %d: %s rank %d of %r: %s %s(%d bytes in %.3f s via %r)",
            report.plan_id,
            report.role,
            report.group_rank,
            report.replica_id,
            report.result,
            f"{report.message!r} " if report.message else "",
            report.bytes,
            report.seconds,
            report.address or "?",
        )
        self._changed()
        return pb.ReportTransferResponse()

    @_mapped
    async def GetStatus(self, request: pb.StatusRequest, context: _Context) -> pb.StatusResponse:
        self._tick()
        status = cluster_status(
            self.members,
            self.planner,
            take_census(self.members, self.planner),
            coordinator_id=self.coordinator_id,
            uptime_s=self._clock() - self._started,
            recent=min(request.recent or 20, self.config.recent_plans),
            after=request.page_token,
            max_replicas=min(request.page_size or STATUS_PAGE_REPLICAS, STATUS_PAGE_REPLICAS),
            max_ranks=STATUS_PAGE_RANKS,
        )
        return codec.status_to_pb(status)
