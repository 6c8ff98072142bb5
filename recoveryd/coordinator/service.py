"""The gRPC servicer: proto in, policy calls, proto out (nothing else lives here).

It runs on grpc's asyncio server, so thousands of open ``Watch`` streams and
held ``Recover`` long polls cost no threads, and the policy objects are only
ever touched from the event loop's thread (no locks). Errors map to status
codes in one place (:func:`_status_for`).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from recoveryd.coordinator.config import CoordinatorConfig
from recoveryd.coordinator.membership import MemberInfo, Membership, UnknownMemberError
from recoveryd.coordinator.messages import RESULTS, Answer, Order, PlanSnapshot, Report
from recoveryd.coordinator.planner import Planner
from recoveryd.errors import ConfigError
from recoveryd.metrics import CoordinatorMetrics
from recoveryd.v1 import coordinator_pb2 as pb
from recoveryd.v1 import coordinator_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

_ORDER_KINDS = {"prepare": pb.Order.PREPARE, "arm": pb.Order.ARM, "cancel": pb.Order.CANCEL}
_ANSWER_STATES = {
    "no_donor": pb.RecoverResponse.NO_DONOR,
    "wait": pb.RecoverResponse.WAIT,
    "transfer": pb.RecoverResponse.TRANSFER,
    "done": pb.RecoverResponse.DONE,
}
_ROLES = {pb.TransferReport.DONOR: "donor", pb.TransferReport.JOINER: "joiner"}
_MAX_WAIT_S = 30.0
_QUEUED_ORDERS = 1024  # per rank; orders for a rank that never watches are dropped oldest first


def _status_for(err: Exception) -> tuple[grpc.StatusCode, str]:
    """The one mapping from recoveryd errors to gRPC status codes."""
    if isinstance(err, UnknownMemberError):
        return grpc.StatusCode.NOT_FOUND, str(err)
    if isinstance(err, ConfigError | ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(err)
    return grpc.StatusCode.INTERNAL, f"{type(err).__name__}: {err}"


class CoordinatorService(pb_grpc.CoordinatorServicer):  # type: ignore[misc]
    """The servicer; create it inside the server's event loop.

    Args:
        config: timeouts and fences.
        clock: seconds on a monotonic clock (injectable for tests).
    """

    def __init__(
        self,
        config: CoordinatorConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        metrics: CoordinatorMetrics | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
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

    # ---- plumbing --------------------------------------------------------------

    def _send(self, replica_id: str, group_rank: int, order: Order) -> None:
        q = self._queues.setdefault((replica_id, group_rank), asyncio.Queue(_QUEUED_ORDERS))
        if q.full():
            q.get_nowait()
        q.put_nowait(order)

    def _changed(self) -> None:
        """Wakes every held long poll (they re-read their answer)."""
        self._news.set()
        self._news = asyncio.Event()

    async def tick_forever(self, period_s: float) -> None:
        """Fails timed-out plans and wakes long polls, every ``period_s``; once a
        second, forgets long-silent ranks."""
        housekept = 0.0
        while True:
            await asyncio.sleep(period_s)
            before = self.planner.version
            try:
                self.planner.tick()
                if self._clock() - housekept >= 1.0:
                    housekept = self._clock()
                    self.planner.housekeep()
                    if self.metrics is not None:
                        self.metrics.observe_cluster(self.members, self.planner)
            except Exception:
                logger.exception("coordinator tick failed")
            if self.planner.version != before:
                self._changed()

    async def _abort(self, context: grpc.aio.ServicerContext[Any, Any], err: Exception) -> None:
        code, message = _status_for(err)
        if code is grpc.StatusCode.INTERNAL:
            logger.exception("internal error in the coordinator", exc_info=err)
        await context.abort(code, message)

    # ---- RPCs ------------------------------------------------------------------

    async def Register(
        self, request: pb.RegisterRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RegisterResponse:
        m = request.member
        try:
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
            restarted = self.members.register(info, step=m.step if m.HasField("step") else None)
            self.planner.on_register(info, restarted=restarted)
        except Exception as err:
            await self._abort(context, err)
            raise  # unreachable: abort raises
        logger.info(
            "registered rank %d/%d of %r at %s%s",
            info.group_rank,
            info.group_world_size,
            info.replica_id,
            info.rendezvous,
            " (restarted)" if restarted else "",
        )
        self._changed()
        return pb.RegisterResponse(
            coordinator_id=self.coordinator_id,
            heartbeat_interval_s=self.config.heartbeat_interval.total_seconds(),
            heartbeat_timeout_s=self.config.heartbeat_timeout.total_seconds(),
        )

    async def Leave(
        self, request: pb.LeaveRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.LeaveResponse:
        try:
            left = self.members.leave(request.replica_id, request.group_rank, request.agent_id)
            if left:
                self.planner.on_leave(request.replica_id, request.group_rank)
        except Exception as err:
            await self._abort(context, err)
            raise  # unreachable: abort raises
        if left:
            logger.info("rank %d of %r left", request.group_rank, request.replica_id)
            self._changed()
        return pb.LeaveResponse(left=left)

    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.HeartbeatResponse:
        unknown = []
        for i, b in enumerate(request.beats):
            try:
                self.members.heartbeat(
                    b.replica_id,
                    b.group_rank,
                    step=b.step if b.HasField("step") else None,
                    healthy=b.healthy,
                )
            except UnknownMemberError:
                unknown.append(i)
        if self.metrics is not None:
            self.metrics.heartbeats.inc(len(request.beats))
            if unknown:
                self.metrics.unknown_heartbeats.inc(len(unknown))
        return pb.HeartbeatResponse(coordinator_id=self.coordinator_id, unknown=unknown)

    async def Watch(
        self, request: pb.WatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.Order]:
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
                yield pb.Order(
                    kind=_ORDER_KINDS[order.kind],
                    plan_id=order.plan_id,
                    joiner=order.joiner,
                    step=order.step or 0,
                    timeout_s=order.timeout_s,
                    rendezvous_prefix=order.rendezvous_prefix,
                    backend=order.backend,
                )
        finally:
            if self._queues.get(key) is q:
                del self._queues[key]

    async def Acknowledge(
        self, request: pb.AcknowledgeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.AcknowledgeResponse:
        try:
            active = self.planner.acknowledge(
                request.plan_id,
                request.replica_id,
                request.group_rank,
                request.step,
                idle=request.idle,
                step_time_s=request.step_time_s,
            )
        except Exception as err:
            await self._abort(context, err)
            raise
        self._changed()
        return pb.AcknowledgeResponse(active=active)

    async def Recover(
        self, request: pb.RecoverRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RecoverResponse:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(max(request.wait_s, 0.0), _MAX_WAIT_S)
        while True:
            before = self.planner.version
            try:
                answer = self.planner.recover(
                    request.replica_id,
                    request.group_rank,
                    received_plan_id=request.received_plan_id,
                )
            except Exception as err:
                await self._abort(context, err)
                raise
            if self.planner.version != before:
                self._changed()
            news = self._news  # taken after our own news, so only others' wake us
            pending = answer.state == "wait" or (
                answer.state == "transfer"
                and answer.step is None
                and answer.plan_id == request.joined_plan_id
            )
            left = deadline - loop.time()
            if not pending or left <= 0:
                return _answer_pb(answer)
            try:
                await asyncio.wait_for(news.wait(), left)
            except TimeoutError:
                pass

    async def ReportTransfer(
        self, request: pb.TransferReport, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ReportTransferResponse:
        if request.role not in _ROLES or request.result not in RESULTS:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"role {request.role} / result {request.result!r}: result must be one of {RESULTS}",
            )
        report = Report(
            plan_id=request.plan_id,
            replica_id=request.replica_id,
            group_rank=request.group_rank,
            role=_ROLES[request.role],  # type: ignore[arg-type]
            result=request.result,
            message=request.message,
            step=request.step,
            bytes=request.bytes,
            seconds=request.seconds,
            phases=dict(request.phases),
            address=request.address,
        )
        try:
            self.planner.report(report)
        except Exception as err:
            await self._abort(context, err)
            raise
        log = logger.info if report.result == "ok" else logger.warning
        log(
            "plan %d: %s rank %d of %r: %s %s(%d bytes in %.3f s via %s)",
            report.plan_id,
            report.role,
            report.group_rank,
            report.replica_id,
            report.result,
            f"{report.message} " if report.message else "",
            report.bytes,
            report.seconds,
            report.address or "?",
        )
        self._changed()
        return pb.ReportTransferResponse()

    async def GetStatus(
        self, request: pb.StatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.StatusResponse:
        before = self.planner.version
        self.planner.tick()
        if self.planner.version != before:
            self._changed()
        recovering = self.planner.recovering()
        out = pb.StatusResponse(
            coordinator_id=self.coordinator_id, uptime_s=self._clock() - self._started
        )
        for rid, view in sorted(self.members.replicas().items()):
            rep = out.replicas.add(
                replica_id=rid,
                world_size=view.world_size,
                healthy=view.healthy,
                state="recovering"
                if rid in recovering
                else ("healthy" if view.healthy else "unhealthy"),
            )
            if view.step is not None:
                rep.step = view.step
            for g, info in sorted(view.ranks.items()):
                st = self.members.rank_state(rid, g)
                assert st is not None
                rank = rep.ranks.add(
                    group_rank=g,
                    healthy=st[1],
                    last_seen_s=st[2],
                    rendezvous=info.rendezvous,
                    device_kind=info.device_kind,
                    labels=dict(info.labels),
                    interface=info.interface,
                )
                if st[0] is not None:
                    rank.step = st[0]
        out.active.extend(_plan_pb(p) for p in self.planner.active())
        out.recent.extend(_plan_pb(p) for p in self.planner.recent(request.recent or 20))
        return out


def _answer_pb(a: Answer) -> pb.RecoverResponse:
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
    )
    if a.step is not None:
        out.step = a.step
    return out


def _plan_pb(p: PlanSnapshot) -> pb.PlanStatus:
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
    return out
