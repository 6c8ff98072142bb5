"""Who is in the job: registered ranks, their heartbeats, and replicas' health.

Pure bookkeeping on plain data with an injectable clock, so the policy is
tested without a server. A rank is healthy while it reports itself healthy
and its last heartbeat is younger than ``heartbeat_timeout``; a replica is
healthy only when every one of its ranks is registered and healthy.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta

from recoveryd.errors import ConfigError, PermissionDeniedError, UnknownMemberError
from recoveryd.protocol import MemberInfo

__all__ = ["Membership", "ReplicaView"]


@dataclass(slots=True)
class _Rank:
    info: MemberInfo
    step: int | None
    healthy: bool
    seen: float
    secret: bytes | None = None
    """SHA-256 of the rank's secret (``None``: registered without one, in policy tests)."""


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


@dataclass(frozen=True, slots=True)
class ReplicaView:
    """A replica as the coordinator sees it now.

    Attributes:
        replica_id: the replica.
        world_size: its declared number of ranks.
        ranks: the registered ranks' infos, by group rank.
        step: the lowest step its ranks reported (``None`` until all reported).
        healthy: every rank registered, self-reported healthy and heard from in time.
        ranks_healthy: every registered rank self-reported healthy and heard
            from in time (some may not have registered yet).
        fingerprint: the layout fingerprint its ranks share, or ``None`` if they disagree.
        labels: rank 0's locality labels (a replica's ranks usually share a zone).
    """

    replica_id: str
    world_size: int
    ranks: Mapping[int, MemberInfo]
    step: int | None
    healthy: bool
    fingerprint: str | None
    labels: Mapping[str, str]
    ranks_healthy: bool = True

    @property
    def device_kinds(self) -> set[str]:
        """The device kinds its registered ranks hold state on (``cpu``, ``cuda``)."""
        return {m.device_kind for m in self.ranks.values()}


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
        # replica id -> group rank -> rank; grouped so one replica's view costs its own ranks only.
        self._replicas: dict[str, dict[int, _Rank]] = {}

    def register(
        self, info: MemberInfo, *, step: int | None = None, secret: str | None = None
    ) -> bool:
        """Adds or replaces a rank (a restarted rank registers again).

        Whether the caller may replace a registration is :meth:`may_replace`'s
        question, asked first; ``secret`` is the one handed to the new holder.

        Returns:
            Whether this replaces a registration from another agent process
            (the rank restarted), so plans involving it are void.

        Raises:
            ConfigError: live ranks of the replica declared another world size
                (ranks silent for ``heartbeat_timeout`` are dropped instead: the
                replica was restarted with another size).
        """
        now = self._clock()
        ranks = self._replicas.setdefault(info.replica_id, {})
        resized = [r for r in ranks.values() if r.info.group_world_size != info.group_world_size]
        if resized:
            live = [
                r
                for r in resized
                if r.info.group_rank != info.group_rank and now - r.seen <= self._timeout
            ]
            if live:
                raise ConfigError(
                    "group_world_size",
                    info.group_world_size,
                    f"replica {info.replica_id!r} has live ranks registered with "
                    f"{live[0].info.group_world_size} ranks; restart all its ranks with one size",
                )
            for r in resized:  # a resized replica: its old ranks are gone
                del ranks[r.info.group_rank]
        before = ranks.get(info.group_rank)
        ranks[info.group_rank] = _Rank(
            info=info,
            step=step,
            healthy=True,
            seen=now,
            secret=_digest(secret) if secret is not None else None,
        )
        return before is not None and before.info.agent_id != info.agent_id

    def may_replace(self, replica_id: str, group_rank: int, presented: str) -> str:
        """Why a registration of this rank may not replace the current one ("" if it may).

        A rank is taken over by whoever presents its secret (its agent again, or
        a restarted one that kept it: :mod:`recoveryd.agent.keeper`; a sidecar
        whose trainer restarted), or once its holder is gone: silent for
        ``heartbeat_timeout``. Anyone else is refused, so a live rank cannot be
        hijacked by registering over it (not even one that said it is unhealthy:
        that is when a squatter would race its restart).
        """
        r = self._replicas.get(replica_id, {}).get(group_rank)
        if r is None or r.secret is None:
            return ""
        if presented and hmac.compare_digest(_digest(presented), r.secret):
            return ""
        age = self._clock() - r.seen
        if age > self._timeout:
            return ""
        return (
            f"it is held by a live registration (heard from {age:.1f} s ago); a replacement "
            "must present the rank's secret, or wait until the holder leaves or is silent for "
            f"{self._timeout:g} s"
        )

    def authorize(self, replica_id: str, group_rank: int, presented: str) -> None:
        """Checks that a call for this rank carries its secret.

        Raises:
            UnknownMemberError: the rank is not registered (register again).
            PermissionDeniedError: the secret is missing or not this registration's.
        """
        r = self._replicas.get(replica_id, {}).get(group_rank)
        if r is None:
            raise UnknownMemberError(replica_id, group_rank)
        if r.secret is None:
            return
        if not presented or not hmac.compare_digest(_digest(presented), r.secret):
            raise PermissionDeniedError(
                replica_id,
                group_rank,
                "the call does not carry the secret of the rank's current registration "
                "(another agent registered it since, or the caller never did)",
            )

    def counts(self) -> tuple[int, int]:
        """How many replicas and ranks are registered."""
        return len(self._replicas), sum(len(r) for r in self._replicas.values())

    def heartbeat(
        self, replica_id: str, group_rank: int, *, step: int | None, healthy: bool
    ) -> None:
        """Records a rank's step and health.

        Raises:
            UnknownMemberError: the rank is not registered.
        """
        r = self._replicas.get(replica_id, {}).get(group_rank)
        if r is None:
            raise UnknownMemberError(replica_id, group_rank)
        if step is not None:
            r.step = step
        r.healthy = healthy
        r.seen = self._clock()

    def forget(self, replica_id: str) -> None:
        """Drops every rank of a replica (it left the job)."""
        self._replicas.pop(replica_id, None)

    def expire(self, older_than: timedelta) -> list[tuple[str, int]]:
        """Drops ranks not heard from for ``older_than``; returns which."""
        limit = self._clock() - older_than.total_seconds()
        gone = []
        for rid, ranks in list(self._replicas.items()):
            for g, r in list(ranks.items()):
                if r.seen < limit:
                    del ranks[g]
                    gone.append((rid, g))
            if not ranks:
                del self._replicas[rid]
        return gone

    def leave(self, replica_id: str, group_rank: int, agent_id: str) -> bool:
        """Forgets a rank registered by ``agent_id``; returns whether it was."""
        ranks = self._replicas.get(replica_id)
        if ranks is None:
            return False
        r = ranks.get(group_rank)
        if r is None or r.info.agent_id != agent_id:
            return False
        del ranks[group_rank]
        if not ranks:
            del self._replicas[replica_id]
        return True

    def silent_ranks(self) -> set[tuple[str, int]]:
        """Registered ranks not heard from for ``heartbeat_timeout``."""
        limit = self._clock() - self._timeout
        return {
            (rid, g)
            for rid, ranks in self._replicas.items()
            for g, r in ranks.items()
            if r.seen < limit
        }

    def member(self, replica_id: str, group_rank: int) -> MemberInfo | None:
        """A registered rank's info, or ``None``."""
        r = self._replicas.get(replica_id, {}).get(group_rank)
        return r.info if r is not None else None

    def rank_state(self, replica_id: str, group_rank: int) -> tuple[int | None, bool, float] | None:
        """A rank's (step, healthy, seconds since last heard), or ``None`` if unknown."""
        r = self._replicas.get(replica_id, {}).get(group_rank)
        if r is None:
            return None
        age = self._clock() - r.seen
        return r.step, r.healthy and age <= self._timeout, age

    def replica(self, replica_id: str) -> ReplicaView | None:
        """One replica's view, or ``None`` if none of its ranks is registered."""
        ranks = self._replicas.get(replica_id)
        return self._view(replica_id, ranks, self._clock()) if ranks else None

    def replicas(self) -> dict[str, ReplicaView]:
        """Every replica with at least one registered rank, by id."""
        now = self._clock()
        return {rid: self._view(rid, ranks, now) for rid, ranks in self._replicas.items() if ranks}

    def rank_count(self) -> int:
        """How many ranks are registered."""
        return sum(len(r) for r in self._replicas.values())

    def _view(self, rid: str, ranks: dict[int, _Rank], now: float) -> ReplicaView:
        # One pass over the replica's ranks: donor choice calls this for every
        # replica, so it is kept cheap (about 1 ms per 2,000 ranks).
        first = next(iter(ranks.values()))
        world = first.info.group_world_size
        complete = len(ranks) == world
        ranks_healthy = True
        lowest: int | None = None
        stepless = False
        fingerprint: str | None = first.info.layout_fingerprint
        for r in ranks.values():
            if r.info.layout_fingerprint != fingerprint:
                fingerprint = None
            s = r.step
            if s is None:
                stepless = True
            elif lowest is None or s < lowest:
                lowest = s
            if ranks_healthy and (not r.healthy or now - r.seen > self._timeout):
                ranks_healthy = False
        return ReplicaView(
            replica_id=rid,
            world_size=world,
            ranks=_Infos(ranks),
            step=lowest if complete and not stepless else None,
            healthy=complete and ranks_healthy,
            fingerprint=fingerprint,
            labels=ranks[0].info.labels if 0 in ranks else {},
            ranks_healthy=ranks_healthy,
        )


class _Infos(Mapping[int, MemberInfo]):
    """A replica's ranks' infos, by group rank, without copying them out."""

    __slots__ = ("_ranks",)

    def __init__(self, ranks: dict[int, _Rank]) -> None:
        self._ranks = ranks

    def __getitem__(self, key: int) -> MemberInfo:
        return self._ranks[key].info

    def __iter__(self) -> Iterator[int]:
        return iter(self._ranks)

    def __len__(self) -> int:
        return len(self._ranks)
