"""The in-process agent: one per trainer rank, a few background threads.

The trainer sees two calls. :meth:`Agent.recover` runs when the rank starts:
it asks the coordinator for a plan and receives the donor's live state in
place, or returns ``None`` when there is nothing to recover from.
:meth:`Agent.step` runs once per training step: a comparison when nothing is
due, and a send of the live state when a plan's fence is this step.

Everything that talks to the coordinator runs in background threads, so
training never waits on the coordinator: registration and heartbeats (with
backoff while the coordinator is away, and re-registration when it comes
back), the order stream, forming transfer groups ahead of the fence, and
reports. A background thread that fails records the error, and the next
:meth:`Agent.step` raises it.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from recoveryd.agent.client import Beat, CoordinatorClient
from recoveryd.agent.config import AgentConfig
from recoveryd.agent.layout import fingerprint
from recoveryd.agent.rendezvous import (
    DONOR_RANK,
    JOINER_RANK,
    connect_store,
    device_for,
    host_store,
    open_group,
)
from recoveryd.coordinator.membership import MemberInfo
from recoveryd.coordinator.planner import Order, Report
from recoveryd.errors import (
    CoordinatorUnavailableError,
    ManifestError,
    PeerLostError,
    RecoverydError,
    StateMismatchError,
    StepMismatchError,
    TransferError,
    TransferTimeoutError,
    UnknownMemberError,
)
from recoveryd.transport import recv_state_dict, send_state_dict

logger = logging.getLogger(__name__)

_MAX_BACKOFF_S = 2.0  # CoordinatorConfig.warmup counts on agents retrying this often
_LONG_POLL = timedelta(seconds=2)


def _result_of(err: BaseException) -> str:
    """The report result for a transfer failure (a small fixed set)."""
    if isinstance(err, StepMismatchError):
        return "step_mismatch"
    if isinstance(err, StateMismatchError | ManifestError):
        return "rejected"
    if isinstance(err, TransferTimeoutError | TimeoutError):
        return "timeout"
    if isinstance(err, PeerLostError | ConnectionError):
        return "peer_lost"
    return "error"


def _merge_values(dst: object, src: object) -> object:
    """Writes ``src``'s non-tensor values into ``dst``'s containers; returns the merged node.

    In place, tensors already hold the received bytes (``src`` has ``dst``'s
    tensor objects); plain values (ints, floats, strings, ...) are replaced in
    mutable containers, and tuples holding any are rebuilt in their parent.
    """
    if isinstance(src, torch.Tensor):
        return dst
    if isinstance(src, Mapping) and isinstance(dst, MutableMapping):
        for k, v in src.items():
            merged = _merge_values(dst.get(k), v)
            if merged is not dst.get(k):
                dst[k] = merged
        return dst
    if isinstance(src, list) and isinstance(dst, list) and len(src) == len(dst):
        for i, v in enumerate(src):
            merged = _merge_values(dst[i], v)
            if merged is not dst[i]:
                dst[i] = merged
        return dst
    if isinstance(src, tuple) and isinstance(dst, tuple) and len(src) == len(dst):
        items = [_merge_values(d, v) for d, v in zip(dst, src, strict=True)]
        return dst if all(a is b for a, b in zip(items, dst, strict=True)) else type(dst)(items)
    return src


@dataclass(slots=True)
class RecoveryRecord:
    """How one :meth:`Agent.recover` went, for logs and timelines.

    Attributes:
        outcome: ``recovered`` or ``no_donor``.
        step: the recovered step.
        donor: the donor replica.
        plan_id: the plan that succeeded.
        attempts: plans this rank took part in (failed ones included).
        bytes: payload bytes received.
        seconds: from the call to the state being ready on every rank.
        phases: seconds per phase: ``plan`` (until a plan named a donor),
            ``rendezvous`` (forming the transfer group), ``fence`` (until the
            donor reached the fenced step and its manifest arrived), the
            transfer's other phases (``prepare``, ``handshake``, ``data``, ``verify``),
            and ``confirm`` (until every rank of the replica had its state).
        reason: why there was no donor.
    """

    outcome: str
    step: int | None = None
    donor: str = ""
    plan_id: int = 0
    attempts: int = 0
    bytes: int = 0
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    reason: str = ""


@dataclass(slots=True)
class _SendOrder:
    plan_id: int
    joiner: str
    prefix: str
    backend: str
    deadline: float
    fence: int | None = None
    group: dist.ProcessGroup | None = None
    cancelled: bool = False


class Agent:
    """The recoveryd agent of one trainer rank.

    Args:
        config: who this rank is and where the coordinator is.
        state_dict: returns the rank's live state (called when a send is due,
            and to fingerprint the layout); it must return the tensors the
            trainer updates, not copies.

    Example::

        agent = Agent(AgentConfig(coordinator="coord:29400", replica_id="r1"), lambda: state)
        step = agent.recover(state, timeout=timedelta(minutes=5)) or 0
        for step in range(step + 1, steps):
            train_one_step()
            agent.step(step)
        agent.close()
    """

    def __init__(self, config: AgentConfig, state_dict: Callable[[], object]) -> None:
        self.config = config
        self._state_fn = state_dict
        self.host = config.advertised_host()
        self._store = host_store(
            self.host, config.rendezvous_port, timeout=config.rendezvous_timeout
        )
        self.rendezvous = f"{self.host}:{self._store.port}"
        self.agent_id = uuid.uuid4().hex[:12]
        self._client = CoordinatorClient(config.coordinator, timeout=config.rpc_timeout)
        self._lock = threading.Lock()
        self._step: int | None = None
        self._stepped = False
        self._parked = False
        self._last_step_at = 0.0
        self._step_time = 0.0
        self._layout = fingerprint(state_dict())
        self._interval = config.heartbeat_interval.total_seconds()
        self._registered = threading.Event()
        self._coordinator_id = ""
        self._orders: dict[int, _SendOrder] = {}
        self._next_fence = math.inf
        self._failure: BaseException | None = None
        self._closed = threading.Event()
        self._reports: queue.Queue[Report | None] = queue.Queue()
        self._cancel_watch: Callable[[], None] | None = None
        # Groups of failed transfers: a late peer may still write into their
        # buffers, so they are kept (not destroyed) for a while.
        self._graveyard: deque[dist.ProcessGroup] = deque(maxlen=16)
        self.last_recovery: RecoveryRecord | None = None
        self.sends: deque[Report] = deque(maxlen=32)
        """The last sends this rank made as a donor (newest last)."""
        logger.info(
            "agent %s: rank %d/%d of %r, transfers rendezvous at %s, coordinator %s",
            self.agent_id,
            config.group_rank,
            config.group_world_size,
            config.replica_id,
            self.rendezvous,
            config.coordinator,
        )
        self._threads = [
            threading.Thread(
                target=self._guard(self._heartbeat_loop), name="recoveryd-heartbeat", daemon=True
            ),
            threading.Thread(
                target=self._guard(self._watch_loop), name="recoveryd-watch", daemon=True
            ),
            threading.Thread(
                target=self._guard(self._report_loop), name="recoveryd-report", daemon=True
            ),
        ]
        for t in self._threads:
            t.start()

    # ---- trainer-facing -----------------------------------------------------

    def recover(
        self, state_dict: object, *, timeout: timedelta = timedelta(minutes=10)
    ) -> int | None:
        """Receives this rank's state from a live donor, in place.

        Every rank of the replica calls this; all of them end up with the same
        donor's state at one step, or all get ``None``.

        Args:
            state_dict: the state to overwrite; its layout (tree, dtypes,
                shapes) must be the donors' (initialise lazily-created state,
                such as optimizer moments, before calling). Tensors receive
                the bytes in place; plain values (ints, floats, strings) are
                replaced in their containers.
            timeout: deadline for the whole recovery.

        Returns:
            The recovered step, or ``None`` when there is nothing to recover
            from (the first replica, or no healthy donor: see
            :attr:`last_recovery` for the coordinator's reason).

        Raises:
            CoordinatorUnavailableError: the coordinator was unreachable until the deadline.
            TransferTimeoutError: no recovery finished within ``timeout``.
            RecoverydError: a background thread of the agent failed.
        """
        self._raise_failure()
        start = time.monotonic()
        deadline = start + timeout.total_seconds()
        layout = fingerprint(state_dict)
        if layout != self._layout:
            self._layout = layout
            self._registered.clear()
        rec = RecoveryRecord(outcome="recovering")
        self.last_recovery = rec
        received = joined = 0
        group: dist.ProcessGroup | None = None
        marks = {"start": start}
        backoff = 0.05
        last_answer = "none yet"
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransferTimeoutError(
                    f"{self._who()}: no recovery within {timeout} (last answer: {last_answer})"
                )
            if not self._registered.wait(min(left, 0.5)):
                continue
            try:
                ans = self._client.recover(
                    self.config.replica_id,
                    self.config.group_rank,
                    wait=min(_LONG_POLL, timedelta(seconds=left)),
                    received_plan_id=received,
                    joined_plan_id=joined,
                )
            except UnknownMemberError:
                self._registered.clear()
                continue
            except CoordinatorUnavailableError as err:
                if time.monotonic() + backoff >= deadline:
                    raise err
                time.sleep(backoff)
                backoff = min(2 * backoff, _MAX_BACKOFF_S)
                continue
            backoff = 0.05
            last_answer = f"{ans.state} {ans.reason}".strip()
            if ans.state == "no_donor":
                rec.outcome, rec.reason = "no_donor", ans.reason
                rec.seconds = time.monotonic() - start
                logger.info("%s: nothing to recover from: %s", self._who(), ans.reason)
                return None
            if ans.state == "done":
                assert ans.step is not None
                now = time.monotonic()
                rec.phases["confirm"] = now - marks.get("received", now)
                rec.outcome, rec.step, rec.seconds = "recovered", ans.step, now - start
                with self._lock:
                    self._step = ans.step
                logger.info(
                    "%s: recovered step %d from %r in %.3f s (%d bytes, %d plan(s))",
                    self._who(),
                    ans.step,
                    rec.donor,
                    rec.seconds,
                    rec.bytes,
                    rec.attempts,
                )
                return ans.step
            if ans.state != "transfer":
                continue
            if ans.plan_id != joined:
                if group is not None:
                    self._graveyard.append(group)
                group, joined = None, 0
                rec.attempts += 1
                rec.phases.setdefault("plan", time.monotonic() - start)
                t0 = time.monotonic()
                try:
                    store = connect_store(
                        ans.rendezvous,
                        timeout=min(self.config.rendezvous_timeout, timedelta(seconds=left)),
                    )
                    group = open_group(
                        store,
                        ans.rendezvous_prefix,
                        JOINER_RANK,
                        backend=ans.backend,
                        host=self.host,
                        timeout=min(
                            timedelta(seconds=ans.timeout_s or left), timedelta(seconds=left)
                        ),
                    )
                except Exception as err:  # the donor went away before the group formed
                    self._report_now(
                        ans.plan_id, "joiner", _result_of(err), f"rendezvous: {err}", None, 0, t0
                    )
                    continue
                joined = ans.plan_id
                rec.phases["rendezvous"] = time.monotonic() - t0
                marks["joined"] = time.monotonic()
            if ans.step is None or group is None:
                continue  # held by the long poll until the plan is armed
            t0 = time.monotonic()
            try:
                got = recv_state_dict(
                    group,
                    DONOR_RANK,
                    timeout=timedelta(
                        seconds=max(0.001, min(ans.timeout_s or left, deadline - t0))
                    ),
                    into=state_dict,
                    step=ans.step,
                    config=self.config.transfer,
                    device=device_for(ans.backend),
                )
            except TransferError as err:
                logger.warning(
                    "%s: plan %d from %r failed: %s", self._who(), ans.plan_id, ans.donor, err
                )
                self._report_now(ans.plan_id, "joiner", _result_of(err), str(err), ans.step, 0, t0)
                self._graveyard.append(group)
                group, joined = None, 0
                continue
            _merge_values(state_dict, got.state_dict)
            st = got.stats
            # The manifest comes when the donor reaches the fence: that wait is the fence's.
            rec.phases["fence"] = st.phases.get("manifest", 0.0)
            for k, v in st.phases.items():
                if k != "manifest":
                    rec.phases[k] = v
            rec.donor, rec.plan_id, rec.bytes = ans.donor, ans.plan_id, st.payload_bytes
            self._report_now(
                ans.plan_id, "joiner", "ok", "", ans.step, st.payload_bytes, t0, phases=st.phases
            )
            received = ans.plan_id
            marks["received"] = time.monotonic()
            group = None  # done with it; Gloo tears it down

    def step(self, step: int) -> None:
        """Marks a step boundary: the state now reflects ``step`` completed.

        Nearly free unless a plan's fence is due, in which case this rank's
        live state is streamed to the joiner before returning (the trainer is
        held for the send only; the group was formed in the background).

        Raises:
            RecoverydError: a background thread of the agent failed.
        """
        self._raise_failure()
        now = time.monotonic()
        if self._last_step_at and self._step is not None and step > self._step:
            dt = (now - self._last_step_at) / (step - self._step)
            self._step_time = dt if not self._step_time else 0.8 * self._step_time + 0.2 * dt
        self._last_step_at = now
        self._step = step
        self._parked = False
        if not self._stepped:
            self._stepped = True
            layout = fingerprint(self._state_fn())
            if layout != self._layout:  # e.g. optimizer state created by the first step
                self._layout = layout
                self._registered.clear()
        if step < self._next_fence:
            return
        with self._lock:
            due = [
                o
                for o in self._orders.values()
                if o.fence is not None
                and o.fence <= step
                and o.group is not None
                and not o.cancelled
            ]
        if due:
            state = self._state_fn()
            for o in due:
                self._send(o, state, step)
        self._refence()

    def send_due(self, step: int) -> bool:
        """Whether :meth:`step` at ``step`` will send (a plan is fenced at or before it)."""
        return step >= self._next_fence

    def park(self, timeout: timedelta) -> None:
        """Serves plans at the current step while the trainer does not step.

        For a trainer that finished, or waits (e.g. for a checkpoint or an
        operator): plans made while it is parked are fenced at its current
        step and sent from here. Returns after ``timeout``, or at once when
        the agent is closed or has no state yet (no :meth:`step` and no
        recovery).

        Raises:
            RecoverydError: a background thread of the agent failed.
        """
        self._raise_failure()
        end = time.monotonic() + timeout.total_seconds()
        if self._step is None:
            return
        self._parked = True
        try:
            while not self._closed.is_set() and time.monotonic() < end:
                with self._lock:
                    # A plan fenced past this step cannot be met: sending now
                    # makes the joiner refuse the step at once, and the
                    # coordinator re-plans it at this step.
                    due = [
                        o
                        for o in self._orders.values()
                        if o.fence is not None and o.group is not None and not o.cancelled
                    ]
                if due:
                    state = self._state_fn()
                    for o in due:
                        self._send(o, state, self._step)
                    self._refence()
                self._closed.wait(min(0.01, max(0.0, end - time.monotonic())))
        finally:
            self._parked = False

    def refresh_layout(self) -> None:
        """Re-fingerprints the state (call after its layout changed, e.g. a resharding)."""
        self._layout = fingerprint(self._state_fn())
        self._registered.clear()

    def close(self, timeout: timedelta = timedelta(seconds=5)) -> None:
        """Stops the background threads and closes the coordinator channel."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._reports.put(None)
        if self._cancel_watch is not None:
            self._cancel_watch()
        end = time.monotonic() + timeout.total_seconds()
        for t in self._threads:
            t.join(max(0.0, end - time.monotonic()))
        self._client.close()

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- donor side ---------------------------------------------------------

    def _send(self, o: _SendOrder, state: object, step: int) -> None:
        t0 = time.monotonic()
        with self._lock:
            self._orders.pop(o.plan_id, None)
        assert o.group is not None
        try:
            stats = send_state_dict(
                o.group,
                [JOINER_RANK],
                state,
                timeout=timedelta(seconds=max(0.001, o.deadline - t0)),
                step=step,
                config=self.config.transfer,
                device=device_for(o.backend),
            )
        except TransferError as err:
            logger.warning(
                "%s: send of plan %d to %r failed: %s", self._who(), o.plan_id, o.joiner, err
            )
            self._graveyard.append(o.group)
            self._queue_report(o.plan_id, "donor", _result_of(err), str(err), step, 0, t0)
            return
        logger.info(
            "%s: sent step %d to %r (plan %d): %d bytes in %.3f s",
            self._who(),
            step,
            o.joiner,
            o.plan_id,
            stats.payload_bytes,
            stats.seconds,
        )
        self._queue_report(
            o.plan_id, "donor", "ok", "", step, stats.payload_bytes, t0, phases=stats.phases
        )

    def _on_order(self, order: Order) -> None:
        if order.kind == "prepare":
            with self._lock:
                if order.plan_id in self._orders:
                    return
                o = _SendOrder(
                    plan_id=order.plan_id,
                    joiner=order.joiner,
                    prefix=order.rendezvous_prefix,
                    backend=order.backend,
                    deadline=time.monotonic() + order.timeout_s,
                )
                self._orders[order.plan_id] = o
            threading.Thread(
                target=self._guard(lambda: self._prepare(o)), name="recoveryd-prepare", daemon=True
            ).start()
        elif order.kind == "arm":
            with self._lock:
                o2 = self._orders.get(order.plan_id)
                if o2 is not None:
                    o2.fence = order.step
            self._refence()
        elif order.kind == "cancel":
            with self._lock:
                o3 = self._orders.pop(order.plan_id, None)
            if o3 is not None:
                o3.cancelled = True
                if o3.group is not None:
                    self._graveyard.append(o3.group)
            self._refence()

    def _prepare(self, o: _SendOrder) -> None:
        t0 = time.monotonic()
        try:
            group = open_group(
                self._store,
                o.prefix,
                DONOR_RANK,
                backend=o.backend,
                host=self.host,
                timeout=timedelta(
                    seconds=max(
                        0.001, min(o.deadline - t0, self.config.rendezvous_timeout.total_seconds())
                    )
                ),
            )
        except Exception as err:
            with self._lock:
                self._orders.pop(o.plan_id, None)
            logger.warning(
                "%s: plan %d: joiner %r never joined: %s", self._who(), o.plan_id, o.joiner, err
            )
            self._queue_report(
                o.plan_id, "donor", _result_of(err), f"rendezvous: {err}", None, 0, t0
            )
            return
        o.group = group
        if o.cancelled:
            self._graveyard.append(group)
            return
        try:
            live = self._client.acknowledge(
                o.plan_id,
                self.config.replica_id,
                self.config.group_rank,
                self._step or 0,
                idle=self._parked,
                step_time_s=self._step_time,
            )
        except RecoverydError as err:
            live = False
            logger.warning("%s: could not acknowledge plan %d: %s", self._who(), o.plan_id, err)
        if not live:
            with self._lock:
                self._orders.pop(o.plan_id, None)
            self._graveyard.append(group)

    def _refence(self) -> None:
        with self._lock:
            fences = [
                o.fence for o in self._orders.values() if o.fence is not None and not o.cancelled
            ]
            self._next_fence = min(fences) if fences else math.inf

    # ---- background loops ---------------------------------------------------

    def _guard(self, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as err:  # recorded, raised at the trainer's next call
                logger.exception("%s: background thread failed", self._who())
                self._failure = err

        return run

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise RecoverydError(
                f"{self._who()}: the agent's background thread failed: {self._failure!r}"
            ) from self._failure

    def _register(self) -> None:
        digest, device_kind = self._layout
        reg = self._client.register(
            MemberInfo(
                replica_id=self.config.replica_id,
                group_rank=self.config.group_rank,
                group_world_size=self.config.group_world_size,
                layout_fingerprint=digest,
                device_kind=device_kind,
                rendezvous=self.rendezvous,
                labels=dict(self.config.labels),
                agent_id=self.agent_id,
            ),
            step=self._step,
        )
        if self._coordinator_id and reg.coordinator_id != self._coordinator_id:
            logger.warning(
                "%s: coordinator restarted (%s -> %s): registered again",
                self._who(),
                self._coordinator_id,
                reg.coordinator_id,
            )
            self._drop_unsent_orders()
        self._coordinator_id = reg.coordinator_id
        self._interval = reg.heartbeat_interval.total_seconds()
        self._registered.set()

    def _drop_unsent_orders(self) -> None:
        """Plans of a coordinator that restarted are gone with it."""
        with self._lock:
            dropped = list(self._orders.values())
            self._orders.clear()
        for o in dropped:
            o.cancelled = True
        self._refence()

    def _heartbeat_loop(self) -> None:
        backoff = 0.05
        warned = False
        while not self._closed.is_set():
            try:
                if not self._registered.is_set():
                    self._register()
                cid, unknown = self._client.heartbeat(
                    [
                        Beat(
                            replica_id=self.config.replica_id,
                            group_rank=self.config.group_rank,
                            step=self._step,
                        )
                    ]
                )
                if unknown or cid != self._coordinator_id:
                    self._registered.clear()
                    continue
                if warned:
                    logger.info(
                        "%s: coordinator %s reachable again", self._who(), self.config.coordinator
                    )
                backoff, warned = 0.05, False
                self._closed.wait(self._interval)
            except CoordinatorUnavailableError as err:
                if not warned:
                    logger.warning("%s: %s", self._who(), err)
                    warned = True
                self._closed.wait(backoff)
                backoff = min(2 * backoff, _MAX_BACKOFF_S)

    def _watch_loop(self) -> None:
        backoff = 0.05
        while not self._closed.is_set():
            if not self._registered.wait(0.2):
                continue
            orders, cancel = self._client.watch(self.config.replica_id, self.config.group_rank)
            self._cancel_watch = cancel
            if self._closed.is_set():
                cancel()
                return
            try:
                for order in orders:
                    backoff = 0.05
                    self._on_order(order)
            except CoordinatorUnavailableError:
                # The coordinator went away: heartbeats notice it and re-register.
                self._closed.wait(backoff)
                backoff = min(2 * backoff, _MAX_BACKOFF_S)

    def _report_loop(self) -> None:
        while True:
            report = self._reports.get()
            if report is None:
                return
            try:
                self._client.report(report)
            except RecoverydError as err:
                logger.warning("%s: could not report plan %d: %s", self._who(), report.plan_id, err)

    # ---- helpers ------------------------------------------------------------

    def _make_report(
        self,
        plan_id: int,
        role: str,
        result: str,
        message: str,
        step: int | None,
        nbytes: int,
        t0: float,
        phases: dict[str, float] | None = None,
    ) -> Report:
        return Report(
            plan_id=plan_id,
            replica_id=self.config.replica_id,
            group_rank=self.config.group_rank,
            role=role,  # type: ignore[arg-type]
            result=result,
            message=message,
            step=step,
            bytes=nbytes,
            seconds=time.monotonic() - t0,
            phases=phases or {},
            address=self.rendezvous.rpartition(":")[0],
        )

    def _queue_report(self, *args: object, **kwargs: object) -> None:
        report = self._make_report(*args, **kwargs)  # type: ignore[arg-type]
        if report.role == "donor":
            self.sends.append(report)
        self._reports.put(report)

    def _report_now(self, *args: object, **kwargs: object) -> None:
        """Reports synchronously (the joiner waits on the coordinator anyway); retried until sent."""
        report = self._make_report(*args, **kwargs)  # type: ignore[arg-type]
        for attempt in range(20):
            try:
                self._client.report(report)
                return
            except CoordinatorUnavailableError:
                time.sleep(min(0.05 * 2**attempt, _MAX_BACKOFF_S))
        logger.warning("%s: gave up reporting plan %d", self._who(), report.plan_id)

    def _who(self) -> str:
        return f"{self.config.replica_id}/{self.config.group_rank}"
