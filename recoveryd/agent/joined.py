"""A plan a joiner rank joined: its group with each donor rank, and the wait for the fence.

A plan with one donor gives the rank one group; a striped plan one group per
donor, formed in parallel. The wait for the fence ends when every donor still
in the plan has set its go key. A donor whose store stops answering (it
died), or that the coordinator no longer lists (it was lost: unhealthy, or
it failed), leaves the wait, and is told so when it can still hear it; the
donors left send its part. Only when none is left does the wait fail.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import torch.distributed as dist

from recoveryd._threads import each
from recoveryd._time import Deadline
from recoveryd.agent.rendezvous import (
    JOINER_RANK,
    bounded,
    connect_store,
    dropped_key,
    open_group,
    proof,
    read_go,
)
from recoveryd.protocol import Answer, StripeSource

logger = logging.getLogger(__name__)

_GO_POLL_MAX = timedelta(milliseconds=20)
"""The longest pause between two looks at the donors' go keys (they start at 1 ms)."""
_SAY_DROPPED = timedelta(seconds=2)
"""How long telling a donor's store that this rank dropped a plan may take."""


class FenceWait(enum.Enum):
    """How the wait for the donors to reach the fence ended."""

    REACHED = "reached"
    """Every donor left set its go key: they send now."""
    DONOR_UNREACHABLE = "donor_unreachable"
    """Every donor's store stopped answering, or was dropped (the donors died)."""
    PLAN_ENDED = "plan_ended"
    """The coordinator ended or replaced the plan."""
    OUT_OF_TIME = "out_of_time"
    """The round's deadline passed first."""


@dataclass(slots=True)
class Part:
    """This rank's group with one donor rank of the plan."""

    source: StripeSource
    group: dist.ProcessGroup
    store: dist.Store
    ready: bool = False
    """The donor rank set its go key."""
    gone: str = ""
    """Why the donor left the plan ("": it is in it)."""
    mute: bool = False
    """Its store did not answer a look: it is never used again (see
    :func:`~recoveryd.agent.rendezvous.bounded`)."""


@dataclass(slots=True)
class Joined:
    """The plan this rank joined: its id, key, and its part with each donor."""

    plan_id: int
    key: bytes = field(repr=False)
    """The plan's key (its control values on the stores are proofs under it)."""
    parts: list[Part]
    at: float
    """When the groups formed (monotonic)."""

    @property
    def live(self) -> list[Part]:
        """The parts whose donor is still in the plan."""
        return [p for p in self.parts if not p.gone]

    def drop(
        self, part: Part, why: str, graveyard: deque[dist.ProcessGroup], *, tell: bool
    ) -> None:
        """Takes a donor out of this rank's plan (``tell``: say so on its store first,
        so it does not hold its trainer, or start sending, for a joiner that is gone)."""
        if part.gone:
            return
        part.gone = why
        if tell and not part.mute:
            prefix = part.source.rendezvous_prefix
            try:
                part.store.set_timeout(_SAY_DROPPED)
                part.store.set(dropped_key(prefix), proof(self.key, "dropped", prefix))
            except RuntimeError as err:  # the donor's store is gone: nothing waits there
                logger.debug("could not tell plan %d's donor: %s", self.plan_id, err)
        graveyard.append(part.group)  # a late peer may still write into its buffers


class FormError(RuntimeError):
    """Forming the group with one donor failed (``donor``, and the error as ``__cause__``)."""

    def __init__(self, donor: str, err: BaseException) -> None:
        super().__init__(f"{donor!r}: {err}")
        self.donor = donor


def form(
    ans: Answer,
    *,
    host: str,
    within: timedelta,
    timeout: timedelta,
    graveyard: deque[dist.ProcessGroup],
) -> list[Part]:
    """Forms the plan's group with each of its donor ranks, in parallel.

    Args:
        ans: the ``transfer`` answer naming the donors.
        host: the local address Gloo listens on.
        within: the bound on connecting and forming (each donor's store
            client waits for answers with no deadline of its own).
        timeout: the groups' own timeout (the transfer's).
        graveyard: where the groups formed go when another one failed.

    Raises:
        FormError: a donor's group could not be formed (the others are dropped).
    """
    sources = ans.sources()

    def one(src: StripeSource) -> Part:
        def make() -> tuple[dist.Store, dist.ProcessGroup]:
            store = connect_store(src.rendezvous, timeout=within)
            group = open_group(
                store, src.rendezvous_prefix, JOINER_RANK, backend=ans.backend,
                host=host, timeout=timeout,
            )  # fmt: skip
            return store, group

        store, group = bounded(make, within, f"forming the plan's group on {src.donor!r}'s store")
        return Part(source=src, group=group, store=store)

    made = each([lambda src=src: one(src) for src in sources], "recoveryd-form")  # type: ignore[misc]
    parts = [p for p, _ in made if p is not None]
    for src, (_, err) in zip(sources, made, strict=True):
        if err is not None:
            joined = Joined(plan_id=ans.plan_id, key=ans.plan_key, parts=parts, at=0.0)
            for p in parts:
                joined.drop(p, "another donor's group failed", graveyard, tell=True)
            raise FormError(src.donor, err) from err
    return parts


def await_go(
    joined: Joined,
    *,
    deadline: Deadline,
    silence: timedelta,
    still_listed: Callable[[], set[str] | str],
    ask_every: timedelta,
    graveyard: deque[dist.ProcessGroup],
    who: str,
) -> tuple[FenceWait, str]:
    """Waits for every donor left in ``joined`` to reach the fence; returns how that
    ended, and why.

    Polls each donor's store (a dead donor fails the poll at once; a silent
    one within ``silence``) and, every ``ask_every``, the coordinator
    through ``still_listed``: the donors it still lists for this plan, or
    why the plan ended (it failed, or was replaced). Donors dropped on the
    way are marked ``gone``.
    """
    asked = time.monotonic()
    nap = timedelta(milliseconds=1)
    forged: set[str] = set()
    while not deadline.expired:
        for part in joined.live:
            if part.ready:
                continue
            name = part.source.donor
            try:
                go = read_go(part.store, part.source.rendezvous_prefix, joined.key, timeout=silence)
            except RuntimeError as err:
                logger.warning("%s: plan %d: donor %r unreachable before the fence: %s",
                               who, joined.plan_id, name, err)  # fmt: skip
                part.mute = True
                joined.drop(part, f"unreachable before the fence: {err}", graveyard, tell=False)
                continue
            if go == "set":
                part.ready = True
            elif go == "forged" and name not in forged:  # the donor's own go overwrites it
                forged.add(name)
                logger.warning(
                    "%s: plan %d: a go key donor %r did not write, ignored (someone who "
                    "reaches its store tried to start the receive early)",
                    who, joined.plan_id, name,
                )  # fmt: skip
        live = joined.live
        if not live:
            why = "; ".join(f"{p.source.donor!r} {p.gone}" for p in joined.parts)
            return FenceWait.DONOR_UNREACHABLE, f"every donor rank left before the fence: {why}"
        if all(p.ready for p in live):
            return FenceWait.REACHED, ""
        if time.monotonic() - asked >= ask_every.total_seconds():
            asked = time.monotonic()
            listed = still_listed()
            if isinstance(listed, str):
                return FenceWait.PLAN_ENDED, listed
            for part in live:
                if part.source.donor not in listed:
                    logger.info("%s: plan %d: the coordinator lost donor %r; the others send "
                                "its part", who, joined.plan_id, part.source.donor)  # fmt: skip
                    joined.drop(part, "lost by the coordinator", graveyard, tell=True)
        deadline.sleep(nap)
        nap = min(2 * nap, _GO_POLL_MAX)
    return (
        FenceWait.OUT_OF_TIME,
        "the recovery's deadline passed before the donor reached the fence",
    )
