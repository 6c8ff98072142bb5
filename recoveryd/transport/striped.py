"""One joiner, several donors: each sends a disjoint stripe of the same state, in parallel.

In a data-parallel job every healthy replica holds the same state at a
step, so a joiner can pull one run of the messages from each of several
donors fenced at that step and get their links added together. Each donor
runs the ordinary :func:`~recoveryd.transport.sender.send_state_dict` on
its own group with the joiner; the joiner runs :func:`recv_state_dict_striped`
over all of them:

1. every donor proves the plan's key (when given) and offers its manifest;
2. the manifests must be identical (same step, same layout, same cutting
   into messages), else every donor is refused and nothing is written;
3. the joiner matches its state (or allocates) once, and asks each donor for
   its run of the messages, sized by ``shares``; each donor's go echoes it;
4. the runs stream in parallel, each into its own part of the joiner's
   tensors, each checked against its donor's trailer; the joiner says done
   to every donor only when all runs arrived.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch

from recoveryd._threads import each
from recoveryd._time import Deadline
from recoveryd.errors import (
    ConfigError,
    DonorsDisagreeError,
    IntegrityError,
    ManifestError,
    PeerLostError,
    RecoverydError,
    StateMismatchError,
    StepMismatchError,
    TransferError,
    TransferTimeoutError,
)
from recoveryd.transport import _auth
from recoveryd.transport import _handshake as hs
from recoveryd.transport import _stripes as stripes
from recoveryd.transport import _wire as w
from recoveryd.transport import format as f
from recoveryd.transport._gc import gc_paused
from recoveryd.transport._memory import Prefaulter
from recoveryd.transport._wire import Group
from recoveryd.transport.config import TransferConfig
from recoveryd.transport.receiver import _Into, _prepare, _stream
from recoveryd.transport.stats import PhaseClock, ReceivedState, TransferStats

logger = logging.getLogger(__name__)

MAX_DONORS = 16
"""Most donors one striped receive takes (one thread and one group each)."""


@gc_paused()
def recv_state_dict_striped(
    donors: Sequence[tuple[Group, int]],
    *,
    timeout: timedelta,
    into: object | None = None,
    step: int | None = None,
    shares: Sequence[float] | None = None,
    config: TransferConfig | None = None,
    auth_keys: Sequence[bytes | None] | None = None,
    resume: bool = True,
    alive: Sequence[Callable[[], bool]] | None = None,
) -> ReceivedState:
    """Receives one state from several donors, each sending a disjoint stripe of it.

    Args:
        donors: ``(group, donor rank)`` per donor; each group is this rank's
            own with that donor, which calls
            :func:`~recoveryd.transport.sender.send_state_dict` to this rank.
        timeout: deadline for the whole call.
        into: the joiner's state to receive into in place, or ``None`` to
            allocate (CPU).
        step: if given, the step every donor must be at.
        shares: each donor's share of the bytes (default equal); a slower
            donor gets a smaller one. A donor whose share comes to no message
            is told so and sends nothing.
        config: limits and timeouts; defaults from the environment.
        auth_keys: per donor, the plan key it must prove (``None``: no challenge).
        resume: when a donor fails midway, ask the donors that sent their stripes
            for its missing messages (split by their shares) before telling any
            of them done; ``False``: fail the receive.
        alive: per donor, a probe of whether it still lives, asked every 0.1 s
            while this rank waits on it; it must answer at once (read a flag
            another thread keeps, e.g. :class:`recoveryd.agent.liveness.StoreWatch`).
            ``False`` takes the donor as lost there and then (Gloo does not
            always wake a receive whose peer was SIGKILLed: without a probe,
            ``stall_timeout`` bounds that wait).

    Returns:
        The state, the step, and the counters (bytes and messages summed over
        the donors; ``seconds`` the whole call).

    Raises:
        StepMismatchError: the donors are not all at ``step``, or not at the
            same step (nothing written).
        StateMismatchError: the donors' manifests differ, or ``into`` does
            not match them (nothing written).
        ConfigError: no donors, too many, or shares that do not fit them.
        TransferError: a donor failed or vanished and no other could send its
            part; in place, the state may be partly overwritten and must not be used.
    """
    clock = PhaseClock()
    config = config or TransferConfig()
    n = len(donors)
    if not 1 <= n <= MAX_DONORS:
        raise ConfigError("donors", n, f"must be 1 to {MAX_DONORS}")
    keys_in = list(auth_keys) if auth_keys is not None else [None] * n
    if any(x is not None and len(x) != n for x in (shares, alive)) or len(keys_in) != n:
        raise ConfigError("auth_keys/shares/alive", n, "must have one entry per donor")
    for pg, src in donors:
        me = w.group_rank(pg)
        if src == me or not 0 <= src < pg.size():
            raise ConfigError("donors", src, f"must be another rank of its group (this is {me})")
    deadline = Deadline(timeout)
    wires = [w.Wire(pg, w.wire_device(pg, None), deadline) for pg, _ in donors]
    for wire, probe in zip(wires, alive or [], strict=False):
        wire.peer_gone = lambda probe=probe: not probe()
    srcs = [src for _, src in donors]
    into_ = _Into(into, torch.device("cpu"), None, None)
    cap = config.handshake_timeout

    def offer(k: int) -> tuple[hs.Offer, _auth.StreamKeys | None]:
        key, keys = keys_in[k], None
        demanded = config.data_macs and wires[k].device.type == "cpu"
        if key is not None:
            _auth.check_key(key)
            keys = _auth.prove_to_donor(wires[k], srcs[k], key, demanded, cap)
        return hs.recv_offer(wires[k], srcs[k], config, keys, demanded), keys

    offers = each([lambda k=k: offer(k) for k in range(n)])  # type: ignore[misc]
    failed = [(k, err) for k, (_, err) in enumerate(offers) if err is not None]
    # A donor gone before its offer (it died after its go) leaves its part to the others.
    gone = {k for k, err in failed if resume and _vanished(err)} if len(failed) < n else set()
    keep = [k for k in range(n) if k not in gone]
    for k in sorted(gone):
        logger.warning(
            "striped receive: donor %d (rank %d) vanished before its offer (%s); the others "
            "send its part", k, srcs[k], offers[k][1],
        )  # fmt: skip
    with Prefaulter() as prefaulter:
        try:
            hard = [(k, err) for k, err in failed if k not in gone]
            if hard:
                raise _blame(*hard[0])
            got: dict[int, tuple[hs.Offer, _auth.StreamKeys | None]] = {}
            for k in keep:
                offered = offers[k][0]
                assert offered is not None  # it did not fail
                got[k] = offered
            manifest = _agreed([got[k][0].manifest for k in keep], keep, srcs, step)
            clock.mark("manifest")
            for k, (o, _) in got.items():  # each donor's chain: itself, then this rank only
                pg_k = donors[k][0]
                if list(o.manifest.chain) != [srcs[k], w.group_rank(pg_k)]:
                    raise ManifestError(
                        f"rank {srcs[k]} offers a relay chain {list(o.manifest.chain)}: a "
                        "striped receive takes one donor and this joiner per group"
                    )
            me, world = w.group_rank(donors[0][0]), donors[0][0].size()
            plan = _prepare(manifest, srcs[keep[0]], me, world, step, config, into_, prefaulter)
            if plan.succ is not None or manifest.star:
                raise ConfigError("donors", n, "striped: one joiner per donor, no relay, no star")
        except BaseException as err:
            code = {
                StepMismatchError: f.ACK_STEP_MISMATCH,
                StateMismatchError: f.ACK_STATE_MISMATCH,
                DonorsDisagreeError: f.ACK_STATE_MISMATCH,
            }
            for k in range(n):
                own = offers[k][1]
                if own is None:  # it offered and waits for an answer
                    hs.best_effort(
                        wires[k], [code.get(type(err), f.ACK_OTHER), 0], srcs[k], f.TAG_ACK
                    )
                elif isinstance(own, (ManifestError, IntegrityError)):  # it waits too
                    hs.best_effort(wires[k], [f.ACK_BAD_MANIFEST, 0], srcs[k], f.TAG_ACK)
            raise
        clock.mark("prepare")
        shares_ = list(shares or [1.0] * n)
        runs = [range(0)] * n
        for k, run in zip(
            keep,
            stripes.split(list(manifest.message_nbytes), [shares_[k] for k in keep]),
            strict=True,
        ):
            runs[k] = run
        landed: list[list[int]] = [[] for _ in range(n)]
        macs = [  # per donor: its own keys
            (got[k][1] if got[k][0].macs else None) if k in got else None for k in range(n)
        ]

        def trail(k: int, hashes: list[int]) -> None:
            if macs[k] is not None:
                hs.verify_trailer(wires[k], srcs[k], hashes, _auth.TAG_WORDS, "MAC")
            else:
                hs.verify_trailer(wires[k], srcs[k], hashes, int(manifest.checksums), "checksum")

        def stream(k: int) -> None:
            wire, run = wires[k], runs[k]
            if k in gone:
                return
            if not run:
                hs.best_effort(wire, [f.ACK_NOT_NEEDED, 0], srcs[k], f.TAG_ACK)
                return
            hs.accept(wire, srcs[k], cap, stripe=stripes.encode(run.start, run.stop))
            wire.stall = config.stall_timeout
            trail(k, _stream(wire, plan, run, macs[k], srcs[k], landed[k]))

        def more(k: int, run: range) -> None:
            """Asks donor ``k``, which sent its own stripe, for ``run`` as well."""
            wires[k].send_ints(
                [f.ACK_MORE, stripes.encode(run.start, run.stop)], srcs[k], f.TAG_DONE
            )
            trail(k, _stream(wires[k], plan, run, macs[k], srcs[k]))

        streamed: list[tuple[object, BaseException | None]] = each(
            [lambda k=k: stream(k) for k in range(n)]  # type: ignore[misc]
        )
        broken = [(k, e) for k, (_, e) in enumerate(streamed) if e is not None]
        survivors = [k for k in range(n) if runs[k] and streamed[k][1] is None]
        try:
            if broken and not (resume and survivors):
                raise _blame(*broken[0])
            for k, why in broken:
                # What a failed stream delivered stays, unless it was to be checked at its
                # trailer (checksums or MACs): then its whole stripe comes again.
                checked = macs[k] is not None or manifest.checksums
                todo = runs[k] if checked else range(runs[k].start + len(landed[k]), runs[k].stop)
                logger.warning(
                    "striped receive: donor %d (rank %d) failed (%s); its messages %s come "
                    "from donors %s",
                    k, srcs[k], why, (todo.start, todo.stop), survivors,
                )  # fmt: skip
                if not todo:
                    continue
                sizes = list(manifest.message_nbytes)[todo.start : todo.stop]
                parts = stripes.split(sizes, [shares_[j] for j in survivors])
                asked = [
                    (j, range(todo.start + p.start, todo.start + p.stop))
                    for j, p in zip(survivors, parts, strict=True)
                    if p
                ]
                again: list[tuple[object, BaseException | None]] = each(
                    [lambda j=j, r=r: more(j, r) for j, r in asked]  # type: ignore[misc]
                )
                for (j, _), (_, again_err) in zip(asked, again, strict=True):
                    if again_err is not None:
                        raise _blame(j, again_err)
            plan.copy_out()
        except BaseException as first:
            for k in range(n):
                if runs[k]:
                    hs.best_effort(wires[k], [f.ACK_OTHER, 0], srcs[k], f.TAG_DONE)
            logger.warning("striped receive failed: %s", first)
            if isinstance(first, RecoverydError) or not isinstance(first, Exception):
                raise
            wrapped = TransferError(
                f"a striped receive failed: {first!r}; the in-place state may be partly "
                "overwritten and must not be used",
            )
            wrapped.donor_index = getattr(first, "donor_index", None)
            raise wrapped from first
    # The state is complete and verified: what is said now cannot change that.
    for k in survivors:
        hs.best_effort(wires[k], [f.ACK_OK, 0], srcs[k], f.TAG_DONE)
    for k, _ in broken:  # alive but refused (a bad trailer, a wrong echo): it waits for a word
        hs.best_effort(wires[k], [f.ACK_OTHER, 0], srcs[k], f.TAG_DONE)
    clock.mark("data")
    stats = TransferStats(
        role="joiner",
        payload_bytes=sum(plan.sizes),
        bytes_sent=sum(x.bytes_sent for x in wires),
        bytes_received=sum(x.bytes_received for x in wires),
        messages=sum(x.messages for x in wires),
        manifest_bytes=sum(o.nbytes for o, _ in got.values()),
        seconds=clock.total(),
        phases=clock.phases,
    )
    logger.info(
        "received %d bytes striped over %d donor(s) (runs %s) in %.3fs (%.2f GB/s)",
        stats.payload_bytes,
        n,
        [(r.start, r.stop) for r in runs],
        stats.seconds,
        stats.gbps,
    )
    return ReceivedState(state_dict=plan.state, step=plan.sent_step, stats=stats)


def _blame(k: int, err: BaseException) -> BaseException:
    """``err``, marked as donor ``k``'s failure (a caller blames that donor, not the others)."""
    if getattr(err, "donor_index", None) is None:
        try:
            err.donor_index = k  # type: ignore[attr-defined]
        except AttributeError:  # an exception type with slots: it stays unblamed
            pass
    return err


def _vanished(err: BaseException) -> bool:
    """Whether a donor's failure is its going away (not a refusal: a bad proof or manifest)."""
    if isinstance(err, (PeerLostError, TransferTimeoutError)):
        return True
    return not isinstance(err, RecoverydError) and isinstance(err, RuntimeError)  # Gloo's own


def _agreed(manifests: list[Any], ks: list[int], srcs: list[int], step: int | None) -> Any:
    """The donors' common manifest (donor ``ks[i]`` offered ``manifests[i]``); refuses
    donors at another step than ``step`` (a fence overshot: the caller widens it), at
    different steps, or with different states."""
    steps = [m.step if m.HasField("step") else None for m in manifests]
    for k, actual in zip(ks, steps, strict=True):
        if step is not None and actual != step:
            raise _blame(k, StepMismatchError(step, actual, peer_rank=srcs[k]))
    if len(set(steps)) > 1:
        odd = ks[steps.index(next(s for s in steps if s != steps[0]))]
        by_donor = dict(zip(ks, steps, strict=True))
        raise _blame(
            odd,
            DonorsDisagreeError(
                f"the donors are at different steps ({by_donor} by donor): a striped receive "
                "needs them fenced at one step; nothing was written",
                peer_rank=srcs[odd],
            ),
        )
    blobs = []
    for m in manifests:  # each donor's chain names its own rank; the rest must be the same
        bare = type(m)()
        bare.CopyFrom(m)
        bare.ClearField("chain")
        blobs.append(bare.SerializeToString(deterministic=True))
    for i, blob in enumerate(blobs[1:], start=1):
        if blob != blobs[0]:
            k = ks[i]
            raise _blame(
                k,
                DonorsDisagreeError(
                    f"donor {k} (rank {srcs[k]}) describes another state than donor {ks[0]} "
                    "(layout, sizes or cutting into messages differ): a striped receive needs "
                    "donors of the same layout and transfer settings; nothing was written",
                    peer_rank=srcs[k],
                ),
            )
    return manifests[0]
