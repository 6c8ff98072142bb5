"""Proving the plan's key on the group, and keyed MACs of what crosses it.

When the caller gives a plan key (the coordinator hands one to a plan's
donor and joiner ranks only), a transfer opens with a mutual challenge on
the group, before the manifest: each joiner sends a fresh nonce and whether
it demands data MACs; the donor answers with its own nonce and a proof; the
joiner checks it and answers with its proof; the donor checks that. Each
proof is a keyed BLAKE3 MAC over both nonces, the flags and the prover's
role, so a stranger on the group (one who joined the plan's rendezvous
without the key) fails at once, an old transfer cannot be replayed (fresh
nonces), and one side's proof cannot be reflected as the other's.

Then the donor MACs the header and manifest, and, when any joiner demanded
it, every data message (under a key derived from the donor's nonce, so one
MAC per message serves every joiner of a chain). The joiner decides: a donor
cannot switch data MACs off.

BLAKE3 (keyed): 2.8 GB/s on one core here against 1.4 for HMAC-SHA-256, and
it releases the GIL while hashing large buffers.
"""

from __future__ import annotations

import ctypes
import hmac
import os
import struct
from dataclasses import dataclass
from datetime import timedelta

import blake3
import torch

from recoveryd.errors import UntrustedPeerError
from recoveryd.transport import _wire as w
from recoveryd.transport import format as f

NONCE_BYTES = 32
PROOF_BYTES = 32
TAG_BYTES = 16
"""A data message's MAC: 128 bits."""
TAG_WORDS = TAG_BYTES // 8
"""A data message's MAC as the trailer carries it: int64 words."""
KEY_BYTES = 32
_HELLO = struct.Struct("<32sQ")  # the joiner's nonce, its flags
_ANSWER = struct.Struct("<32s32s")  # the donor's nonce, its proof
FLAG_DATA_MACS = 1
"""The joiner demands a MAC on every data message."""


def check_key(key: bytes) -> None:
    """A plan key is 32 bytes.

    Raises:
        ValueError: it is not.
    """
    if len(key) != KEY_BYTES:
        raise ValueError(f"a plan key is {KEY_BYTES} bytes, not {len(key)}")


def _mac(key: bytes, *parts: bytes, size: int = PROOF_BYTES) -> bytes:
    h = blake3.blake3(key=key)
    for p in parts:
        h.update(struct.pack("<Q", len(p)))
        h.update(p)
    return h.digest(size)


def nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def hello(joiner_nonce: bytes, data_macs: bool) -> bytes:
    """The joiner's first message."""
    return _HELLO.pack(joiner_nonce, FLAG_DATA_MACS if data_macs else 0)


def read_hello(raw: bytes) -> tuple[bytes, int]:
    """The joiner's nonce and flags."""
    n, flags = _HELLO.unpack(raw)
    return n, flags


def proof(key: bytes, role: str, donor_nonce: bytes, joiner_nonce: bytes, flags: int) -> bytes:
    """What ``role`` (``donor`` or ``joiner``) sends to show it holds ``key``."""
    return _mac(
        key,
        b"recoveryd/v1 proof",
        role.encode(),
        donor_nonce,
        joiner_nonce,
        struct.pack("<Q", flags),
    )


def answer(donor_nonce: bytes, donor_proof: bytes) -> bytes:
    """The donor's answer to one joiner's hello."""
    return _ANSWER.pack(donor_nonce, donor_proof)


def read_answer(raw: bytes) -> tuple[bytes, bytes]:
    """The donor's nonce and proof."""
    n, p = _ANSWER.unpack(raw)
    return n, p


def same(a: bytes, b: bytes) -> bool:
    """Constant-time equality."""
    return hmac.compare_digest(a, b)


HELLO_BYTES = _HELLO.size
ANSWER_BYTES = _ANSWER.size


@dataclass(frozen=True, slots=True)
class StreamKeys:
    """The keys of one transfer's header, manifest and data MACs (from the donor's nonce)."""

    manifest: bytes
    data: bytes

    @classmethod
    def derive(cls, key: bytes, donor_nonce: bytes) -> StreamKeys:
        return cls(
            manifest=_mac(key, b"recoveryd/v1 manifest key", donor_nonce),
            data=_mac(key, b"recoveryd/v1 data key", donor_nonce),
        )

    def manifest_tag(self, header: list[int], blob: bytes) -> bytes:
        """The MAC of the header's words and the manifest's bytes."""
        return _mac(self.manifest, struct.pack(f"<{len(header)}q", *header), blob)

    def message_tag(self, index: int, buf: torch.Tensor) -> list[int]:
        """The MAC of data message ``index`` (a CPU uint8 tensor), as int64 words."""
        h = blake3.blake3(key=self.data)
        h.update(struct.pack("<Q", index))
        n = buf.numel()
        if n:
            h.update(memoryview((ctypes.c_ubyte * n).from_address(buf.data_ptr())).cast("B"))
        return list(struct.unpack(f"<{TAG_WORDS}q", h.digest(TAG_BYTES)))


def to_tensor(raw: bytes, device: torch.device) -> torch.Tensor:
    """Bytes as a uint8 tensor on the wire's device."""
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(device)


def from_tensor(t: torch.Tensor) -> bytes:
    """A uint8 tensor's bytes."""
    host = t.cpu()
    return ctypes.string_at(host.data_ptr(), host.numel())


# ---- the mutual challenge, on the wire ------------------------------------------------


def challenge_joiners(
    wire: w.Wire, dst: list[int], key: bytes, cap: timedelta
) -> tuple[StreamKeys, bool]:
    """The donor's side: every joiner proves the key, after the donor proved it.

    Returns:
        The transfer's MAC keys, and whether some joiner demands data MACs.

    Raises:
        UntrustedPeerError: a joiner's proof is wrong (the others are told the
            transfer is off: the caller aborts them).
    """
    dev = wire.device
    hellos = []
    for d in dst:
        buf = torch.zeros(HELLO_BYTES, dtype=torch.uint8, device=dev)
        hellos.append((wire.irecv(buf, d, f.TAG_HELLO), d, buf))
    mine = nonce()
    exchanges = []  # per joiner: its nonce and flags, our answer's send, its proof's receive
    for work, d, buf in hellos:
        wire.wait(work, d, cap=cap)
        theirs, flags = read_hello(from_tensor(buf))
        reply = to_tensor(answer(mine, proof(key, "donor", mine, theirs, flags)), dev)
        sent = wire.isend(reply, d, f.TAG_ANSWER)
        got = torch.zeros(PROOF_BYTES, dtype=torch.uint8, device=dev)
        exchanges.append((d, theirs, flags, sent, wire.irecv(got, d, f.TAG_PROOF), got))
    for d, theirs, flags, sent, received, got in exchanges:
        wire.wait(sent, d, cap=cap)
        wire.wait(received, d, cap=cap)
        if not same(from_tensor(got), proof(key, "joiner", mine, theirs, flags)):
            raise UntrustedPeerError(
                f"rank {d} could not prove it holds the plan's key: it is not the plan's "
                "joiner (a process joined the plan's group without being a party to it, or "
                "the two sides were given different plans); nothing was sent",
                peer_rank=d,
            )
    macs = any(flags & FLAG_DATA_MACS for _, _, flags, *_ in exchanges)
    return StreamKeys.derive(key, mine), macs


def prove_to_donor(
    wire: w.Wire, src: int, key: bytes, data_macs: bool, cap: timedelta
) -> StreamKeys:
    """The joiner's side: the donor proves the key, then this joiner does.

    Raises:
        UntrustedPeerError: the donor's proof is wrong (this joiner's own proof
            is sent anyway, so the donor does not wait for it; it tells nothing
            of the key).
    """
    dev = wire.device
    mine = nonce()
    flags = FLAG_DATA_MACS if data_macs else 0
    wire.send(to_tensor(hello(mine, data_macs), dev), src, f.TAG_HELLO)
    got = torch.zeros(ANSWER_BYTES, dtype=torch.uint8, device=dev)
    wire.wait(wire.irecv(got, src, f.TAG_ANSWER), src, cap=cap)
    theirs, their_proof = read_answer(from_tensor(got))
    wire.send(to_tensor(proof(key, "joiner", theirs, mine, flags), dev), src, f.TAG_PROOF)
    if not same(their_proof, proof(key, "donor", theirs, mine, flags)):
        raise UntrustedPeerError(
            f"rank {src} could not prove it holds the plan's key: it is not the plan's donor "
            "(a process joined the plan's group without being a party to it, or the two "
            "sides were given different plans); nothing was written",
            peer_rank=src,
        )
    return StreamKeys.derive(key, theirs)
