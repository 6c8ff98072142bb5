"""Who is in the job: registered ranks, their heartbeats, and replicas' health.

Pure bookkeeping on plain data with an injectable clock, so the policy is
tested without a server. A rank is healthy while it reports itself healthy
and its last heartbeat is younger than ``heartbeat_timeout``; a replica is
healthy only when every one of its ranks is registered and healthy.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta

from recoveryd.errors import ConfigError, RecoverydError


class UnknownMemberError(RecoverydError, KeyError):
    """A heartbeat came from a rank that is not registered (it must register again).

    Attributes:
        replica_id: the replica named by the heartbeat.
        group_rank: the rank named by the heartbeat.
    """

    def __init__(self, replica_id: str, group_rank: int) -> None:
        super().__init__(
            f"rank {group_rank} of replica {replica_id!r} is not registered; register again "
            "(the coordinator may have restarted)"
        )
        self.replica_id = replica_id
        self.group_rank = group_rank


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

    def __post_init__(self) -> None:
        if not self.replica_id:
            raise ConfigError("replica_id", self.replica_id, "must not be empty")
        if self.group_world_size < 1:
            raise ConfigError("group_world_size", self.group_world_size, "must be >= 1")
        if not 0 <= self.group_rank < self.group_world_size:
            raise ConfigError(
                "group_rank", self.group_rank, f"must be in [0, {self.group_world_size})"
            )
        if not self.layout_fingerprint:
            raise ConfigError("layout_fingerprint", self.layout_fingerprint, "must not be empty")


@dataclass(slots=True)
class _Rank:
    info: MemberInfo
    step: int | None
    healthy: bool
    seen: float


@dataclass(frozen=True, slots=True)
class ReplicaView:
    """A replica as the coordinator sees it now.

    Attributes:
        replica_id: the replica.
        world_size: its declared number of ranks.
        ranks: the registered ranks' infos, by group rank.
        step: the lowest step its ranks reported (``None`` until all reported).
        healthy: every rank registered, self-reported healthy and heard from in time.
    """

    replica_id: str
    world_size: int
    ranks: Mapping[int, MemberInfo]
    step: int | None
    healthy: bool

    @property
    def fingerprint(self) -> str | None:
        """The layout fingerprint its ranks share, or ``None`` if they disagree."""
        prints = {m.layout_fingerprint for m in self.ranks.values()}
        return prints.pop() if len(prints) == 1 else None

    @property
    def labels(self) -> Mapping[str, str]:
        """Rank 0's locality labels (a replica's ranks usually share a zone)."""
        first = self.ranks.get(0)
        return first.labels if first is not None else {}


class Membership:
    """Registered ranks and their heartbeats.

    Args:
        heartbeat_timeout: a rank not heard from for this long is unhealthy.
        clock: seconds on a monotonic clock (injectable for tests).
    """

    def __init__(
        self,
        *,
        heartbeat_timeout: timedelta,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if heartbeat_timeout <= timedelta(0):
            raise ConfigError("heartbeat_timeout", heartbeat_timeout, "must be positive")
        self._timeout = heartbeat_timeout.total_seconds()
        self._clock = clock
        self._ranks: dict[tuple[str, int], _Rank] = {}

    def register(self, info: MemberInfo, *, step: int | None = None) -> None:
        """Adds or replaces a rank (a restarted rank registers again).

        Raises:
            ConfigError: the replica's other ranks declared another world size.
        """
        for (rid, _), r in self._ranks.items():
            if rid == info.replica_id and r.info.group_world_size != info.group_world_size:
                raise ConfigError(
                    "group_world_size",
                    info.group_world_size,
                    f"replica {rid!r} was registered with {r.info.group_world_size} ranks",
                )
        self._ranks[(info.replica_id, info.group_rank)] = _Rank(
            info=info, step=step, healthy=True, seen=self._clock()
        )

    def heartbeat(self, replica_id: str, group_rank: int, *, step: int, healthy: bool) -> None:
        """Records a rank's step and health.

        Raises:
            UnknownMemberError: the rank is not registered.
        """
        r = self._ranks.get((replica_id, group_rank))
        if r is None:
            raise UnknownMemberError(replica_id, group_rank)
        r.step = step
        r.healthy = healthy
        r.seen = self._clock()

    def forget(self, replica_id: str) -> None:
        """Drops every rank of a replica (it left the job)."""
        for key in [k for k in self._ranks if k[0] == replica_id]:
            del self._ranks[key]

    def replica(self, replica_id: str) -> ReplicaView | None:
        """One replica's view, or ``None`` if none of its ranks is registered."""
        return self.replicas().get(replica_id)

    def replicas(self) -> dict[str, ReplicaView]:
        """Every replica with at least one registered rank, by id."""
        now = self._clock()
        grouped: dict[str, list[_Rank]] = {}
        for (rid, _), r in self._ranks.items():
            grouped.setdefault(rid, []).append(r)
        out: dict[str, ReplicaView] = {}
        for rid, ranks in grouped.items():
            world = ranks[0].info.group_world_size
            steps = [r.step for r in ranks]
            complete = len(ranks) == world
            fresh = all(r.healthy and now - r.seen <= self._timeout for r in ranks)
            out[rid] = ReplicaView(
                replica_id=rid,
                world_size=world,
                ranks={r.info.group_rank: r.info for r in ranks},
                step=min(s for s in steps if s is not None)
                if complete and None not in steps
                else None,
                healthy=complete and fresh,
            )
        return out
