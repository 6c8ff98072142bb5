"""Sending a state_dict to one or more ranks of a ProcessGroup.

The send runs in phases: plan (walk the state into a manifest and spans),
offer (header and manifest to every joiner) and settle (their answers,
then go or abort), stream the data, confirm (trailer out, every joiner's
done in). :mod:`recoveryd.transport.receiver` mirrors them.
"""

from __future__ import annotations

import ctypes
import logging
from collections import deque
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch

from recoveryd._time import Deadline
from recoveryd.errors import ConfigError, RecoverydError, TransferError, UntrustedPeerError
from recoveryd.transport import _auth
from recoveryd.transport import _stripes as stripes
from recoveryd.transport import _wire as w
from recoveryd.transport import format as f
from recoveryd.transport._flatten import SendPlan
from recoveryd.transport._gc import gc_paused
from recoveryd.transport._pieces import (
    WINDOW,
    Message,
    Staging,
    copies_done,
    copy_bytes,
    cuda_devices,
    cut,
)
from recoveryd.transport._reuse import plan_send
from recoveryd.transport._wire import Group
from recoveryd.transport.config import TransferConfig
from recoveryd.transport.stats import PhaseClock, TransferStats, checksum

logger = logging.getLogger(__name__)


@gc_paused()
def send_state_dict(
    pg: Group,
    dst_ranks: Sequence[int],
    state_dict: object,
    *,
    timeout: timedelta,
    step: int | None = None,
    config: TransferConfig | None = None,
    device: torch.device | None = None,
    auth_key: bytes | None = None,
    abandoned: Callable[[], bool] | None = None,
) -> TransferStats:
    """Streams ``state_dict`` to ``dst_ranks``, which call :func:`recv_state_dict`.

    The state is described by a schema'd manifest (no pickle), small tensors
    travel packed in buckets, each shared storage is sent once, and with
    several joiners each message leaves this rank once and is relayed along
    the joiners (``config.fanout``). Returns when every joiner has
    confirmed the state complete and verified.

    Args:
        pg: the group to send on (Gloo for CPU tensors, NCCL for CUDA ones).
        dst_ranks: group ranks of the joiners.
        state_dict: the state to send; it must not be mutated until this returns.
        timeout: deadline for the whole call.
        step: the training step of this state, checked by joiners that demand one.
        config: bucket size, checksums and fan-out; defaults from the environment.
        device: the device message buffers live on; defaults to cuda for NCCL
            groups and cpu otherwise.
        auth_key: the plan's key (32 bytes; the joiners must be given the same):
            each joiner proves it holds it, and this rank proves it to them,
            before anything of the state is sent; the manifest carries a MAC
            under it, and so does every data message when a joiner demands it.
            ``None``: no challenge (any rank of the group is trusted).
        abandoned: says whether the transfer is no longer wanted (the plan
            was cancelled, the joiner left); asked while waiting for the
            joiners' first answers, so a vanished joiner does not hold this
            rank for the handshake's whole timeout.

    Returns:
        The donor's counters.

    Raises:
        UnsupportedValueError: a leaf the manifest cannot carry (nothing was sent).
        UntrustedPeerError: a joiner could not prove the plan's key (nothing was sent).
        TransferError: a joiner refused the state (step or layout mismatch)
            or reported it broken, or the transfer was abandoned.
        TransferTimeoutError: the deadline passed.
        PeerLostError: a joiner went away.
    """
    clock = PhaseClock()
    config = config or TransferConfig()
    dst = list(dst_ranks)
    me = w.group_rank(pg)
    if not dst or len(set(dst)) != len(dst) or me in dst:
        raise ConfigError("dst_ranks", dst, f"must be distinct ranks other than this one ({me})")
    if any(not 0 <= d < pg.size() for d in dst):
        raise ConfigError("dst_ranks", dst, f"must be ranks of the group (size {pg.size()})")
    dev = w.wire_device(pg, device)
    wire = w.Wire(pg, dev, Deadline(timeout))
    wire.abandoned = abandoned
    keys, macs = None, False
    if auth_key is not None:
        _auth.check_key(auth_key)
        try:
            keys, macs = _auth.challenge_joiners(wire, dst, auth_key, config.handshake_timeout)
        except UntrustedPeerError as err:
            _abort(wire, [d for d in dst if d != err.peer_rank])
            raise
        macs = macs and dev.type == "cpu"  # GPU wires: the bytes never reach the host
    checksums = config.checksums and dev.type == "cpu" and not macs  # a MAC is a checksum too
    try:
        plan, remember = plan_send(
            state_dict,
            step=step,
            chain=[me, *dst],
            bucket_bytes=config.bucket_bytes,
            direct_bytes=min(config.direct_bytes, config.bucket_bytes),
            checksums=checksums,
            reuse=config.reuse_layouts,
        )
    except BaseException:
        # Tell the joiners now, rather than leave them to their timeout.
        _abort(wire, dst)
        raise
    plan.manifest.star = config.fanout == "star"
    blob = plan.manifest.SerializeToString()
    clock.mark("plan")
    streamer = _Streamer(wire, plan, checksums, keys if macs else None)
    offered = _offer(wire, dst, blob, keys, macs)
    streamer.prepack()  # while the joiners validate the manifest
    if remember is not None:
        try:
            remember()  # so does this
        except Exception as e:  # only a later send's speed-up is lost
            logger.warning("could not remember this state's plan for its next send: %r", e)
    run = _settle(wire, dst, offered, config.handshake_timeout, len(plan.manifest.message_nbytes))
    clock.mark("handshake")
    wire.abandoned = None  # from here on the joiners are streaming: the stall bound applies
    wire.stall = config.stall_timeout
    if run is not None:
        hashes = streamer.run(dst if plan.manifest.star else dst[:1], run)
        clock.mark("data")
        if run != range(len(plan.manifest.message_nbytes)):
            # A stripe: the joiner says done when every donor's stripe arrived, which
            # may be long after this one's; the transfer's deadline bounds that wait.
            wire.stall = None
        _confirm(wire, dst, hashes, streamer, len(plan.manifest.message_nbytes), config)
    else:
        streamer.run([], range(0))  # returns what was packed ahead; nothing goes on the wire
    clock.mark("confirm")
    stats = TransferStats(
        role="donor",
        payload_bytes=plan.payload_bytes,
        bytes_sent=wire.bytes_sent,
        bytes_received=wire.bytes_received,
        messages=wire.messages,
        manifest_bytes=len(blob),
        seconds=clock.total(),
        phases=clock.phases,
    )
    logger.info(
        "sent %d bytes (%d tensors, %d messages) to ranks %s in %.3fs (%.2f GB/s)",
        stats.payload_bytes,
        len(plan.manifest.tensor_dtype),
        len(plan.manifest.message_nbytes),
        dst,
        stats.seconds,
        stats.gbps,
    )
    return stats


_Pending = list[tuple[Any, int, torch.Tensor]]


def _confirm(
    wire: w.Wire,
    dst: list[int],
    hashes: list[int],
    streamer: _Streamer,
    messages: int,
    config: TransferConfig,
) -> None:
    """Sends the trailer (the checksums or MACs, as int64 words) and waits for every
    joiner to confirm; a lone joiner of a striped receive may ask for more stripes first
    (another of its donors died), each followed by its own trailer."""
    dev = wire.device
    for more in range(f.MAX_MORE + 1):
        trailer = [f.TRAILER_MAGIC, len(hashes), *hashes]
        t_trailer = torch.tensor(trailer, dtype=torch.int64, device=dev)
        works = [(wire.isend(t_trailer, d, f.TAG_TRAILER), d) for d in dst]
        done = [(torch.zeros(2, dtype=torch.int64, device=dev), d) for d in dst]
        recvs = [(wire.irecv(t, d, f.TAG_DONE), d, t) for t, d in done]
        for work, d in works:
            wire.wait(work, d)
        failed, wants = [], None
        for work, d, t in recvs:
            wire.wait(work, d)
            if int(t[0]) == f.ACK_MORE and len(dst) == 1 and more < f.MAX_MORE:
                wants = int(t[1])
            elif int(t[0]) != f.ACK_OK:
                failed.append(d)
        if wants is None:
            break
        try:
            run = stripes.decode(wants, messages)
        except ValueError as err:
            raise TransferError(
                f"joiner rank {dst[0]} asked for more of a stripe this state does not have: {err}",
                peer_rank=dst[0],
            ) from None
        wire.stall = config.stall_timeout  # streaming again: the stall bound applies
        hashes = streamer.run(dst, run)
        wire.stall = None  # and the next done comes when the joiner's other stripes did
    if failed:
        raise TransferError(
            f"joiner rank(s) {failed} reported the state broken (checksum mismatch or a "
            "local failure; see their logs)",
            peer_rank=failed[0],
        )


def _abort(wire: w.Wire, dst: list[int]) -> None:
    """Sends joiners a header that says the state cannot be sent; gives up after a second."""
    header = torch.tensor(
        [f.MAGIC, f.FORMAT_VERSION, 0, f.HEADER_SENDER_FAILED],
        dtype=torch.int64,
        device=wire.device,
    )
    works = [(wire.isend(header, d, f.TAG_HEADER), d) for d in dst]
    for work, d in works:
        try:
            wire.wait(work, d, cap=timedelta(seconds=1))
        except RecoverydError:
            pass


def _offer(
    wire: w.Wire, dst: list[int], blob: bytes, keys: _auth.StreamKeys | None, macs: bool
) -> tuple[_Pending, _Pending]:
    """Posts header and manifest (and its MAC) to every joiner, and the receives of
    their verdicts."""
    dev = wire.device
    words = [f.MAGIC, f.FORMAT_VERSION, len(blob), f.HEADER_DATA_MACS if macs else 0]
    header = torch.tensor(words, dtype=torch.int64, device=dev)
    tag = keys.manifest_tag(words, blob) if keys is not None else b""
    body = torch.frombuffer(bytearray(blob + tag), dtype=torch.uint8).to(dev)
    sends: _Pending = []
    acks: _Pending = []
    for d in dst:
        sends.append((wire.isend(header, d, f.TAG_HEADER), d, header))
        sends.append((wire.isend(body, d, f.TAG_MANIFEST), d, body))
        ack = torch.zeros(2, dtype=torch.int64, device=dev)
        acks.append((wire.irecv(ack, d, f.TAG_ACK), d, ack))
    return sends, acks


def _settle(
    wire: w.Wire,
    dst: list[int],
    offered: tuple[_Pending, _Pending],
    cap: timedelta,
    messages: int,
) -> range | None:
    """Waits (each wait within ``cap``) for the joiners' verdicts and answers go,
    or abort if any refused.

    Returns:
        The messages to send: the stripe the joiners asked for (every joiner
        must ask for the same), all of them, or none (a striped joiner that
        needs nothing from this donor: no go, no trailer).
    """
    sends, acks = offered
    for work, d, _ in sends:
        wire.wait(work, d, cap=cap)
    refused: list[tuple[int, int]] = []
    words: set[int] = set()
    for work, d, t in acks:
        wire.wait(work, d, cap=cap)
        if int(t[0]) != f.ACK_OK:
            refused.append((d, int(t[0])))
        else:
            words.add(int(t[1]))
    run = range(messages)
    word, why = stripes.WHOLE, ""
    if not refused and len(words) == 1:
        word = words.pop()
        try:
            run = stripes.decode(word, messages)
        except ValueError as err:
            word, why = (
                stripes.WHOLE,
                f"a joiner asked for a stripe this state does not have: {err}",
            )
    elif not refused and len(words) > 1:
        why = f"the joiners asked for different stripes ({sorted(words)})"
    if len(dst) == 1 and refused == [(dst[0], f.ACK_NOT_NEEDED)]:
        return None  # a striped joiner needs nothing from this donor: not listening either
    verdict = f.ABORT if refused or why else f.GO
    refusers = {d for d, _ in refused}
    # A refusing joiner has stopped listening: a message to it would never match.
    for d in dst:
        if d not in refusers:
            wire.send_ints([verdict, word], d, f.TAG_GO)
    if why:
        raise TransferError(f"{why}; nothing was sent", peer_rank=dst[0])
    if refused:
        d, code = refused[0]
        raise TransferError(
            f"rank {d} refused the transfer: {f.ACK_REASONS.get(code, f'code {code}')} "
            f"(all refusals: {refused}); nothing was sent",
            peer_rank=d,
        )
    return run


class _Streamer:
    """Sends the data messages, packing small spans into at most two staging buckets."""

    def __init__(
        self, wire: w.Wire, plan: SendPlan, checksums: bool, macs: _auth.StreamKeys | None
    ) -> None:
        self._wire = wire
        self._spans = plan.spans
        self._checksums = checksums
        self._macs = macs
        self._messages = plan.messages or cut(
            [s.nbytes for s in self._spans], list(plan.manifest.message_nbytes)
        )
        staged = max(
            (m.nbytes for m in self._messages if not self._zero_copy(m)),
            default=0,
        )
        # GPU memory leaving over a CPU wire stages through pinned buffers
        # (copies at the bus's speed; each is waited for before its send).
        self._gpus = cuda_devices(s.device for s in self._spans)
        pinned = wire.device.type == "cpu" and bool(self._gpus)
        self._staging = Staging(max(staged, 1), wire.device, pinned=pinned)
        self._packed: dict[int, torch.Tensor] = {}

    def _zero_copy(self, m: Message) -> bool:
        return m.direct and self._spans[m.span_ids[0]].device == self._wire.device

    def prepack(self) -> None:
        """Packs the first staged messages ahead, into the buckets that are free."""
        for i, m in enumerate(self._messages):
            if not self._staging.can_take():
                return
            if not self._zero_copy(m):
                pooled = self._staging.take()
                self._pack(m, pooled[: m.nbytes])
                self._packed[i] = pooled

    def _pack(self, m: Message, buf: torch.Tensor) -> None:
        """Copies the message's span pieces into the staging buffer ``buf``, in order.

        Copies from the GPU into a pinned buffer run asynchronously, on each
        GPU's current stream; they are waited for here, before the buffer
        goes on the wire.
        """
        spans = self._spans
        if buf.device.type == "cpu" and all(spans[s].owner.is_cpu for s in m.span_ids):
            # The hot loop of a many-small-tensors state: one memmove per piece.
            move = ctypes.memmove
            dst = buf.data_ptr()
            for s, o, n in zip(m.span_ids, m.offsets, m.sizes, strict=True):
                span = spans[s]
                move(dst, span.base + span.lo + o, n)
                dst += n
            return
        pinned = self._staging.pinned
        pos = 0
        for s, o, n in zip(m.span_ids, m.offsets, m.sizes, strict=True):
            copy_bytes(buf.narrow(0, pos, n), spans[s].view(o, n), asynchronous=pinned)
            pos += n
        if pinned:
            for event in copies_done(self._gpus):
                event.synchronize()

    def run(self, targets: list[int], indices: range) -> list[int]:
        """Sends the messages ``indices`` (a stripe, or all) to ``targets``; returns their
        checksums or MACs as int64 words (empty when neither is on)."""
        wire, staging = self._wire, self._staging
        for i in [i for i in self._packed if i not in indices]:  # packed ahead, not asked for
            staging.give(self._packed.pop(i))
        hashes: list[int] = []
        inflight: deque[tuple[list[tuple[Any, int]], torch.Tensor, torch.Tensor | None]] = deque()

        def retire() -> None:
            works, _buf, pooled = inflight.popleft()
            for work, d in works:
                wire.wait(work, d)
            if pooled is not None:
                staging.give(pooled)

        for i in indices:
            m = self._messages[i]
            pooled: torch.Tensor | None
            if self._zero_copy(m):
                buf = self._spans[m.span_ids[0]].view(m.offsets[0], m.sizes[0])
                pooled = None
            elif i in self._packed:
                pooled = self._packed.pop(i)
                buf = pooled[: m.nbytes]
            else:
                while not staging.can_take():
                    retire()
                pooled = staging.take()
                buf = pooled[: m.nbytes]
                self._pack(m, buf)
            works = [(wire.isend(buf, d, f.TAG_DATA), d) for d in targets]
            if self._macs is not None:
                hashes += self._macs.message_tag(i, buf)
            elif self._checksums:
                hashes.append(checksum(buf))
            inflight.append((works, buf, pooled))
            while len(inflight) > WINDOW:
                retire()
        while inflight:
            retire()
        return hashes
