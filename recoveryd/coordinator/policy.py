"""Donor choice and recovery plans, per joining replica (not per rank).

All ranks of a joiner pull from the same donor replicas, rank r from rank r,
at one step boundary, so the joiner's ranks end up with one consistent step.
Among the replicas that can donate (healthy, same layout rank by rank, same
world size, with a step), the most advanced win (within a slack of a few
steps); among those, the donor with the fewest transfers in flight, then the
nearest (same node, then same zone), then the fastest link seen in past
transfers, then the highest step.

A striped plan takes the best ``max_donors`` of them, and each rank pulls a
disjoint part of its state from each, sized by the bandwidth seen from each
donor (a donor not measured yet counts as the median of those that were; one
that would get under :data:`MIN_SHARE` of the bytes is left out).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

from recoveryd.coordinator.membership import ReplicaView


@dataclass(frozen=True, kw_only=True, slots=True)
class RankPair:
    """One transfer of a plan: the donor's rank sends to the joiner's rank of the same number."""

    group_rank: int
    donor_rendezvous: str
    """Where the donor rank's transfer rendezvous is hosted (``host:port``)."""


MIN_SHARE = 0.05
"""A donor whose bandwidth would earn it less than this part of the bytes is not
worth its group's set-up and fence wait: a striped plan leaves it out."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Stripe:
    """One donor replica's part of a plan.

    Attributes:
        donor: the replica that sends this part.
        share: its part of each rank's bytes (a plan's shares sum to 1).
        pairs: one transfer per group rank.
    """

    donor: str
    share: float
    pairs: Sequence[RankPair]


@dataclass(frozen=True, kw_only=True, slots=True)
class RecoveryPlan:
    """Who sends what to whom.

    The step is not part of the plan: it is fenced once every donor rank has
    joined the transfer group and said where it is (see :func:`fence`).

    Attributes:
        plan_id: unique per coordinator; a re-plan gets a new one.
        joiner: the replica that receives.
        stripes: one per donor replica, the best donor first (one unless striped).
    """

    plan_id: int
    joiner: str
    stripes: Sequence[Stripe]

    @property
    def donor(self) -> str:
        """The first (best) donor."""
        return self.stripes[0].donor

    @property
    def donors(self) -> tuple[str, ...]:
        """Every donor replica, the best first."""
        return tuple(s.donor for s in self.stripes)

    @property
    def striped(self) -> bool:
        """Whether more than one donor sends."""
        return len(self.stripes) > 1


def layouts_match(joiner: ReplicaView, candidate: ReplicaView) -> bool:
    """Whether every registered rank r of ``joiner`` has the layout of ``candidate``'s rank r.

    Ranks of one replica may hold different layouts (pipeline stages, uneven
    shards); only rank r of the donor feeds rank r of the joiner.
    """
    if joiner.fingerprint is not None and candidate.fingerprint is not None:
        return joiner.fingerprint == candidate.fingerprint  # one layout for all ranks: O(1)
    for r, mine in joiner.ranks.items():
        theirs = candidate.ranks.get(r)
        if theirs is None or theirs.layout_fingerprint != mine.layout_fingerprint:
            return False
    return True


def eligible(joiner: ReplicaView, candidate: ReplicaView) -> bool:
    """Whether ``candidate`` can donate to ``joiner`` at all."""
    return (
        candidate.replica_id != joiner.replica_id
        and candidate.healthy
        and candidate.step is not None
        and candidate.world_size == joiner.world_size
        and layouts_match(joiner, candidate)
    )


def _nearness(joiner: ReplicaView, candidate: ReplicaView) -> int:
    """0: same node, 1: same zone, 2: neither (lower is nearer)."""
    mine, theirs = joiner.labels, candidate.labels
    if mine.get("node") and mine.get("node") == theirs.get("node"):
        return 0
    if mine.get("zone") and mine.get("zone") == theirs.get("zone"):
        return 1
    return 2


def choose_donors(
    joiner: ReplicaView,
    replicas: Collection[ReplicaView],
    *,
    max_donors: int = 1,
    inflight: Mapping[str, int] | None = None,
    bandwidth_bps: Mapping[str, float] | None = None,
    exclude: Collection[str] = (),
    step_slack: int = 0,
) -> list[ReplicaView]:
    """The best donors for ``joiner``, best first: at most ``max_donors``, none if
    no replica can donate.

    Args:
        joiner: the replica that needs state.
        replicas: every replica the coordinator knows.
        max_donors: how many donors one plan may stripe over.
        inflight: transfers each replica is sending now.
        bandwidth_bps: the bandwidth seen from each replica in past transfers.
        exclude: replicas not to pick (e.g. a donor that just failed this joiner).
        step_slack: replicas within this many steps of the most advanced one
            count as equally up to date (replicas of a job are a step or two
            apart at any moment, and the send happens at a fence ahead anyway),
            so load, locality and bandwidth decide among them.
    """
    inflight = inflight or {}
    bandwidth_bps = bandwidth_bps or {}
    candidates = [c for c in replicas if c.replica_id not in exclude and eligible(joiner, c)]
    if not candidates:
        return []
    best = max(c.step or 0 for c in candidates)
    candidates = [c for c in candidates if (c.step or 0) >= best - step_slack]
    candidates.sort(
        key=lambda c: (
            inflight.get(c.replica_id, 0),
            _nearness(joiner, c),
            -bandwidth_bps.get(c.replica_id, 0.0),
            -(c.step or 0),
            c.replica_id,  # deterministic among equals
        ),
    )
    return candidates[: max(1, max_donors)]


def choose_donor(
    joiner: ReplicaView,
    replicas: Collection[ReplicaView],
    *,
    inflight: Mapping[str, int] | None = None,
    bandwidth_bps: Mapping[str, float] | None = None,
    exclude: Collection[str] = (),
    step_slack: int = 0,
) -> ReplicaView | None:
    """The best donor for ``joiner``, or ``None`` if no replica can donate
    (see :func:`choose_donors`)."""
    best = choose_donors(
        joiner,
        replicas,
        inflight=inflight,
        bandwidth_bps=bandwidth_bps,
        exclude=exclude,
        step_slack=step_slack,
    )
    return best[0] if best else None


def shares(donors: Sequence[str], bandwidth_bps: Mapping[str, float]) -> list[float]:
    """Each donor's part of the bytes, by the bandwidth seen from it; they sum to 1.

    A donor not measured yet counts as the median of the measured ones (all
    equal when none was). Donors that would get under :data:`MIN_SHARE` are
    given 0 (the caller leaves them out); the best donor (the first) always
    keeps a share.
    """

    def rate(d: str) -> float:  # a bandwidth that is no positive finite number: not measured
        b = bandwidth_bps.get(d, 0.0)
        return b if math.isfinite(b) and b > 0 else 0.0

    seen = [b for d in donors if (b := rate(d)) > 0]
    default = statistics.median(seen) if seen else 1.0
    weights = [rate(d) or default for d in donors]
    top = max(weights)
    weights = [w / top for w in weights]  # in (0, 1]: their sum cannot overflow
    while True:
        total = sum(weights)
        out = [w / total for w in weights]
        small = [k for k, v in enumerate(out) if 0 < v < MIN_SHARE and k > 0]
        if not small:
            return out
        weights[min(small, key=lambda k: out[k])] = 0.0


def make_plan(
    plan_id: int,
    joiner: ReplicaView,
    donors: Sequence[ReplicaView],
    *,
    bandwidth_bps: Mapping[str, float] | None = None,
) -> RecoveryPlan:
    """A plan for every rank r of each donor to send its part to rank r of ``joiner``.

    Args:
        plan_id: the new plan's id.
        joiner: the receiving replica.
        donors: eligible donors, the best first (see :func:`choose_donors`).
        bandwidth_bps: the bandwidth seen from each replica (sizes the shares).
    """
    parts = shares([d.replica_id for d in donors], bandwidth_bps or {})
    return RecoveryPlan(
        plan_id=plan_id,
        joiner=joiner.replica_id,
        stripes=[
            Stripe(
                donor=d.replica_id,
                share=share,
                pairs=[
                    RankPair(group_rank=r, donor_rendezvous=d.ranks[r].rendezvous)
                    for r in range(d.world_size)
                ],
            )
            for d, share in zip(donors, parts, strict=True)
            if share > 0
        ],
    )


def fence(acked_steps: Collection[int], fence_steps: int) -> int:
    """The step boundary every donor rank sends at.

    Each donor rank acknowledged the last step boundary it passed; ranks of
    one replica advance in lockstep (their collectives hold the fast ones
    back), so ``fence_steps`` boundaries past the furthest rank leave each
    rank time to hear the fence before it reaches it. A rank that is already
    past it sends its own step and the joiner refuses it (the plan is then
    re-fenced wider), so a wrong guess costs a retry, never a mixed state.

    Args:
        acked_steps: the step each donor rank acknowledged.
        fence_steps: how many boundaries ahead of the furthest rank (0 when
            every donor rank is parked and serves at its current step).
    """
    return max(acked_steps) + fence_steps


def fence_ahead(
    fence_steps: int, *, step_time_s: float, fence_time: timedelta, max_fence_steps: int
) -> int:
    """How many step boundaries past the furthest donor rank a plan is fenced.

    At least ``fence_steps``, and at least ``fence_time`` of training at the
    donor ranks' slowest reported step time (fast steps get more steps of
    margin: the ARM order must arrive before the boundary), at most
    ``max_fence_steps``.

    Args:
        fence_steps: the round's fence (doubled after each overshoot).
        step_time_s: the slowest donor rank's recent seconds per step (0: unknown).
        fence_time: the least training time between the fence and the furthest rank.
        max_fence_steps: the upper bound.
    """
    if step_time_s <= 0:
        return fence_steps
    by_time = math.ceil(fence_time.total_seconds() / step_time_s)
    return max(fence_steps, min(by_time, max_fence_steps))


def why_no_donor(
    joiner: ReplicaView,
    replicas: Mapping[str, ReplicaView],
    *,
    excluded: Collection[str],
    last_failure: str,
    stepped: Collection[str],
) -> tuple[bool, str]:
    """Whether a joiner without a donor simply starts fresh, and why, in words.

    Fresh means nothing was lost: no other replica holds a step, and none of
    the joiner's layout held one (``stepped``: the layout fingerprints seen
    holding a step since the coordinator started). Anything else (a layout or
    world size that matches no replica holding state, donors unhealthy or
    failing, a whole job restarted) is a replica that could not get state
    that existed: ``no_donor``.

    Args:
        joiner: the replica asking.
        replicas: every registered replica, the joiner included.
        excluded: donors that failed this round.
        last_failure: why the last plan of the round failed.
        stepped: layout fingerprints that held a step.
    """
    others = [v for v in replicas.values() if v.replica_id != joiner.replica_id]
    holding = [v for v in others if v.step is not None]
    if excluded:
        return False, (
            f"every donor failed this recovery ({', '.join(sorted(excluded))}); "
            f"the last failure: {last_failure}"
        )
    same = [v for v in others if layouts_match(joiner, v)]
    with_state = [v for v in same if v.step is not None]
    if not with_state:
        if holding:
            return False, (
                f"{len(holding)} other replica(s) hold a step, none with this state layout "
                "(a different model, optimizer, sharding or dtypes)"
            )
        if joiner.fingerprint in stepped:
            return False, (
                "no replica holds a step of this layout any more, though some did: "
                "the live state is gone (the whole job restarted?)"
            )
        if not others:
            return True, "no other replica is registered: this is the first replica"
        return True, f"{len(others)} other replica(s), none holding a step yet"
    why = []
    for v in sorted(with_state, key=lambda v: v.replica_id):
        if v.world_size != joiner.world_size:
            why.append(f"{v.replica_id} has {v.world_size} ranks, this replica {joiner.world_size}")
        elif not v.healthy:
            why.append(f"{v.replica_id} is unhealthy")
        elif not eligible(joiner, v):
            why.append(f"{v.replica_id} cannot donate")
    return False, f"no replica can donate: {'; '.join(why)}"
