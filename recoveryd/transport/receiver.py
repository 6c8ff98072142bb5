"""Receiving a state_dict from a rank of a ProcessGroup, allocating or in place.

The receive runs in the donor's phases, mirrored: read the offer (header
and manifest) and prepare for it (validate; match the in-place state or
allocate), answer, receive and relay the data, verify, confirm. Until the
answer nothing is written, and a refusal is told to the donor.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from recoveryd._time import Deadline
from recoveryd.errors import (
    ConfigError,
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
from recoveryd.transport import _wire as w
from recoveryd.transport import format as f
from recoveryd.transport._allocating import allocate_targets, rebuild_allocated
from recoveryd.transport._gc import gc_paused
from recoveryd.transport._inplace import copy_into
from recoveryd.transport._memory import Arena, Prefaulter, alloc_limit
from recoveryd.transport._pieces import (
    WINDOW,
    Buffers,
    Message,
    Staging,
    copies_done,
    cuda_devices,
    landing_in_place,
    scatter,
    synchronize,
)
from recoveryd.transport._reuse import keep, place, validate
from recoveryd.transport._validate import TensorSpec, check_chain
from recoveryd.transport._wire import Group
from recoveryd.transport.config import TransferConfig
from recoveryd.transport.stats import PhaseClock, ReceivedState, TransferStats, checksum
from recoveryd.transport.tree import typed_view
from recoveryd.v1 import manifest_pb2 as pb

logger = logging.getLogger(__name__)


@gc_paused()
def recv_state_dict(
    pg: Group,
    src_rank: int,
    *,
    timeout: timedelta,
    into: object | None = None,
    step: int | None = None,
    config: TransferConfig | None = None,
    device: torch.device | None = None,
    alloc_device: torch.device | None = None,
    device_mesh: Any | None = None,
    shard_group: dist.ProcessGroup | None = None,
    auth_key: bytes | None = None,
) -> ReceivedState:
    """Receives the state_dict that ``src_rank`` sends with :func:`send_state_dict`.

    The manifest is validated before anything is allocated; in place, it is
    matched against ``into`` (every path, kind, shape and dtype) before any
    byte is written, and the bytes land straight in ``into``'s tensors when
    their layout matches the donor's. Every message is checksummed when the
    donor enabled it, and the result is returned only when all bytes arrived
    and verified.

    Args:
        pg: the group to receive on.
        src_rank: group rank of the donor.
        timeout: deadline for the whole call.
        into: the joiner's own state_dict to receive into, or ``None`` to
            allocate fresh tensors.
        step: if given, the step the donor must be at.
        config: limits (manifest size, huge pages); defaults from the environment.
        device: the device message buffers live on; defaults to cuda for NCCL
            groups and cpu otherwise.
        alloc_device: where an allocating receive puts tensors (default cpu).
        device_mesh: the joiner's DeviceMesh for DTensors received without
            ``into``.
        shard_group: the group ShardedTensors received without ``into`` are
            rebuilt on (default: the default group); this rank's rank in it
            must be the donor's in its own.
        auth_key: the plan's key (32 bytes; the donor must be given the same):
            the donor proves it holds it, then this rank does, before the
            manifest; the manifest's MAC is checked before it is parsed, and
            with ``config.data_macs`` every data message's too (this joiner
            decides: a donor that does not MAC them is refused). ``None``: no
            challenge (any rank of the group is trusted).

    Returns:
        The state_dict, the donor's step and the counters.

    Raises:
        StepMismatchError: the donor is at another step (nothing written).
        StateMismatchError: ``into`` does not match the donor's state (nothing written).
        ManifestError: the manifest is malformed or hostile.
        UntrustedPeerError: the donor could not prove the plan's key (nothing written).
        IntegrityError: the manifest or a message failed its MAC or checksum.
        TransferTimeoutError: the deadline passed.
        PeerLostError: the donor or the rank relaying to this one went away.
    """
    clock = PhaseClock()
    config = config or TransferConfig()
    me = w.group_rank(pg)
    if src_rank == me or not 0 <= src_rank < pg.size():
        raise ConfigError("src_rank", src_rank, f"must be another rank of the group (this is {me})")
    wire = w.Wire(pg, w.wire_device(pg, device), Deadline(timeout))
    into_ = _Into(into, alloc_device or torch.device("cpu"), device_mesh, shard_group)
    demanded = config.data_macs and wire.device.type == "cpu"  # GPU wires: bytes stay on the GPU
    keys = None
    if auth_key is not None:
        _auth.check_key(auth_key)
        keys = _auth.prove_to_donor(wire, src_rank, auth_key, demanded, config.handshake_timeout)
    with Prefaulter() as prefaulter:
        plan, manifest_bytes = _offered(
            wire, src_rank, me, step, config, into_, prefaulter, clock, keys, demanded
        )
        hs.accept(wire, src_rank, config.handshake_timeout)
        clock.mark("handshake")
        try:
            wire.stall = config.stall_timeout
            hashes = _stream(wire, plan, range(len(plan.messages)), plan.macs, plan.pred)
            clock.mark("data")
            if plan.macs is not None:
                hs.verify_trailer(wire, src_rank, hashes, _auth.TAG_WORDS, "MAC")
            else:
                hs.verify_trailer(wire, src_rank, hashes, int(plan.manifest.checksums), "checksum")
            plan.copy_out()
        except BaseException as e:
            hs.best_effort(wire, [f.ACK_OTHER, 0], src_rank, f.TAG_DONE)
            logger.warning("receive from rank %d failed: %s", src_rank, e)
            if isinstance(e, Exception) and not isinstance(e, RecoverydError):
                raise TransferError(
                    f"receiving from rank {src_rank} failed: {e!r}; the in-place state may be "
                    "partly overwritten and must not be used",
                    peer_rank=src_rank,
                ) from e
            raise
    wire.send_ints([f.ACK_OK, 0], src_rank, f.TAG_DONE)
    clock.mark("verify")
    stats = TransferStats(
        role="joiner",
        payload_bytes=sum(plan.sizes),
        bytes_sent=wire.bytes_sent,
        bytes_received=wire.bytes_received,
        messages=wire.messages,
        manifest_bytes=manifest_bytes,
        seconds=clock.total(),
        phases=clock.phases,
    )
    logger.info(
        "received %d bytes (%d tensors, %d through scratch) from rank %d via %s in %.3fs "
        "(%.2f GB/s)",
        stats.payload_bytes,
        len(plan.tensors),
        len(plan.copies),
        plan.pred,
        "relay" if plan.pred != src_rank else "direct",
        stats.seconds,
        stats.gbps,
    )
    return ReceivedState(state_dict=plan.state, step=plan.sent_step, stats=stats)


@dataclass(frozen=True, slots=True)
class _Into:
    """Where the received state goes: ``state`` in place, or fresh tensors on ``device``."""

    state: object | None
    device: torch.device
    mesh: Any | None
    shard_group: Any | None


@dataclass(slots=True)
class _RecvPlan:
    """What this receive does (the receiving side's twin of the donor's ``SendPlan``)."""

    manifest: pb.Manifest
    tensors: list[TensorSpec]
    sizes: list[int]
    messages: list[Message]
    targets: Buffers
    """Per span, where its bytes go."""
    landing: list[torch.Tensor | None]
    """Per message, the bytes it is received straight into (``None``: staged, then scattered)."""
    copies: list[tuple[torch.Tensor, int]]
    """(joiner tensor, manifest tensor) pairs copied out of scratch after the data."""
    state: object
    sent_step: int | None
    pred: int
    """The rank the data comes from (the donor, or the joiner before this one in the chain)."""
    succ: int | None
    """The rank this one relays to, if any."""
    gpus: tuple[torch.device, ...]
    """The GPUs bytes land on (none: all in host memory)."""
    macs: _auth.StreamKeys | None = None
    """The keys data messages are MAC'd under (``None``: not MAC'd)."""
    addresses: list[int] | None = None
    """Per span, the host address its bytes go to, when known without a view (a layout
    seen before, in place): staged messages are scattered by address."""

    def copy_out(self) -> None:
        """Copies tensors laid out unlike the donor's out of scratch into the joiner's."""
        with torch.no_grad():  # the joiner's tensors may be leaves that require grad
            for t, i in self.copies:
                spec = self.tensors[i]
                copy_into(t, typed_view(self.targets[spec.storage], spec))


def _offered(
    wire: w.Wire,
    src: int,
    me: int,
    step: int | None,
    config: TransferConfig,
    into: _Into,
    prefaulter: Prefaulter,
    clock: PhaseClock,
    keys: _auth.StreamKeys | None,
    demanded: bool,
) -> tuple[_RecvPlan, int]:
    """Reads the donor's offer and prepares for it; a refusal is told to the donor.

    Returns:
        The receive's plan, and the manifest's size.
    """
    try:
        offer = hs.recv_offer(wire, src, config, keys, demanded)
        clock.mark("manifest")
        plan = _prepare(offer.manifest, src, me, wire.pg.size(), step, config, into, prefaulter)
        plan.macs = keys if offer.macs else None
    except (TransferTimeoutError, PeerLostError, hs.DonorFailedError):
        raise  # the donor is gone, silent or failed: nobody would read a refusal
    except BaseException as e:
        prefaulter.stop()  # the buffers it fills are dropped with the refusal
        code = {
            StepMismatchError: f.ACK_STEP_MISMATCH,
            StateMismatchError: f.ACK_STATE_MISMATCH,
            ManifestError: f.ACK_BAD_MANIFEST,
        }.get(type(e), f.ACK_OTHER)
        hs.best_effort(wire, [code, 0], src, f.TAG_ACK)
        raise
    clock.mark("prepare")
    return plan, offer.nbytes


def _prepare(
    m: pb.Manifest,
    src: int,
    me: int,
    world: int,
    step: int | None,
    config: TransferConfig,
    into: _Into,
    prefaulter: Prefaulter,
) -> _RecvPlan:
    """Validates the manifest, then matches ``into.state`` or allocates; nothing written yet.

    What it would allocate (span buffers or scratch for spans laid out unlike
    the joiner's, plus two staging buffers of the largest message) is checked
    against ``max_alloc_bytes`` first.
    """
    layout = validate(m, reuse=config.reuse_layouts)
    tensors, sizes, messages = layout.tensors, layout.sizes, layout.messages
    chain = list(m.chain)
    check_chain(chain, src, me, world)
    sent_step = m.step if m.HasField("step") else None
    if step is not None and sent_step != step:
        raise StepMismatchError(step, sent_step, peer_rank=src)
    total = sum(sizes)
    if total > config.max_state_bytes:
        raise ManifestError(
            f"rank {src} announces {total} bytes of state, over this joiner's limit "
            f"of {config.max_state_bytes} (RECOVERYD_MAX_STATE_BYTES)"
        )
    arena = Arena(hugepages=config.hugepages)
    copies: list[tuple[torch.Tensor, int]] = []
    targets: Buffers
    addresses: list[int] | None = None
    staging = 2 * max(m.message_nbytes, default=0)  # at most: most messages land in place
    if into.state is None:
        limit = alloc_limit(config.max_alloc_bytes, into.device)
        limit.check(total + staging, src, f"its {total}-byte state, and staging")
        spans, landing = allocate_targets(sizes, messages, into.device, arena)
        targets = spans
        # Fresh memory: populate it ahead of the wire, in stream order.
        prefaulter.start([b for b in landing if b is not None])
        # Built before any data arrives (views over the empty targets), so a
        # malformed tree is refused before the donor streams anything.
        state = rebuild_allocated(m, tensors, spans, into.mesh, into.shard_group)
        gpus = cuda_devices([into.device])
    else:
        limit = alloc_limit(config.max_alloc_bytes, torch.device("cpu"))

        def reserve(n: int) -> None:
            limit.check(n + staging, src, f"{n} bytes of scratch, and staging")

        placed = place(m, layout, into.state, arena, reserve)
        state, targets, copies, addresses = (
            placed.state,
            placed.targets,
            placed.copies,
            placed.addresses,
        )
        landing = landing_in_place(messages, targets)
        gpus = () if addresses is not None else cuda_devices(t.device for t in placed.views())
    keep(layout)  # the offer is accepted: its checks are worth keeping
    pos = chain.index(me)
    pred = src if m.star else chain[pos - 1]
    succ = None if m.star or pos + 1 == len(chain) else chain[pos + 1]
    return _RecvPlan(
        m,
        tensors,
        sizes,
        messages,
        targets,
        landing,
        copies,
        state,
        sent_step,
        pred,
        succ,
        gpus,
        addresses=addresses,
    )


def _stream(
    wire: w.Wire,
    plan: _RecvPlan,
    indices: range,
    macs: _auth.StreamKeys | None,
    pred: int,
    arrived: list[int] | None = None,
) -> list[int]:
    """Receives (and relays) the data messages ``indices`` (all, or a stripe) from ``pred``;
    returns their checksums or MACs (int64 words). Each message's index goes on ``arrived``
    once its bytes are in place (in order: what a failed stream did deliver)."""
    dev = wire.device
    messages, targets, landing = plan.messages, plan.targets, plan.landing
    succ = plan.succ
    checksums = plan.manifest.checksums and macs is None

    def zero_copy(i: int) -> bool:
        buf = landing[i]
        return buf is not None and buf.device == dev

    staged = max((messages[i].nbytes for i in indices if not zero_copy(i)), default=0)
    # A CPU wire landing in GPU memory stages through pinned buffers: the
    # copies to the GPU run asynchronously, and a buffer is reused only after
    # its copies finished (the event handed back with it).
    staging = Staging(max(staged, 1), dev, pinned=bool(plan.gpus) and dev.type == "cpu")
    hashes: list[int] = []
    pending: deque[tuple[int, Any, torch.Tensor, torch.Tensor | None]] = deque()
    relays: deque[tuple[Any, torch.Tensor, torch.Tensor | None, list[Any]]] = deque()

    def retire_relay() -> None:
        work, _buf, pooled, copied = relays.popleft()
        wire.wait(work, succ if succ is not None else pred)
        if pooled is not None:
            staging.give(pooled, copied)

    def land() -> None:
        i, work, buf, pooled = pending.popleft()
        m = messages[i]
        wire.wait(work, pred)
        if macs is not None:
            hashes.extend(macs.message_tag(i, buf))
        elif checksums:
            hashes.append(checksum(buf))
        copied: list[Any] = []
        if pooled is not None:
            scatter(m, buf, targets, asynchronous=staging.pinned, addresses=plan.addresses)
            if staging.pinned:
                copied = copies_done(plan.gpus)
        if arrived is not None:
            arrived.append(i)
        if succ is not None:
            relays.append((wire.isend(buf, succ, f.TAG_DATA), buf, pooled, copied))
        elif pooled is not None:
            staging.give(pooled, copied)
        while len(relays) > WINDOW:
            retire_relay()

    for i in indices:
        m = messages[i]
        landed = landing[i]
        if landed is not None and zero_copy(i):
            buf, pooled = landed, None
        else:
            while not staging.can_take():
                if pending:
                    land()
                else:
                    retire_relay()
            pooled = staging.take()
            buf = pooled[: m.nbytes]
        pending.append((i, wire.irecv(buf, pred, f.TAG_DATA), buf, pooled))
        while len(pending) > WINDOW:
            land()
    while pending:
        land()
    while relays:
        retire_relay()
    if staging.pinned:
        synchronize(plan.gpus)  # every byte is in GPU memory before this rank says done
    return hashes
