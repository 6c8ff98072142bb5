"""The one face a trainer rank sees of its agent, in its process or in a sidecar.

:class:`RankAgent` is what :class:`recoveryd.Agent` (in the trainer's
process) and :class:`recoveryd.Attachment` (a sidecar's, reached over a
Unix socket) both are: the same calls, the same return types, and the same
:class:`RecoveryRecord` after a recovery. A trainer written against it
switches mode with one line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal, Protocol, runtime_checkable

from recoveryd.protocol import Report

Outcome = Literal["recovering", "recovered", "fresh", "no_donor"]


@dataclass(slots=True)
class RecoveryRecord:
    """How one :meth:`RankAgent.recover` went, for logs and timelines.

    Attributes:
        outcome: ``recovered``, ``fresh`` (nothing of this layout ever held a
            step: a job's start) or ``no_donor`` (state existed but could not
            be had); ``recovering`` while the call runs.
        step: the recovered step.
        donor: the donor replica.
        plan_id: the plan that succeeded.
        attempts: plans this rank took part in (failed ones included).
        bytes: payload bytes received.
        seconds: from the call to the state being ready on every rank.
        phases: seconds per phase: ``plan`` (until a plan named a donor),
            ``rendezvous`` (forming the transfer group), ``arm`` (until every
            rank of both replicas was in its group and the fence was set),
            ``fence`` (until the donor reached the fenced step), the transfer's phases
            (``manifest``, ``prepare``, ``handshake``, ``data``, ``verify``),
            ``report``, and ``confirm`` (until every rank of the replica had its state).
        reason: why there was no donor.
        state_written: whether any transfer wrote into the state. After a
            ``no_donor`` with this set (plans failed midway), the state is
            partly overwritten: initialise it again or load a checkpoint.
    """

    outcome: Outcome
    step: int | None = None
    donor: str = ""
    plan_id: int = 0
    attempts: int = 0
    bytes: int = 0
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    state_written: bool = False


@runtime_checkable
class RankAgent(Protocol):
    """What a trainer rank calls: :class:`recoveryd.Agent` or :class:`recoveryd.Attachment`.

    Example::

        agent: RankAgent = Agent(config, lambda: state)  # or attach(path, lambda: state, ...)
        step = agent.recover(state, timeout=timedelta(minutes=5)) or 0
        for step in range(step + 1, steps):
            train_one_step()
            agent.step(step)
        agent.close()
    """

    @property
    def last_recovery(self) -> RecoveryRecord | None:
        """How the last :meth:`recover` went (``None`` before the first)."""
        ...

    @property
    def sends(self) -> Sequence[Report]:
        """The last sends made from this rank's state as a donor (newest last)."""
        ...

    @property
    def metrics_address(self) -> str | None:
        """``host:port`` of the ``/metrics`` that counts this rank's transfers, or ``None``."""
        ...

    def recover(self, state_dict: object, *, timeout: timedelta = ...) -> int | None:
        """Receives this rank's state from a live donor, in place.

        Returns:
            The recovered step, or ``None`` when there is nothing to recover
            from (see :attr:`last_recovery` for why).
        """
        ...

    def step(self, step: int) -> bool:
        """Marks a step boundary; returns whether a send to a joiner was due (and made)."""
        ...

    def park(self, timeout: timedelta) -> None:
        """Serves plans at the current step for up to ``timeout`` while the trainer does not step."""
        ...

    def refresh(self) -> None:
        """Looks at the state anew (call after its layout changed, e.g. a resharding)."""
        ...

    def close(self, timeout: timedelta = ...) -> None:
        """Leaves the job: this rank's state is served no more."""
        ...
