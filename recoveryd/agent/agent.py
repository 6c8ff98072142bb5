"""The in-process agent: what a trainer rank calls (``recover``, ``step``, ``park``).

:meth:`Agent.recover` runs when the rank starts: it asks the coordinator for
a plan and receives the donor's live state in place, or returns ``None`` when
there is nothing to recover from. :meth:`Agent.step` runs once per training
step: a comparison when nothing is due, and a send of the live state when a
plan's fence is this step.

The parts that talk to the coordinator (:mod:`recoveryd.agent.link`), run the
donor side (:mod:`recoveryd.agent.donor`) and the joiner side
(:mod:`recoveryd.agent.joiner`) are separate, so a sidecar process can reuse
them. Training never waits on the coordinator; a background thread's failure
is raised at the trainer's next call.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
from prometheus_client import CollectorRegistry

from recoveryd._time import Deadline
from recoveryd.agent.config import AgentConfig
from recoveryd.agent.donor import Donor
from recoveryd.agent.interface import RecoveryRecord
from recoveryd.agent.joiner import JoinerRound
from recoveryd.agent.layout import fingerprint
from recoveryd.agent.link import CoordinatorLink, Position
from recoveryd.agent.rendezvous import host_store
from recoveryd.errors import (
    AuthenticationError,
    CoordinatorUnavailableError,
    RecoverydError,
    TransferTimeoutError,
)
from recoveryd.metrics import AgentMetrics, MetricsServer
from recoveryd.protocol import Report

logger = logging.getLogger(__name__)

_PARK_POLL = timedelta(milliseconds=10)
"""How often a parked rank looks for a plan that is due."""


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

    def __init__(
        self,
        config: AgentConfig,
        state_dict: Callable[[], object],
        *,
        metrics: AgentMetrics | None = None,
    ) -> None:
        self.config = config
        self._state_fn = state_dict
        self.host = config.advertised_host()
        self._store = host_store(
            self.host, config.rendezvous_port, timeout=config.rendezvous_timeout
        )
        self.rendezvous = f"{self.host}:{self._store.port}"
        self.agent_id = uuid.uuid4().hex[:12]
        self._step: int | None = None
        self._stepped = False
        self._parked = False
        self._last_step_at = 0.0
        self._step_time = 0.0
        # Groups of failed transfers (and of striped ones: one per donor): a late
        # peer may still write into their buffers, so they are kept for a while.
        self._graveyard: deque[dist.ProcessGroup] = deque(maxlen=48)
        self.last_recovery: RecoveryRecord | None = None
        if metrics is None:
            metrics = AgentMetrics(
                CollectorRegistry(),
                backends=("gloo", "nccl") if torch.cuda.is_available() else ("gloo",),
            )
        self.metrics = metrics
        self.registry = metrics.registry
        """This agent's Prometheus metrics (served on ``config.metrics_port`` when set)."""
        self._metrics_server = (
            # Every interface (kubectl port-forward reaches it); the address
            # advertised for scrapes is the transfer host's.
            MetricsServer(self.registry, host="0.0.0.0", port=config.metrics_port)
            if config.metrics_port is not None
            else None
        )
        self._donor = Donor(
            config,
            store=self._store,
            host=self.host,
            graveyard=self._graveyard,
            position=self._position,
            metrics=self.metrics,
        )
        self._link = CoordinatorLink(
            config,
            agent_id=self.agent_id,
            rendezvous=self.rendezvous,
            layout=fingerprint(state_dict()),
            position=self._position,
            on_order=self._donor.on_order,
            on_new_coordinator=self._donor.drop_all,
        )
        self._donor.link = self._link
        self._link.start()
        logger.info(
            "agent %s: rank %d/%d of %r, transfers rendezvous at %s (interface %s), coordinator %s",
            self.agent_id,
            config.group_rank,
            config.group_world_size,
            config.replica_id,
            self.rendezvous,
            self._link.interface or "?",
            config.coordinator,
        )

    @property
    def metrics_address(self) -> str | None:
        """``host:port`` of this agent's ``/metrics``, or ``None`` when not served."""
        if self._metrics_server is None:
            return None
        return f"{self.host}:{self._metrics_server.port}"

    @property
    def sends(self) -> deque[Report]:
        """The last sends this rank made as a donor (newest last)."""
        return self._donor.sends

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
            :attr:`last_recovery` for the coordinator's reason). If plans
            failed midway before that answer, ``last_recovery.state_written``
            is set and ``state_dict`` must be initialised again.

        Raises:
            CoordinatorUnavailableError: no answer from the coordinator by the
                deadline (a trainer may then start as the first replica would).
            AuthenticationError: the coordinator refuses this agent's credentials
                (the job's token or certificate is missing or wrong).
            TransferTimeoutError: plans were under way but none finished within ``timeout``.
            RecoverydError: a background thread of the agent failed.
        """
        self._raise_failure()
        self._link.set_layout(fingerprint(state_dict))
        record = RecoveryRecord(outcome="recovering")
        self.last_recovery = record
        try:
            step = JoinerRound(
                self._link,
                state_dict,
                host=self.host,
                graveyard=self._graveyard,
                timeout=timeout,
                record=record,
                metrics=self.metrics,
            ).run()
        except (CoordinatorUnavailableError, AuthenticationError):
            self.metrics.recoveries.labels(result="coordinator_unavailable").inc()
            raise
        except TransferTimeoutError:
            self.metrics.recoveries.labels(result="timeout").inc()
            raise
        if step is None:
            self.metrics.recoveries.labels(result=record.outcome).inc()  # fresh or no_donor
            return None
        self.metrics.recoveries.labels(result="recovered").inc()
        self.metrics.recovery_seconds.observe(record.seconds)
        self._step = step
        return step

    def step(self, step: int, *, send: bool = True) -> bool:
        """Marks a step boundary: the state now reflects ``step`` completed.

        Nearly free unless a plan's fence is due, in which case this rank's
        live state is streamed to the joiner before returning (the trainer is
        held for the send only; the group was formed in the background).

        Args:
            step: the step just completed.
            send: ``False`` only reports whether a send is due, without
                sending (a sidecar first asks its trainer for fresh values).

        Returns:
            Whether a send was due at ``step``.

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
        if not self._stepped:  # e.g. optimizer state created by the first step
            self._stepped = True
            self._link.set_layout(fingerprint(self._state_fn()))
            self._link.nudge()  # tell the coordinator at once that this rank holds a step
        due = self._donor.due(step)
        if due and send:
            self._donor.serve(step, self._state_fn)
        elif not due:
            self._donor.warm(self._state_fn)
        return due

    def send_due(self, step: int) -> bool:
        """Whether :meth:`step` at ``step`` will send (a plan is fenced at or before it)."""
        return self._donor.due(step)

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
        deadline = Deadline(timeout)
        if self._step is None:
            return
        self._parked = True
        try:
            while not self._link.closed and not deadline.expired:
                self._donor.serve(self._step, self._state_fn, parked=True)
                deadline.sleep(_PARK_POLL)
        finally:
            self._parked = False

    def refresh(self) -> None:
        """Re-fingerprints the state (call after its layout changed, e.g. a resharding)."""
        self._link.set_layout(fingerprint(self._state_fn()))

    def close(self, timeout: timedelta = timedelta(seconds=5), *, unhealthy: bool = False) -> None:
        """Leaves the coordinator, stops the background threads, the metrics
        endpoint and the coordinator channel.

        Args:
            timeout: how long the background threads get to stop.
            unhealthy: the trainer died rather than finished: the rank stays
                registered as unhealthy (never a donor; it shows, and alerts,
                until it comes back or is forgotten) instead of leaving.
        """
        # A finished or scaled-away rank leaves: nothing to alert on.
        self._link.close(timeout, farewell="unhealthy" if unhealthy else "leave")
        if self._metrics_server is not None:
            self._metrics_server.close()
            self._metrics_server = None

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _position(self) -> Position:
        return Position(step=self._step, step_time_s=self._step_time, parked=self._parked)

    def _raise_failure(self) -> None:
        failure = self._link.failure or self._donor.failure
        if failure is not None:
            raise RecoverydError(
                f"{self.config.replica_id}/{self.config.group_rank}: the agent's background "
                f"thread failed: {failure!r}"
            ) from failure
