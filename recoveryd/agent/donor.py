"""The donor side of an agent: orders in, transfer groups formed ahead, sends at the fence.

``PREPARE`` forms the plan's two-rank group on this rank's rendezvous store in
a background thread and then acknowledges with the trainer's position;
``ARM`` sets the fence; ``CANCEL`` drops the plan. The trainer's thread only
compares its step with the nearest fence (:meth:`Donor.due`) and, when one is
reached, sends (:meth:`Donor.serve`).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import torch.distributed as dist

from recoveryd._format import rate
from recoveryd._time import MIN_WAIT, Deadline
from recoveryd.agent.config import AgentConfig
from recoveryd.agent.link import CoordinatorLink, Position
from recoveryd.agent.rendezvous import (
    DONOR_RANK,
    JOINER_RANK,
    device_for,
    dropped_key,
    go_key,
    open_group,
    proof,
    proves,
)
from recoveryd.errors import RecoverydError, TransferError
from recoveryd.metrics import AgentMetrics
from recoveryd.protocol import Order, Report, result_of
from recoveryd.transport import prepare_send, send_state_dict

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _SendOrder:
    plan_id: int
    joiner: str
    prefix: str
    backend: str
    deadline: Deadline
    key: bytes = field(repr=False)
    fence: int | None = None
    group: dist.ProcessGroup | None = None
    cancelled: bool = False
    warmed: bool = False


class Donor:
    """Plans this rank sends in.

    Args:
        config: the agent's configuration (transfer knobs, rendezvous timeout).
        store: the rendezvous store this rank hosts.
        host: the address Gloo listens on.
        graveyard: where groups of failed transfers are kept (see :class:`Agent`).
        position: where the trainer is (its step goes into acknowledgements).
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        store: dist.Store,
        host: str,
        graveyard: deque[dist.ProcessGroup],
        position: Callable[[], Position],
        metrics: AgentMetrics | None = None,
    ) -> None:
        self._metrics = metrics
        self._config = config
        self._store = store
        self._host = host
        self._graveyard = graveyard
        self._position = position
        self.link: CoordinatorLink | None = None  # set once the link exists (it calls us back)
        self._lock = threading.Lock()
        self._orders: dict[int, _SendOrder] = {}
        self._next_fence = math.inf
        self.failure: BaseException | None = None
        self.sends: deque[Report] = deque(maxlen=32)
        """The last sends this rank made (newest last)."""

    # ---- called by the link's watch thread --------------------------------------

    def on_order(self, order: Order) -> None:
        """Acts on one order from the coordinator."""
        if order.kind == "prepare":
            with self._lock:
                if order.plan_id in self._orders:
                    return
                o = _SendOrder(
                    plan_id=order.plan_id,
                    joiner=order.joiner,
                    prefix=order.rendezvous_prefix,
                    backend=order.backend,
                    deadline=Deadline(timedelta(seconds=order.timeout_s)),
                    key=order.plan_key,
                )
                self._orders[order.plan_id] = o
            threading.Thread(
                target=self._guarded_prepare, args=(o,), name="recoveryd-prepare", daemon=True
            ).start()
        elif order.kind == "arm":
            with self._lock:
                armed = self._orders.get(order.plan_id)
                if armed is not None:
                    armed.fence = order.step
            self._refence()
        elif order.kind == "cancel":
            with self._lock:
                gone = self._orders.pop(order.plan_id, None)
            if gone is not None:
                gone.cancelled = True
                if gone.group is not None:
                    self._graveyard.append(gone.group)
            self._refence()

    def drop_all(self) -> None:
        """Forgets every plan not being sent (their coordinator restarted)."""
        with self._lock:
            dropped = list(self._orders.values())
            self._orders.clear()
        for o in dropped:
            o.cancelled = True
        self._refence()

    # ---- called by the trainer's thread ------------------------------------------

    def due(self, step: int) -> bool:
        """Whether a plan is fenced at or before ``step``."""
        return step >= self._next_fence

    def serve(self, step: int, state_fn: Callable[[], object], *, parked: bool = False) -> None:
        """Sends every plan fenced at or before ``step`` (every armed plan when ``parked``).

        A parked rank also answers plans fenced past its step: the joiner
        refuses the step at the handshake (nothing is written) and the
        coordinator re-plans at the parked step.
        """
        with self._lock:
            due = [
                o
                for o in self._orders.values()
                if o.fence is not None
                and (parked or o.fence <= step)
                and o.group is not None
                and not o.cancelled
            ]
        if due:
            state = state_fn()
            for o in due:
                self._send(o, state, step)
        self._refence()

    def warm(self, state_fn: Callable[[], object]) -> None:
        """Works out the send's plan ahead of the fence, once per formed plan.

        Called by the trainer's thread at a step boundary (the state is not
        changing then): the walk of the state moves from the fence, where the
        joiner waits for it, to this step (the trainer pays it here instead),
        and the send at the fence reuses the plan, so the joiner hears from
        this rank sooner (a 20,000-tensor optimizer state: ~0.1 s sooner).
        CUDA plans are skipped (their states are few, large tensors).
        """
        with self._lock:
            cold = [
                o
                for o in self._orders.values()
                if o.group is not None and not o.warmed and not o.cancelled and o.backend != "nccl"
            ]
            for o in cold:
                o.warmed = True
        if not cold:
            return
        t0 = time.monotonic()
        try:
            kept = prepare_send(state_fn(), config=self._config.transfer)
        except Exception as err:  # only a speed-up is lost; the send names it, at the fence
            logger.info("working out the send's plan ahead failed: %r", err)
            return
        logger.debug("plan worked out ahead in %.3f s (kept: %s)", time.monotonic() - t0, kept)

    # ---- internals ----------------------------------------------------------------

    def _send(self, o: _SendOrder, state: object, step: int) -> None:
        assert self.link is not None
        assert o.group is not None
        t0 = time.monotonic()
        with self._lock:
            self._orders.pop(o.plan_id, None)
        if self._dropped(o):
            logger.info("%s: plan %d: the joiner %r dropped it", self.link.who, o.plan_id, o.joiner)
            self._graveyard.append(o.group)
            self.link.report(
                o.plan_id,
                "peer_lost",
                role="donor",
                started=t0,
                message="the joiner dropped the plan before the fence",
                step=step,
            )
            return
        try:
            # The joiner waits for this key, not in a receive: a plan cancelled
            # before its fence, or a donor that died, then never holds it.
            self._store.set(go_key(o.prefix), f"{step}:{proof(o.key, f'go {step}', o.prefix)}")
            stats = send_state_dict(
                o.group,
                [JOINER_RANK],
                state,
                timeout=max(MIN_WAIT, o.deadline.remaining()),
                step=step,
                config=self._config.transfer,
                device=device_for(o.backend),
                auth_key=o.key or None,  # an older coordinator hands out none
                abandoned=lambda: self._dropped(o),
            )
        except TransferError as err:
            logger.warning(
                "%s: send of plan %d to %r failed: %s", self.link.who, o.plan_id, o.joiner, err
            )
            self._graveyard.append(o.group)
            if self._metrics is not None:
                self._metrics.transfer(
                    "donor", o.backend, result_of(err), seconds=time.monotonic() - t0
                )
            self.sends.append(
                self.link.report(
                    o.plan_id, result_of(err), role="donor", started=t0, message=str(err), step=step
                )
            )
            return
        # A striped plan's donor sends a part of the payload (what went on the wire,
        # control words included); a whole send, the payload.
        sent = min(stats.payload_bytes, stats.bytes_sent)
        if self._metrics is not None:
            self._metrics.transfer(
                "donor",
                o.backend,
                "ok",
                seconds=stats.seconds,
                nbytes=sent,
                phases=stats.phases,
            )
        logger.info(
            "%s: sent step %d to %r (plan %d) over %s (%s): %d bytes in %.3f s, %s",
            self.link.who,
            step,
            o.joiner,
            o.plan_id,
            self.link.interface or "?",
            self._host,
            sent,
            stats.seconds,
            rate(sent, stats.seconds),
        )
        self.sends.append(
            self.link.report(
                o.plan_id,
                "ok",
                role="donor",
                started=t0,
                step=step,
                nbytes=sent,
                phases=stats.phases,
            )
        )

    def _dropped(self, o: _SendOrder) -> bool:
        """Whether the plan is gone: cancelled, or its joiner said it left."""
        if o.cancelled:
            return True
        key = dropped_key(o.prefix)
        try:
            if not self._store.check([key]):
                return False
            said = self._store.get(key)
        except RuntimeError:
            return False
        if proves(o.key, said, "dropped", o.prefix):
            return True
        logger.warning(
            "plan %d: a %s key on this rank's store that its joiner did not write: ignored "
            "(someone who reaches the store tried to cancel the plan)",
            o.plan_id,
            key,
        )
        return False

    def _guarded_prepare(self, o: _SendOrder) -> None:
        try:
            self._prepare(o)
        except BaseException as err:  # recorded, raised at the trainer's next call
            logger.exception("preparing plan %d failed", o.plan_id)
            self.failure = err

    def _prepare(self, o: _SendOrder) -> None:
        assert self.link is not None
        t0 = time.monotonic()
        try:
            group = open_group(
                self._store,
                o.prefix,
                DONOR_RANK,
                backend=o.backend,
                host=self._host,
                timeout=max(MIN_WAIT, o.deadline.cap(self._config.rendezvous_timeout)),
            )
        except Exception as err:
            with self._lock:
                self._orders.pop(o.plan_id, None)
            logger.warning(
                "%s: plan %d: joiner %r never joined: %s", self.link.who, o.plan_id, o.joiner, err
            )
            self.link.report(
                o.plan_id, result_of(err), role="donor", started=t0, message=f"rendezvous: {err}"
            )
            return
        o.group = group
        if o.cancelled:
            self._graveyard.append(group)
            return
        where = self._position()
        try:
            live = self.link.client.acknowledge(
                o.plan_id,
                self._config.replica_id,
                self._config.group_rank,
                where.step or 0,
                idle=where.parked,
                step_time_s=where.step_time_s,
            )
        except RecoverydError as err:
            live = False
            logger.warning("%s: could not acknowledge plan %d: %s", self.link.who, o.plan_id, err)
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
