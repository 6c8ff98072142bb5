"""The joiner side of an agent: ask for a plan, join the donor's group, receive in place.

One call of :meth:`Agent.recover` is one :class:`JoinerRound`: it asks the
coordinator (a long poll) until the replica's round ends with ``no_donor``
(returns ``None``) or ``done`` (returns the step every rank of the replica
now holds), or the deadline passes. In between, each plan it is handed moves
it through three named phases: it *joins* the plan's transfer group, waits
for the plan to be armed and the donor to reach the fence, *receives* in
place (demanding the fenced step) and reports; then it waits for every rank
of the replica to have received. A failed plan is reported and the round
asks for the next one. A striped plan names several donors: the rank joins a
group with each (:mod:`recoveryd.agent.joined`) and receives a disjoint part
of its state from each, in parallel; a donor lost on the way costs only its
part, which the others send.
"""

from __future__ import annotations

import enum
import functools
import logging
import time
from collections import deque
from datetime import timedelta

import torch.distributed as dist

from recoveryd._format import rate
from recoveryd._time import MIN_WAIT, Backoff, Deadline
from recoveryd.agent.interface import RecoveryRecord
from recoveryd.agent.joined import FenceWait, FormError, Joined, Part, await_go, form
from recoveryd.agent.link import CoordinatorLink
from recoveryd.agent.liveness import StoreWatch
from recoveryd.agent.rendezvous import DONOR_RANK, device_for, go_key
from recoveryd.errors import (
    CoordinatorUnavailableError,
    DonorsDisagreeError,
    ManifestError,
    StateMismatchError,
    StepMismatchError,
    TransferError,
    TransferTimeoutError,
    UnknownMemberError,
    UntrustedPeerError,
)
from recoveryd.metrics import AgentMetrics
from recoveryd.protocol import Answer, result_of
from recoveryd.transport import recv_state_dict
from recoveryd.transport.stats import ReceivedState
from recoveryd.transport.striped import recv_state_dict_striped
from recoveryd.transport.tree import merge_values

logger = logging.getLogger(__name__)

_LONG_POLL = timedelta(seconds=2)
"""How long the coordinator may hold one ask for news."""
_ASK_EVERY = timedelta(seconds=1)
"""While waiting for the donor's go, how often the coordinator is asked whether the plan lives."""
_REFUSED_BEFORE_DATA = (
    UntrustedPeerError,
    ManifestError,
    StateMismatchError,
    StepMismatchError,
    DonorsDisagreeError,
)
"""Failures of a receive that wrote nothing into the state (the transport refuses
these before any data)."""


class Phase(enum.Enum):
    """Where this rank is in its round."""

    ASKING = "asking"
    """In no plan: asking the coordinator for one."""
    JOINED = "joined"
    """In a plan's transfer group, waiting for it to be armed."""
    RECEIVED = "received"
    """Holds a plan's state and reported it: waiting for every rank of the replica."""


class JoinerRound:
    """One rank's part of its replica's recovery round (see :meth:`Agent.recover`).

    Args:
        link: the rank's link to the coordinator.
        state_dict: the state to receive into, in place.
        host: the local address transfers listen on.
        graveyard: where groups of failed transfers are kept (a late peer may
            still write into their buffers).
        timeout: deadline for the whole round.
        record: filled in as the round goes.
        metrics: the agent's metrics, if any.
    """

    def __init__(
        self,
        link: CoordinatorLink,
        state_dict: object,
        *,
        host: str,
        graveyard: deque[dist.ProcessGroup],
        timeout: timedelta,
        record: RecoveryRecord,
        metrics: AgentMetrics | None = None,
    ) -> None:
        self._link = link
        self._state = state_dict
        self._host = host
        self._graveyard = graveyard
        self._timeout = timeout
        self._record = record
        self._metrics = metrics
        self._start = time.monotonic()
        self._deadline = Deadline(timeout)
        self.phase = Phase.ASKING
        self._joined: Joined | None = None
        self._received = 0
        """The plan whose state this rank holds (0: none)."""
        self._received_at = 0.0
        self._backoff = Backoff()
        self._last_answer: str | None = None
        # Every report of this rank's side, made now and retried until the round's deadline.
        self._report = functools.partial(link.report, role="joiner", until=self._deadline)

    @property
    def _joined_id(self) -> int:
        return self._joined.plan_id if self._joined is not None else 0

    def run(self) -> int | None:
        """Runs the round to its end.

        Returns:
            The step every rank of the replica holds, or ``None`` when there
            is no donor (``record.outcome`` says whether that is a fresh start).

        Raises:
            CoordinatorUnavailableError: the coordinator never answered in time.
            AuthenticationError: the coordinator refuses this agent's credentials.
            TransferTimeoutError: it answered, but no plan finished in time.
        """
        try:
            while True:
                ans = self._ask()
                if ans is None:
                    continue
                if ans.state == "no_donor":
                    self._no_donor(ans)
                    return None
                if ans.state == "done":
                    return self._done(ans)
                if ans.state != "transfer":
                    continue
                if ans.plan_id != self._joined_id:
                    self._join(ans)
                if self.phase is Phase.JOINED and ans.step is not None:
                    self._receive(ans)
        finally:
            if self.phase is Phase.JOINED:
                self._leave()  # a round that gives up says so to the donor it joined

    # ---- asking -----------------------------------------------------------------

    def _ask(self) -> Answer | None:
        """The coordinator's next answer, or ``None`` to ask again."""
        link, config = self._link, self._link.config
        if self._deadline.expired:
            if self._last_answer is None:
                raise CoordinatorUnavailableError(
                    config.coordinator, f"{link.who} got no answer within {self._timeout}"
                )
            raise TransferTimeoutError(
                f"{link.who}: no recovery within {self._timeout} (last answer: {self._last_answer})"
            )
        if not self._deadline.wait(link.registered, timedelta(seconds=0.5)):
            if link.refused is not None:
                raise link.refused  # no credentials of this job: waiting would not help
            return None
        try:
            ans = link.client.recover(
                config.replica_id,
                config.group_rank,
                wait=self._deadline.cap(_LONG_POLL),
                received_plan_id=self._received,
                joined_plan_id=self._joined_id,
            )
        except UnknownMemberError:
            link.reregister()
            return None
        except CoordinatorUnavailableError:
            nap = self._backoff.next()
            if self._deadline.remaining() <= nap:
                raise
            self._deadline.sleep(nap)
            return None
        self._backoff.reset()
        self._last_answer = f"{ans.state} {ans.reason}".strip()
        return ans

    def _no_donor(self, ans: Answer) -> None:
        record = self._record
        record.outcome = "fresh" if ans.fresh else "no_donor"
        record.reason = ans.reason
        record.seconds = time.monotonic() - self._start
        logger.info("%s: nothing to recover from: %s", self._link.who, ans.reason)

    def _done(self, ans: Answer) -> int:
        assert ans.step is not None
        record = self._record
        now = time.monotonic()
        record.phases["confirm"] = now - (self._received_at or now)
        record.outcome, record.step, record.seconds = "recovered", ans.step, now - self._start
        logger.info(
            "%s: recovered step %d from %r in %.3f s (%d bytes, %d plan(s))",
            self._link.who,
            ans.step,
            record.donor,
            record.seconds,
            record.bytes,
            record.attempts,
        )
        return ans.step

    # ---- joining ----------------------------------------------------------------

    def _join(self, ans: Answer) -> None:
        """Forms a new plan's transfer group with each donor rank (leaving the old plan)."""
        self._leave()
        record = self._record
        record.attempts += 1
        record.phases.setdefault("plan", time.monotonic() - self._start)
        t0 = time.monotonic()
        try:
            parts = form(
                ans,
                host=self._host,
                within=self._deadline.cap(self._link.config.rendezvous_timeout),
                timeout=self._transfer_timeout(ans),
                graveyard=self._graveyard,
            )
        except FormError as err:  # a donor went away before its group formed
            cause = err.__cause__ if err.__cause__ is not None else err
            self._report(
                ans.plan_id,
                result_of(cause),
                started=t0,
                message=f"rendezvous with {err}",
                blame=err.donor if ans.stripes else "",
            )
            return
        self._joined = Joined(ans.plan_id, ans.plan_key, parts, time.monotonic())
        self.phase = Phase.JOINED
        record.phases["rendezvous"] = self._joined.at - t0

    def _leave(self, *, tell: bool = True) -> None:
        """Drops the plan this rank is in; its groups are kept for late writes.

        A plan dropped before its data arrived is said on each donor's store
        first (``tell``), so no donor rank holds its trainer for a joiner
        that is gone.
        """
        joined = self._joined
        if joined is not None:
            for part in joined.parts:
                joined.drop(part, "left", self._graveyard, tell=tell and self.phase is Phase.JOINED)
        self._joined = None
        self.phase = Phase.ASKING

    def _transfer_timeout(self, ans: Answer) -> timedelta:
        """The plan's own timeout, within what is left of the round."""
        left = self._deadline.remaining()
        return min(timedelta(seconds=ans.timeout_s), left) if ans.timeout_s else left

    # ---- receiving --------------------------------------------------------------

    def _receive(self, ans: Answer) -> None:
        """Waits for the donors to reach the armed plan's fence, then receives in place."""
        joined, record, link = self._joined, self._record, self._link
        assert joined is not None
        assert ans.step is not None
        t_fence = time.monotonic()
        record.phases["arm"] = t_fence - joined.at
        listed = {s.donor for s in ans.sources()}
        for part in joined.live:  # donors of a striped plan lost since this rank joined
            if part.source.donor not in listed:
                joined.drop(part, "lost by the coordinator", self._graveyard, tell=True)
        outcome, why = await_go(
            joined,
            deadline=self._deadline,
            # A donor's store answers in milliseconds; this long without an answer is a dead link.
            silence=link.config.transfer.stall_timeout,
            still_listed=functools.partial(self._listed, joined),
            ask_every=_ASK_EVERY,
            graveyard=self._graveyard,
            who=link.who,
        )
        if outcome is not FenceWait.REACHED:
            if outcome is FenceWait.DONOR_UNREACHABLE:
                self._report(
                    joined.plan_id, "peer_lost", started=t_fence, message=why, step=ans.step
                )
            logger.info("%s: plan %d from %r dropped: %s", link.who, joined.plan_id, ans.donor, why)
            self._leave(tell=outcome is not FenceWait.DONOR_UNREACHABLE)
            return
        record.phases["fence"] = time.monotonic() - t_fence
        parts = joined.live
        donors = ",".join(p.source.donor for p in parts)
        named = ", ".join(repr(p.source.donor) for p in parts)  # as logs name one donor
        t0 = time.monotonic()
        written_before = record.state_written
        record.state_written = True  # from here on, a failure may leave it half written
        try:
            got = self._pull(ans, parts)
        except TransferError as err:
            if isinstance(err, _REFUSED_BEFORE_DATA):
                record.state_written = written_before  # refused before a byte was written
            if self._metrics is not None:
                self._metrics.transfer(
                    "joiner", ans.backend, result_of(err), seconds=time.monotonic() - t0
                )
            logger.warning("%s: plan %d from %s failed: %s", link.who, ans.plan_id, named, err)
            # A striped plan's failure names its donor (the one left, if one is).
            k = 0 if len(parts) == 1 else err.donor_index
            named_one = bool(ans.stripes) and k is not None and 0 <= k < len(parts)
            blame = parts[k].source.donor if named_one and k is not None else ""
            self._report(
                ans.plan_id,
                result_of(err),
                started=t0,
                message=str(err),
                step=ans.step,
                blame=blame,
            )
            self._leave()
            return
        merge_values(self._state, got.state_dict)
        st = got.stats
        if self._metrics is not None:
            self._metrics.transfer(
                "joiner",
                ans.backend,
                "ok",
                seconds=st.seconds,
                nbytes=st.payload_bytes,
                phases=st.phases,
            )
        record.phases.update(st.phases)
        record.donor, record.plan_id, record.bytes = donors, ans.plan_id, st.payload_bytes
        logger.info(
            "%s: received step %d from %s (plan %d) over %s (%s) <- %s: %d bytes in %.3f s, %s",
            link.who,
            ans.step,
            named,
            ans.plan_id,
            link.interface or "?",
            self._host,
            ",".join(p.source.rendezvous for p in parts),
            st.payload_bytes,
            st.seconds,
            rate(st.payload_bytes, st.seconds),
        )
        reported = time.monotonic()
        self._report(
            ans.plan_id,
            "ok",
            started=t0,
            step=ans.step,
            nbytes=st.payload_bytes,
            phases=dict(record.phases),  # plan, rendezvous, arm, fence, then the transport's
        )
        self._received, self._received_at = ans.plan_id, time.monotonic()
        record.phases["report"] = self._received_at - reported
        if len(parts) > 1:  # a donor that failed midway left buffers parked on its group
            self._graveyard.extend(p.group for p in parts)
        joined.parts = []  # done with the groups; Gloo tears down what is not kept
        self.phase = Phase.RECEIVED

    def _pull(self, ans: Answer, parts: list[Part]) -> ReceivedState:
        """The state from the donors left: all of it from one, or a part from each."""
        config = self._link.config.transfer
        timeout = max(MIN_WAIT, self._transfer_timeout(ans))
        key = ans.plan_key or None
        if len(parts) == 1:
            return recv_state_dict(
                parts[0].group,
                DONOR_RANK,
                timeout=timeout,
                into=self._state,
                step=ans.step,
                config=config,
                device=device_for(ans.backend),
                auth_key=key,
            )
        # A donor that dies midway is seen through its store at once (its part then
        # comes from the others), not after the stall bound.
        watches = [
            StoreWatch(p.store, go_key(p.source.rendezvous_prefix), p.source.donor) for p in parts
        ]
        try:
            return recv_state_dict_striped(
                [(p.group, DONOR_RANK) for p in parts],
                timeout=timeout,
                into=self._state,
                step=ans.step,
                shares=[p.source.share for p in parts],
                config=config,
                auth_keys=[key] * len(parts),
                alive=watches,
            )
        finally:
            for part, watch in zip(parts, watches, strict=True):
                watch.close()
                part.mute = part.mute or watch.silent

    def _listed(self, joined: Joined) -> set[str] | str:
        """The donors the coordinator still lists for the plan this rank joined, or
        why the plan ended (see :func:`~recoveryd.agent.joined.await_go`)."""
        link, config = self._link, self._link.config
        try:
            now = link.client.recover(
                config.replica_id,
                config.group_rank,
                wait=timedelta(0),
                received_plan_id=self._received,
                joined_plan_id=joined.plan_id,
            )
        except (CoordinatorUnavailableError, UnknownMemberError):
            # Keep waiting on the donors; the coordinator is not needed for this.
            return {p.source.donor for p in joined.live}
        if now.state != "transfer" or now.plan_id != joined.plan_id:
            return f"the coordinator ended the plan ({now.state} {now.reason})".strip()
        return {s.donor for s in now.sources()}
