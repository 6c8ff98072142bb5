"""The cluster counted once: each replica's state, the totals metrics export, the status reply.

Both the metrics (every second) and ``GetStatus`` (on request) read the
cluster through :func:`take_census`, so a replica has one state wherever it
is shown, decided by one rule (:func:`replica_state`). Pure functions over
the coordinator's plain data; the servicer calls them from its event loop.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from recoveryd.coordinator.membership import Membership, ReplicaView
from recoveryd.coordinator.planner import Planner
from recoveryd.protocol import (
    REPLICA_STATES,
    ClusterStatus,
    RankStatus,
    ReplicaState,
    ReplicaStatus,
)


def replica_state(view: ReplicaView, recovering: Collection[str]) -> ReplicaState:
    """A replica's state, by one rule.

    ``unhealthy`` when a registered rank is (it said so, or went silent): a
    joiner that died during its recovery is unhealthy, not recovering (its
    round stays open until it is forgotten). Else ``recovering`` while in a
    round, even before all its ranks registered (they start one by one).
    Else ``healthy`` when every rank is registered, ``unhealthy`` when some
    are missing.
    """
    if not view.ranks_healthy:
        return "unhealthy"
    if view.replica_id in recovering:
        return "recovering"
    return "healthy" if view.healthy else "unhealthy"


@dataclass(frozen=True, slots=True)
class Census:
    """The cluster at one moment, counted."""

    views: Mapping[str, ReplicaView]
    """Every replica with a registered rank, by id."""
    states: Mapping[str, ReplicaState]
    """Each replica's state (see :func:`replica_state`)."""
    replicas: Mapping[ReplicaState, int]
    """How many replicas are in each state (every state present, 0 included)."""
    healthy_ranks: int
    """Ranks of healthy replicas."""
    unhealthy_ranks: int
    """Ranks of unhealthy replicas."""
    in_flight: int
    """Plans not finished yet."""
    slowest_step: int | None
    """The lowest step of a healthy replica holding one (``None``: none holds a step)."""
    fastest_step: int | None
    """The highest such step."""


def take_census(members: Membership, planner: Planner) -> Census:
    """Counts the cluster as membership and the planner see it now."""
    views = members.replicas()
    recovering = planner.recovering()
    states: dict[str, ReplicaState] = {}
    counts: dict[ReplicaState, int] = dict.fromkeys(REPLICA_STATES, 0)
    healthy_ranks = unhealthy_ranks = 0
    steps = []
    for rid, v in views.items():
        state = replica_state(v, recovering)
        states[rid] = state
        counts[state] += 1
        if v.healthy:
            healthy_ranks += len(v.ranks)
            if v.step is not None:
                steps.append(v.step)
        else:
            unhealthy_ranks += len(v.ranks)
    return Census(
        views=views,
        states=states,
        replicas=counts,
        healthy_ranks=healthy_ranks,
        unhealthy_ranks=unhealthy_ranks,
        in_flight=planner.plans_in_flight(),
        slowest_step=min(steps, default=None),
        fastest_step=max(steps, default=None),
    )


def cluster_status(
    members: Membership,
    planner: Planner,
    census: Census,
    *,
    coordinator_id: str,
    uptime_s: float,
    recent: int,
    after: str = "",
    max_replicas: int = 1 << 30,
    max_ranks: int = 1 << 30,
) -> ClusterStatus:
    """The cluster as ``recoveryd status`` shows it: replicas, ranks, plans.

    One page of it: the replicas whose ids sort after ``after``, at most
    ``max_replicas`` of them and (past the first) ``max_ranks`` ranks in all;
    ``next_page_token`` says where the next page starts. Plans come with the
    first page.
    """
    replicas: list[ReplicaStatus] = []
    ranks_in_page = 0
    more = ""
    for rid, view in sorted(census.views.items()):
        if rid <= after:
            continue
        if replicas and (
            len(replicas) >= max_replicas or ranks_in_page + len(view.ranks) > max_ranks
        ):
            more = replicas[-1].replica_id
            break
        ranks_in_page += len(view.ranks)
        ranks = []
        for g, info in sorted(view.ranks.items()):
            st = members.rank_state(rid, g)
            assert st is not None
            step, healthy, age = st
            ranks.append(
                RankStatus(
                    group_rank=g,
                    step=step,
                    healthy=healthy,
                    last_seen_s=age,
                    rendezvous=info.rendezvous,
                    device_kind=info.device_kind,
                    labels=dict(info.labels),
                    interface=info.interface,
                )
            )
        replicas.append(
            ReplicaStatus(
                replica_id=rid,
                world_size=view.world_size,
                step=view.step,
                healthy=view.healthy,
                state=census.states[rid],
                ranks=ranks,
            )
        )
    first = not after
    return ClusterStatus(
        coordinator_id=coordinator_id,
        uptime_s=uptime_s,
        replicas=replicas,
        active=planner.active() if first else [],
        recent=planner.recent(recent) if first else [],
        next_page_token=more,
    )
