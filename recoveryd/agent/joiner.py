"""The joiner side of an agent: ask for a plan, join the donor's group, receive in place.

:func:`recover_into` loops on the coordinator's long poll until the replica's
round ends: ``no_donor`` (returns ``None``), ``done`` (returns the step every
rank of the replica now holds), or the deadline. In between it joins each
plan it is handed and receives, demanding the plan's fenced step; a failed
plan is reported and the next one is tried.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from recoveryd.agent.link import MAX_BACKOFF_S, CoordinatorLink, result_of
from recoveryd.agent.rendezvous import (
    DONOR_RANK,
    JOINER_RANK,
    connect_store,
    device_for,
    go_key,
    open_group,
)
from recoveryd.errors import (
    CoordinatorUnavailableError,
    TransferError,
    TransferTimeoutError,
    UnknownMemberError,
)
from recoveryd.metrics import AgentMetrics
from recoveryd.status import human_bytes
from recoveryd.transport import recv_state_dict

logger = logging.getLogger(__name__)

_LONG_POLL = timedelta(seconds=2)


@dataclass(slots=True)
class RecoveryRecord:
    """How one :meth:`Agent.recover` went, for logs and timelines.

    Attributes:
        outcome: ``recovered``, ``fresh`` (nothing of this layout ever held a
            step: a job's start) or ``no_donor`` (state existed but could not be had).
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
            and ``confirm`` (until every rank of the replica had its state).
        reason: why there was no donor.
        state_written: whether any transfer wrote into the state. After a
            ``no_donor`` with this set (plans failed midway), the state is
            partly overwritten: initialise it again or load a checkpoint.
    """

    outcome: str
    step: int | None = None
    donor: str = ""
    plan_id: int = 0
    attempts: int = 0
    bytes: int = 0
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    state_written: bool = False


def merge_values(dst: object, src: object) -> object:
    """Writes ``src``'s non-tensor values into ``dst``'s containers; returns the merged node.

    In place, tensors already hold the received bytes (``src`` has ``dst``'s
    tensor objects); plain values (ints, floats, strings, ...) are replaced in
    mutable containers, and tuples holding any are rebuilt in their parent.
    """
    if isinstance(src, torch.Tensor):
        return dst
    if isinstance(src, Mapping) and isinstance(dst, MutableMapping):
        for k, v in src.items():
            merged = merge_values(dst.get(k), v)
            if merged is not dst.get(k):
                dst[k] = merged
        return dst
    if isinstance(src, list) and isinstance(dst, list) and len(src) == len(dst):
        for i, v in enumerate(src):
            merged = merge_values(dst[i], v)
            if merged is not dst[i]:
                dst[i] = merged
        return dst
    if isinstance(src, tuple) and isinstance(dst, tuple) and len(src) == len(dst):
        items = [merge_values(d, v) for d, v in zip(dst, src, strict=True)]
        return dst if all(a is b for a, b in zip(items, dst, strict=True)) else type(dst)(items)
    return src


def _await_go(
    link: CoordinatorLink,
    store: dist.Store,
    prefix: str,
    plan_id: int,
    received: int,
    deadline: float,
) -> str | None:
    """Waits for the donor rank to reach the fence; returns why not, or ``None`` when it did.

    Polls the donor's store (a dead donor fails the poll at once) and, every
    second, the coordinator (a plan that failed or was replaced is dropped).
    """
    config = link.config
    key = go_key(prefix)
    asked = time.monotonic()
    nap = 0.001
    while time.monotonic() < deadline:
        try:
            if store.check([key]):
                return None
        except RuntimeError as err:
            return f"donor rank unreachable before the fence: {err}"
        if time.monotonic() - asked >= 1.0:
            asked = time.monotonic()
            try:
                now = link.client.recover(
                    config.replica_id,
                    config.group_rank,
                    wait=timedelta(0),
                    received_plan_id=received,
                    joined_plan_id=plan_id,
                )
            except (CoordinatorUnavailableError, UnknownMemberError):
                continue  # keep waiting on the donor; the coordinator is not needed for this
            if now.state != "transfer" or now.plan_id != plan_id:
                return f"the coordinator ended the plan ({now.state} {now.reason})".strip()
        time.sleep(nap)
        nap = min(2 * nap, 0.02)
    return "the recovery's deadline passed before the donor reached the fence"


def recover_into(
    link: CoordinatorLink,
    state_dict: object,
    *,
    host: str,
    graveyard: deque[dist.ProcessGroup],
    timeout: timedelta,
    record: RecoveryRecord,
    metrics: AgentMetrics | None = None,
) -> int | None:
    """Runs this rank's part of its replica's recovery round (see :meth:`Agent.recover`).

    ``record`` is filled in as the round goes.
    """
    config = link.config
    start = time.monotonic()
    deadline = start + timeout.total_seconds()
    received = joined = 0
    group: dist.ProcessGroup | None = None
    store: dist.Store | None = None
    received_at: float | None = None
    joined_at = start
    backoff = 0.05
    last_answer = "none yet"
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            if last_answer == "none yet":
                raise CoordinatorUnavailableError(
                    config.coordinator, f"{link.who} got no answer within {timeout}"
                )
            raise TransferTimeoutError(
                f"{link.who}: no recovery within {timeout} (last answer: {last_answer})"
            )
        if not link.registered.wait(min(left, 0.5)):
            continue
        try:
            ans = link.client.recover(
                config.replica_id,
                config.group_rank,
                wait=min(_LONG_POLL, timedelta(seconds=left)),
                received_plan_id=received,
                joined_plan_id=joined,
            )
        except UnknownMemberError:
            link.reregister()
            continue
        except CoordinatorUnavailableError:
            if time.monotonic() + backoff >= deadline:
                raise
            time.sleep(backoff)
            backoff = min(2 * backoff, MAX_BACKOFF_S)
            continue
        backoff = 0.05
        last_answer = f"{ans.state} {ans.reason}".strip()
        if ans.state == "no_donor":
            record.outcome, record.reason = "fresh" if ans.fresh else "no_donor", ans.reason
            record.seconds = time.monotonic() - start
            logger.info("%s: nothing to recover from: %s", link.who, ans.reason)
            return None
        if ans.state == "done":
            assert ans.step is not None
            now = time.monotonic()
            record.phases["confirm"] = now - (received_at or now)
            record.outcome, record.step, record.seconds = "recovered", ans.step, now - start
            logger.info(
                "%s: recovered step %d from %r in %.3f s (%d bytes, %d plan(s))",
                link.who,
                ans.step,
                record.donor,
                record.seconds,
                record.bytes,
                record.attempts,
            )
            return ans.step
        if ans.state != "transfer":
            continue
        if ans.plan_id != joined:
            if group is not None:
                graveyard.append(group)
            group, store, joined = None, None, 0
            record.attempts += 1
            record.phases.setdefault("plan", time.monotonic() - start)
            t0 = time.monotonic()
            try:
                store = connect_store(
                    ans.rendezvous, timeout=min(config.rendezvous_timeout, timedelta(seconds=left))
                )
                group = open_group(
                    store,
                    ans.rendezvous_prefix,
                    JOINER_RANK,
                    backend=ans.backend,
                    host=host,
                    timeout=timedelta(seconds=min(ans.timeout_s or left, left)),
                )
            except Exception as err:  # the donor went away before the group formed
                link.report(
                    ans.plan_id,
                    "joiner",
                    result_of(err),
                    started=t0,
                    message=f"rendezvous: {err}",
                    wait=True,
                    deadline=deadline,
                )
                store = None
                continue
            joined = ans.plan_id
            joined_at = time.monotonic()
            record.phases["rendezvous"] = joined_at - t0
        if ans.step is None or group is None or store is None:
            continue  # the long poll holds us until the plan is armed
        t_fence = time.monotonic()
        record.phases["arm"] = t_fence - joined_at
        gone = _await_go(link, store, ans.rendezvous_prefix, joined, received, deadline)
        if gone is not None:
            if gone.startswith("donor"):
                link.report(
                    joined,
                    "joiner",
                    "peer_lost",
                    started=t_fence,
                    message=gone,
                    step=ans.step,
                    wait=True,
                    deadline=deadline,
                )
            logger.info("%s: plan %d from %r dropped: %s", link.who, joined, ans.donor, gone)
            graveyard.append(group)
            group, store, joined = None, None, 0
            continue
        record.phases["fence"] = time.monotonic() - t_fence
        t0 = time.monotonic()
        record.state_written = True  # from here on, a failure may leave it half written
        try:
            got = recv_state_dict(
                group,
                DONOR_RANK,
                timeout=timedelta(seconds=max(0.001, min(ans.timeout_s or left, deadline - t0))),
                into=state_dict,
                step=ans.step,
                config=config.transfer,
                device=device_for(ans.backend),
            )
        except TransferError as err:
            if metrics is not None:
                metrics.transfer(
                    "joiner", ans.backend, result_of(err), seconds=time.monotonic() - t0
                )
            logger.warning("%s: plan %d from %r failed: %s", link.who, ans.plan_id, ans.donor, err)
            link.report(
                ans.plan_id,
                "joiner",
                result_of(err),
                started=t0,
                message=str(err),
                step=ans.step,
                wait=True,
                deadline=deadline,
            )
            graveyard.append(group)
            group, joined = None, 0
            continue
        merge_values(state_dict, got.state_dict)
        st = got.stats
        if metrics is not None:
            metrics.transfer(
                "joiner",
                ans.backend,
                "ok",
                seconds=st.seconds,
                nbytes=st.payload_bytes,
                phases=st.phases,
            )
        record.phases.update(st.phases)
        record.donor, record.plan_id, record.bytes = ans.donor, ans.plan_id, st.payload_bytes
        logger.info(
            "%s: received step %d from %r (plan %d) over %s (%s) <- %s: %d bytes in %.3f s, %s/s",
            link.who,
            ans.step,
            ans.donor,
            ans.plan_id,
            link.interface or "?",
            host,
            ans.rendezvous,
            st.payload_bytes,
            st.seconds,
            human_bytes(st.payload_bytes / st.seconds if st.seconds > 0 else 0),
        )
        reported = time.monotonic()
        link.report(
            ans.plan_id,
            "joiner",
            "ok",
            started=t0,
            step=ans.step,
            nbytes=st.payload_bytes,
            phases=dict(record.phases),  # plan, rendezvous, arm, fence, then the transport's
            wait=True,
            deadline=deadline,
        )
        received, received_at = ans.plan_id, time.monotonic()
        record.phases["report"] = received_at - reported
        group = None  # done with it; Gloo tears it down
