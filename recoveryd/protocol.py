"""What agents and the coordinator say to each other, as plain data.

Every type here crosses the gRPC boundary, and only these do: registrations
and heartbeats, orders to donor ranks, answers to joining ranks, transfer
reports, and the cluster as ``recoveryd status`` shows it. They are turned
into ``recoveryd.v1`` messages and back in one place (:mod:`recoveryd.codec`,
used by the coordinator's servicer and the agent's client alike); nothing
else sees proto types.

The roles of a transfer are named one way everywhere: the *donor* sends its
live state, the *joiner* receives it. The result vocabulary of a transfer
(:data:`RESULTS`, :func:`result_of`) lives here too: an agent reports it, the
coordinator decides by it, the metrics label by it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal

from recoveryd.errors import (
    ConfigError,
    ManifestError,
    PeerLostError,
    StateMismatchError,
    StepMismatchError,
    TransferTimeoutError,
    UntrustedPeerError,
)

Role = Literal["donor", "joiner"]
"""The two sides of a transfer: the donor sends its live state, the joiner receives it."""

PlanState = Literal["preparing", "armed", "done", "failed"]
"""A plan is ``preparing`` until every donor rank joined its group, then
``armed`` at a fenced step, then ``done`` or ``failed``."""

ReplicaState = Literal["healthy", "unhealthy", "recovering"]
REPLICA_STATES: tuple[ReplicaState, ...] = ("healthy", "unhealthy", "recovering")
"""How ``recoveryd status`` and the metrics describe a replica."""

RESULTS = ("ok", "timeout", "peer_lost", "rejected", "step_mismatch", "untrusted", "error")
"""Every outcome a transfer report may carry (a small fixed set: they label metrics).
``untrusted``: the peer on the group could not prove the plan's key (a stranger
joined the plan's group): nobody of the plan is to blame."""


def result_of(err: BaseException) -> str:
    """The report result for a transfer failure (one of :data:`RESULTS`)."""
    if isinstance(err, StepMismatchError):
        return "step_mismatch"
    if isinstance(err, UntrustedPeerError):
        return "untrusted"
    if isinstance(err, StateMismatchError | ManifestError):
        return "rejected"
    if isinstance(err, TransferTimeoutError | TimeoutError):
        return "timeout"
    if isinstance(err, PeerLostError | ConnectionError):
        return "peer_lost"
    return "error"


# ---- membership ----------------------------------------------------------------


MAX_NAME_CHARS = 253
"""The longest replica id, label value or agent id (a DNS name's length)."""
MAX_LABELS = 32
"""The most locality labels a rank may carry."""
MAX_LABEL_KEY_CHARS = 63
MAX_LABEL_CHARS = 2048
"""The most characters a rank's labels (keys and values) may hold in all."""
MAX_ADDRESS_CHARS = 300
"""The longest ``host:port`` (a DNS name, a colon and a port, or a bracketed IPv6)."""
MAX_FINGERPRINT_CHARS = 128
MAX_DONORS = 16
"""The most donors one striped plan may name (the transport's own bound too)."""
MAX_WORLD_SIZE = 1 << 20
"""The most ranks one replica may declare."""
DEVICE_KINDS = ("cpu", "cuda")


def check_text(name: str, value: str, limit: int, *, empty: bool = False) -> None:
    """A name from the network: bounded, printable, no whitespace (it reaches logs and tables).

    Raises:
        ConfigError: naming the field and what is wrong.
    """
    if not value:
        if empty:
            return
        raise ConfigError(name, value, "must not be empty")
    if len(value) > limit:
        raise ConfigError(name, f"{value[:40]}...", f"must be at most {limit} characters")
    if not value.isprintable() or any(c.isspace() for c in value):
        raise ConfigError(name, value[:80], "must be printable, without spaces")


def check_identity(replica_id: str, group_rank: int, group_world_size: int) -> None:
    """Checks a rank's identity: a replica id, and a rank within the replica's size.

    Raises:
        ConfigError: naming the field that is wrong.
    """
    check_text("replica_id", replica_id, MAX_NAME_CHARS)
    if not 1 <= group_world_size <= MAX_WORLD_SIZE:
        raise ConfigError("group_world_size", group_world_size, f"must be in [1, {MAX_WORLD_SIZE}]")
    if not 0 <= group_rank < group_world_size:
        raise ConfigError("group_rank", group_rank, f"must be in [0, {group_world_size})")


@dataclass(frozen=True, kw_only=True, slots=True)
class MemberInfo:
    """What a rank's agent says about itself when it registers."""

    replica_id: str
    """The replica (a whole copy of the model, all its ranks) this rank belongs to."""
    group_rank: int
    """This rank's rank within its replica."""
    group_world_size: int
    """How many ranks the replica has."""
    layout_fingerprint: str
    """A digest of the state's layout: only equal fingerprints can donate to each other."""
    device_kind: str = "cpu"
    """``cpu`` (Gloo transfers) or ``cuda`` (NCCL)."""
    rendezvous: str = ""
    """``host:port`` where this rank's transfers rendezvous."""
    labels: Mapping[str, str] = field(default_factory=dict)
    """Locality labels, e.g. ``{"node": ..., "zone": ...}``."""
    agent_id: str = ""
    """Unique per agent process: a new one for a registered rank means the rank restarted."""
    interface: str = ""
    """The network interface the rendezvous address is on (``eth0``), as the agent saw it."""

    def __post_init__(self) -> None:
        check_identity(self.replica_id, self.group_rank, self.group_world_size)
        check_text("layout_fingerprint", self.layout_fingerprint, MAX_FINGERPRINT_CHARS)
        if self.device_kind not in DEVICE_KINDS:
            raise ConfigError(
                "device_kind", self.device_kind[:40], f"must be one of {DEVICE_KINDS}"
            )
        check_text("rendezvous", self.rendezvous, MAX_ADDRESS_CHARS, empty=True)
        check_text("agent_id", self.agent_id, MAX_NAME_CHARS, empty=True)
        check_text("interface", self.interface, MAX_LABEL_KEY_CHARS, empty=True)
        if len(self.labels) > MAX_LABELS:
            raise ConfigError("labels", len(self.labels), f"at most {MAX_LABELS} labels")
        size = sum(len(k) + len(v) for k, v in self.labels.items())
        if size > MAX_LABEL_CHARS:
            raise ConfigError("labels", size, f"at most {MAX_LABEL_CHARS} characters in all")
        for key, value in self.labels.items():
            check_text("label key", key, MAX_LABEL_KEY_CHARS)
            check_text(f"label {key}", value, MAX_NAME_CHARS, empty=True)


@dataclass(frozen=True, kw_only=True, slots=True)
class Registration:
    """The coordinator's answer to a registration."""

    coordinator_id: str
    """Changes when the coordinator restarts (its plans are then gone)."""
    heartbeat_interval: timedelta
    """How often the rank heartbeats from now on."""
    rank_secret: str = field(default="", repr=False)
    """The secret every later call for this rank must carry (it proves the
    caller holds this registration); empty from an older coordinator."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Beat:
    """One rank's heartbeat."""

    replica_id: str
    group_rank: int
    step: int | None
    healthy: bool = True


# ---- plans ---------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class Order:
    """What a donor rank must do for a plan."""

    kind: Literal["prepare", "arm", "cancel"]
    plan_id: int
    joiner: str
    step: int | None = None
    """The fenced step (``arm`` only)."""
    timeout_s: float = 0.0
    rendezvous_prefix: str = ""
    backend: str = "gloo"
    plan_key: bytes = field(default=b"", repr=False, compare=False)
    """The plan's key, known only to its parties (``prepare`` and ``arm``)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class StripeSource:
    """One donor of a striped plan, as a joiner rank is told it."""

    donor: str
    rendezvous: str
    """Where that donor rank's rendezvous store is (``host:port``)."""
    rendezvous_prefix: str
    share: float
    """Its part of the bytes, relative to the other donors' (positive)."""


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
    plan_key: bytes = field(default=b"", repr=False, compare=False)
    """The plan's key, known only to its parties (``transfer``)."""
    stripes: tuple[StripeSource, ...] = ()
    """A striped plan's donors, the first being ``donor`` (empty: one donor)."""

    def sources(self) -> tuple[StripeSource, ...]:
        """Every donor of a ``transfer`` answer (one unless the plan is striped)."""
        if self.stripes:
            return self.stripes
        return (
            StripeSource(
                donor=self.donor,
                rendezvous=self.rendezvous,
                rendezvous_prefix=self.rendezvous_prefix,
                share=1.0,
            ),
        )


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
    blame: str = ""
    """A joiner's failure in a striped plan: the donor replica it holds responsible."""


# ---- status --------------------------------------------------------------------


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
    donors: tuple[DonorShare, ...] = ()
    """Every donor of the plan with its share (one unless striped)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class DonorShare:
    """One donor of a plan in ``recoveryd status``: its share, and what it sent."""

    replica_id: str
    share: float
    """Its planned part of the bytes (a plan's shares sum to 1)."""
    bytes: int = 0
    """What its ranks reported sending."""
    state: str = ""
    """``""`` (no report yet), ``"ok"``, a failure's result, or ``"lost"`` (it died
    or went unhealthy after the fence; the other donors sent its part)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RankStatus:
    """A rank in ``recoveryd status``."""

    group_rank: int
    step: int | None
    healthy: bool
    last_seen_s: float
    rendezvous: str
    device_kind: str
    labels: Mapping[str, str]
    interface: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class ReplicaStatus:
    """A replica in ``recoveryd status``."""

    replica_id: str
    world_size: int
    step: int | None
    healthy: bool
    state: ReplicaState
    ranks: Sequence[RankStatus]


@dataclass(frozen=True, kw_only=True, slots=True)
class ClusterStatus:
    """The cluster as the coordinator sees it."""

    coordinator_id: str
    uptime_s: float
    replicas: Sequence[ReplicaStatus]
    active: Sequence[PlanSnapshot]
    recent: Sequence[PlanSnapshot] = field(default_factory=list)
    next_page_token: str = ""
    """Non-empty when more replicas follow (one page of a large job)."""
