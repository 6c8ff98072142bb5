"""What the coordinator and the agents say to each other about plans, as plain data.

Orders to donor ranks, answers to joining ranks, transfer reports, and plan
snapshots for ``recoveryd status``. The gRPC servicer and client translate
these to and from protobuf; nothing else sees the wire types.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

PlanState = Literal["preparing", "armed", "done", "failed"]
Role = Literal["donor", "joiner"]

RESULTS = ("ok", "timeout", "peer_lost", "rejected", "step_mismatch", "error")
"""Every outcome a transfer report may carry."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Order:
    """What a donor rank must do for a plan."""

    kind: Literal["prepare", "arm", "cancel"]
    plan_id: int
    joiner: str
    step: int | None = None
    timeout_s: float = 0.0
    rendezvous_prefix: str = ""
    backend: str = "gloo"


@dataclass(frozen=True, kw_only=True, slots=True)
class Answer:
    """What a joining rank is told when it asks to recover."""

    state: Literal["no_donor", "wait", "transfer", "done"]
    reason: str = ""
    plan_id: int = 0
    donor: str = ""
    step: int | None = None
    """The fenced step (``transfer`` once armed, and ``done``)."""
    rendezvous: str = ""
    rendezvous_prefix: str = ""
    timeout_s: float = 0.0
    backend: str = "gloo"
    fresh: bool = False
    """``no_donor`` at a job's start: nothing of this layout ever held a step here."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Report:
    """One side of one transfer, as its agent saw it."""

    plan_id: int
    replica_id: str
    group_rank: int
    role: Role
    result: str
    """One of :data:`RESULTS`."""
    message: str = ""
    step: int | None = None
    bytes: int = 0
    seconds: float = 0.0
    phases: Mapping[str, float] = field(default_factory=dict)
    address: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class PlanSnapshot:
    """A plan as ``recoveryd status`` shows it."""

    plan_id: int
    joiner: str
    donor: str
    step: int | None
    state: PlanState
    attempt: int
    age_s: float
    ranks_done: int
    reason: str
    bytes: int
    transfer_s: float
    recovery_s: float
    phases: Mapping[str, float]
    addresses: tuple[str, ...]
