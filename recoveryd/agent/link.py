"""One rank's link to the coordinator, kept alive by background threads.

Registration, heartbeats, the order stream and transfer reports live here,
apart from the trainer-facing calls, so that an agent in the trainer process
and a sidecar process share them. Nothing here ever blocks the trainer: the
threads retry with backoff while the coordinator is away (at least every
:data:`recoveryd._time.BACKOFF_MAX`, which the coordinator's warm-up counts on) and
register again when it comes back. An unexpected error in a thread is kept
in :attr:`CoordinatorLink.failure` for the trainer's next call to raise.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

from recoveryd._time import Backoff, Deadline
from recoveryd.agent.client import CoordinatorClient
from recoveryd.agent.config import AgentConfig, interface_of
from recoveryd.agent.keeper import SecretKeeper
from recoveryd.errors import (
    AuthenticationError,
    CoordinatorUnavailableError,
    PermissionDeniedError,
    RecoverydError,
    UnknownMemberError,
)
from recoveryd.protocol import Beat, MemberInfo, Order, Report, Role

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class Position:
    """Where the rank's trainer is, as its heartbeats and acknowledgements say."""

    step: int | None
    step_time_s: float = 0.0
    parked: bool = False


class CoordinatorLink:
    """Registers one rank and keeps it registered, heartbeating and listening for orders.

    Args:
        config: the rank's identity and the coordinator's address.
        agent_id: unique per process (a new one tells the coordinator the rank restarted).
        rendezvous: ``host:port`` of the store this rank hosts.
        layout: ``(fingerprint, device_kind)`` of the rank's state.
        position: returns where the trainer is (read by the threads).
        on_order: called (in the watch thread) with every order for this rank.
        on_new_coordinator: called when the coordinator restarted (its plans are gone).
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        agent_id: str,
        rendezvous: str,
        layout: tuple[str, str],
        position: Callable[[], Position],
        on_order: Callable[[Order], None],
        on_new_coordinator: Callable[[], None],
    ) -> None:
        self.config = config
        self.agent_id = agent_id
        self.rendezvous = rendezvous
        self.interface = interface_of(rendezvous.rpartition(":")[0].strip("[]"))
        """The local interface transfers use (empty when unknown)."""
        self.client = CoordinatorClient(
            config.coordinator, timeout=config.rpc_timeout, credentials=config.credentials
        )
        self._keeper = SecretKeeper(
            config.state_dir, config.coordinator, config.replica_id, config.group_rank
        )
        kept = self._keeper.load()
        if kept:  # this rank's earlier agent (a restarted trainer): take the rank back at once
            self.client.hold(config.replica_id, config.group_rank, kept)
        self.registered = threading.Event()
        """Set while the current coordinator knows this rank."""
        self.failure: BaseException | None = None
        """An unexpected error of a background thread, for the trainer's next call."""
        self.refused: AuthenticationError | None = None
        """Set while the coordinator refuses this agent's credentials (a joiner
        raises it rather than wait out its deadline)."""
        self._layout = layout
        self._position = position
        self._on_order = on_order
        self._on_new_coordinator = on_new_coordinator
        self._interval = config.heartbeat_interval.total_seconds()
        self._coordinator_id = ""
        self._healthy = True
        self._closed = threading.Event()
        self._nudged = threading.Event()
        self._reports: queue.Queue[Report | None] = queue.Queue()
        self._cancel_watch: Callable[[], None] | None = None
        self._threads = [
            threading.Thread(target=self._guard(loop), name=f"recoveryd-{name}", daemon=True)
            for name, loop in (
                ("heartbeat", self._heartbeat_loop),
                ("watch", self._watch_loop),
                ("report", self._report_loop),
            )
        ]

    def start(self) -> None:
        """Starts the threads: registration first, then heartbeats, orders and reports."""
        for t in self._threads:
            t.start()

    @property
    def who(self) -> str:
        """``replica/rank``, for logs and messages."""
        return f"{self.config.replica_id}/{self.config.group_rank}"

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed.is_set()

    def set_layout(self, layout: tuple[str, str]) -> None:
        """Registers again if the state's layout changed."""
        if layout != self._layout:
            self._layout = layout
            self.registered.clear()

    def leave(self) -> None:
        """Tells the coordinator this rank goes away on purpose (best effort)."""
        try:
            if self.client.leave(self.config.replica_id, self.config.group_rank, self.agent_id):
                self._keeper.forget()
        except RecoverydError as err:
            logger.warning("%s: could not tell the coordinator it leaves: %s", self.who, err)

    def say_unhealthy(self) -> None:
        """Heartbeats as unhealthy from now on, the first time at once (best effort)."""
        self._healthy = False
        try:
            self.client.heartbeat(
                [
                    Beat(
                        replica_id=self.config.replica_id,
                        group_rank=self.config.group_rank,
                        step=self._position().step,
                        healthy=False,
                    )
                ]
            )
        except RecoverydError as err:
            logger.warning("%s: could not report the rank unhealthy: %s", self.who, err)

    def nudge(self) -> None:
        """Heartbeats now rather than at the next interval."""
        self._nudged.set()

    def reregister(self) -> None:
        """Asks the heartbeat thread to register again (e.g. the coordinator forgot us)."""
        self.registered.clear()

    def report(
        self,
        plan_id: int,
        result: str,
        *,
        role: Role,
        started: float,
        message: str = "",
        step: int | None = None,
        nbytes: int = 0,
        phases: dict[str, float] | None = None,
        until: Deadline | None = None,
        blame: str = "",
    ) -> Report:
        """Reports one side of one transfer that started at ``started`` (monotonic).

        With ``until``, the call is made now and retried while the coordinator
        is away, until that deadline (a joiner waits on the coordinator
        anyway); without, it is queued for the report thread (a donor's
        trainer is not held).
        """
        report = Report(
            plan_id=plan_id,
            replica_id=self.config.replica_id,
            group_rank=self.config.group_rank,
            role=role,
            result=result,
            message=message,
            step=step,
            bytes=nbytes,
            seconds=time.monotonic() - started,
            phases=phases or {},
            address=self.rendezvous.rpartition(":")[0],
            blame=blame,
        )
        if until is None:
            self._reports.put(report)
            return report
        backoff = Backoff()
        while True:
            try:
                self.client.report(report)
                return report
            except CoordinatorUnavailableError:
                nap = backoff.next()
                if until.remaining() <= nap:
                    logger.warning("%s: gave up reporting plan %d", self.who, plan_id)
                    return report
                until.sleep(nap)

    def close(
        self,
        timeout: timedelta = timedelta(seconds=5),
        *,
        farewell: Literal["leave", "unhealthy"] | None = None,
    ) -> None:
        """Stops the threads, says ``farewell`` to the coordinator, closes the channel.

        The farewell comes after the threads stopped, so no heartbeat registers
        the rank again behind it.
        """
        if self._closed.is_set():
            return
        self._closed.set()
        self._nudged.set()
        self._reports.put(None)
        if self._cancel_watch is not None:
            self._cancel_watch()
        deadline = Deadline(timeout)
        for t in self._threads:
            if t.is_alive():
                t.join(deadline.remaining_s())
        if farewell == "leave":
            self.leave()
        elif farewell == "unhealthy":
            self.say_unhealthy()
        self.client.close()

    # ---- threads --------------------------------------------------------------

    def _guard(self, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as err:  # recorded, raised at the trainer's next call
                logger.exception("%s: background thread failed", self.who)
                self.failure = err

        return run

    def _register(self) -> None:
        digest, device_kind = self._layout
        reg = self.client.register(
            MemberInfo(
                replica_id=self.config.replica_id,
                group_rank=self.config.group_rank,
                group_world_size=self.config.group_world_size,
                layout_fingerprint=digest,
                device_kind=device_kind,
                rendezvous=self.rendezvous,
                labels=dict(self.config.labels),
                agent_id=self.agent_id,
                interface=self.interface,
            ),
            step=self._position().step,
        )
        if self._coordinator_id and reg.coordinator_id != self._coordinator_id:
            logger.warning(
                "%s: coordinator restarted (%s -> %s): registered again",
                self.who,
                self._coordinator_id,
                reg.coordinator_id,
            )
            self._on_new_coordinator()
        self._coordinator_id = reg.coordinator_id
        self._interval = reg.heartbeat_interval.total_seconds()
        self._keeper.store(reg.rank_secret)
        self.refused = None
        self.registered.set()

    def _heartbeat_loop(self) -> None:
        backoff = Backoff()
        warned = False
        while not self._closed.is_set():
            try:
                if not self.registered.is_set():
                    self._register()
                beat = Beat(
                    replica_id=self.config.replica_id,
                    group_rank=self.config.group_rank,
                    step=self._position().step,
                    healthy=self._healthy,
                )
                try:
                    cid, unknown = self.client.heartbeat([beat])
                except PermissionDeniedError:
                    unknown = [0]  # another agent holds the rank now: register (and be refused)
                    cid = self._coordinator_id
                if unknown or cid != self._coordinator_id:
                    self.registered.clear()
                    continue
                if warned:
                    logger.info(
                        "%s: coordinator %s reachable again", self.who, self.config.coordinator
                    )
                backoff.reset()
                warned = False
                self._nudged.wait(self._interval)
                self._nudged.clear()
            except RecoverydError as err:  # unreachable, or registration refused: retry
                if isinstance(err, AuthenticationError):
                    self.refused = err
                if not warned:
                    logger.warning("%s: %s", self.who, err)
                    warned = True
                self._closed.wait(backoff.next().total_seconds())

    def _watch_loop(self) -> None:
        backoff = Backoff()
        while not self._closed.is_set():
            if not self.registered.wait(0.2):
                continue
            orders, cancel = self.client.watch(self.config.replica_id, self.config.group_rank)
            self._cancel_watch = cancel
            if self._closed.is_set():
                cancel()
                return
            try:
                for order in orders:
                    backoff.reset()
                    self._on_order(order)
            except CoordinatorUnavailableError:
                # The coordinator went away: the heartbeats notice and register again.
                self._closed.wait(backoff.next().total_seconds())
            except (UnknownMemberError, PermissionDeniedError):
                # A new coordinator that does not know us yet, or another agent
                # holds the rank now: register (again) before watching again.
                self.registered.clear()
                self._nudged.set()
                self._closed.wait(backoff.next().total_seconds())

    def _report_loop(self) -> None:
        while True:
            report = self._reports.get()
            if report is None:
                return
            try:
                self.client.report(report)
            except RecoverydError as err:
                logger.warning("%s: could not report plan %d: %s", self.who, report.plan_id, err)
