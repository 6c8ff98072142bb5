"""The joiner's side of the offer and of the trailer: what it reads before and after the data.

:mod:`recoveryd.transport.receiver` runs the choreography; these are its
wire-level steps: the header and manifest (checked against the plan key's
MAC before a byte of it is parsed), the answer and the donor's go, the
trailer's checksums or MACs, and a last word to a donor that may not listen.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass
from datetime import timedelta

import torch
from google.protobuf.message import DecodeError

from recoveryd.errors import IntegrityError, ManifestError, RecoverydError, TransferError
from recoveryd.transport import _auth
from recoveryd.transport import _wire as w
from recoveryd.transport import format as f
from recoveryd.transport.config import TransferConfig
from recoveryd.v1 import manifest_pb2 as pb


class DonorFailedError(TransferError):
    """The donor said it cannot send; it is not listening for an answer."""


@dataclass(frozen=True, slots=True)
class Offer:
    """What the donor offered: its manifest, its size, and whether data messages carry MACs."""

    manifest: pb.Manifest
    nbytes: int
    macs: bool


def recv_offer(
    wire: w.Wire,
    src: int,
    config: TransferConfig,
    keys: _auth.StreamKeys | None,
    demanded_macs: bool,
) -> Offer:
    """Reads the header and the manifest; with ``keys``, checks the manifest's MAC first.

    Raises:
        ManifestError: not a recoveryd header, another format version, a size
            over ``max_manifest_bytes``, or a manifest that does not parse.
        IntegrityError: the manifest fails its MAC, or the donor does not MAC
            data messages this joiner demanded MACs on.
        DonorFailedError: the donor could not describe its state.
    """
    cap = config.handshake_timeout
    words = wire.recv_ints(4, src, f.TAG_HEADER, cap=cap)
    magic, version, nbytes, flags = words
    if magic != f.MAGIC:
        raise ManifestError(f"rank {src} did not send a recoveryd header (magic {magic:#x})")
    if flags & f.HEADER_SENDER_FAILED:
        raise DonorFailedError(
            f"rank {src} could not send its state (it failed while describing it; see its "
            "logs); nothing was received",
            peer_rank=src,
        )
    if version != f.FORMAT_VERSION:
        raise ManifestError(
            f"rank {src} speaks manifest format {version}, this recoveryd reads "
            f"{f.FORMAT_VERSION}: run the same recoveryd version on both sides"
        )
    if not 0 < nbytes <= config.max_manifest_bytes:
        raise ManifestError(
            f"manifest of {nbytes} bytes outside (0, {config.max_manifest_bytes}]; raise "
            "RECOVERYD_MAX_MANIFEST_BYTES if the state really is that large"
        )
    macs = bool(flags & f.HEADER_DATA_MACS)
    if macs and keys is None:
        raise ManifestError(f"rank {src} MACs its data, but this joiner was given no plan key")
    tag = _auth.PROOF_BYTES if keys is not None else 0
    body = torch.empty(nbytes + tag, dtype=torch.uint8, device=wire.device)
    wire.recv(body, src, f.TAG_MANIFEST)
    host = body.cpu()
    raw = ctypes.string_at(host.data_ptr(), nbytes + tag)
    blob = raw[:nbytes]
    if keys is not None:
        if not _auth.same(raw[nbytes:], keys.manifest_tag(words, blob)):
            raise IntegrityError(
                f"the manifest from rank {src} fails its MAC: it was changed on the way, or "
                "sent by another than the plan's donor; nothing was written",
                peer_rank=src,
            )
        if demanded_macs and not macs:
            raise IntegrityError(
                f"rank {src} does not MAC its data messages, which this joiner demands "
                "(RECOVERYD_DATA_MACS); nothing was written",
                peer_rank=src,
            )
    m = pb.Manifest()
    try:
        m.ParseFromString(blob)
    except (DecodeError, RecursionError, ValueError) as e:
        raise ManifestError(f"manifest from rank {src} does not parse: {e}") from e
    return Offer(m, nbytes, macs)


def accept(wire: w.Wire, src: int, cap: timedelta, stripe: int = 0) -> None:
    """Tells the donor this joiner is ready (and which stripe of the messages it wants:
    0 for all); waits for its go, which must echo the stripe (an abort: another refused)."""
    wire.send_ints([f.ACK_OK, stripe], src, f.TAG_ACK)
    verdict, echo = wire.recv_ints(2, src, f.TAG_GO, cap=cap)
    if verdict != f.GO:
        raise TransferError(
            f"rank {src} aborted the transfer (another joiner refused it, or it would not "
            "send the stripe asked for)",
            peer_rank=src,
        )
    if echo != stripe:
        raise TransferError(
            f"rank {src} answered stripe word {echo}, not the {stripe} asked for; nothing "
            "was written",
            peer_rank=src,
        )


def verify_trailer(wire: w.Wire, src: int, words: list[int], per_message: int, what: str) -> None:
    """Checks the donor's trailer against the words computed here.

    Args:
        wire: the transfer's wire.
        src: the donor.
        words: the checksums or MACs of the messages received, as int64 words.
        per_message: words per message (0: neither is on).
        what: ``checksum`` or ``MAC``, for the error.

    Raises:
        IntegrityError: a message does not match, or the trailer is malformed.
    """
    n = len(words) if per_message else 0
    trailer = wire.recv_ints(2 + n, src, f.TAG_TRAILER)
    if trailer[0] != f.TRAILER_MAGIC or trailer[1] != n:
        raise IntegrityError(f"rank {src} sent a bad trailer; the stream is not complete")
    got = trailer[2:]
    bad = [
        i
        for i in range(n // per_message if per_message else 0)
        if not _same_words(words, got, i * per_message, per_message)
    ]
    if bad:
        raise IntegrityError(
            f"{len(bad)} of {n // per_message} messages from rank {src} failed their {what} "
            f"(first: message {bad[0]}); the received state is corrupt and must not be used",
            peer_rank=src,
        )


def _same_words(a: list[int], b: list[int], start: int, count: int) -> bool:
    """Whether ``a`` and ``b`` agree on ``count`` words from ``start`` (constant time)."""
    pack = struct.Struct(f"<{count}q").pack
    return _auth.same(pack(*a[start : start + count]), pack(*b[start : start + count]))


def best_effort(wire: w.Wire, values: list[int], dst: int, tag: int) -> None:
    """Tells the donor we failed, if it listens within a second; a failure here adds nothing."""
    try:
        t = torch.tensor(values, dtype=torch.int64, device=wire.device)
        wire.wait(wire.isend(t, dst, tag), dst, cap=timedelta(seconds=1))
    except RecoverydError:
        pass
