"""The wire format both sides of a transfer speak: version, tags, answers, node kinds, bounds.

Neutral ground: the sending side (:mod:`recoveryd.transport.sender`) and the
receiving side (:mod:`recoveryd.transport.receiver`) both read these, so
neither borrows from the other. A transfer is, in order: with a plan key,
the mutual challenge (each joiner's hello, the donor's answer, each joiner's
proof: :mod:`recoveryd.transport._auth`); a header (magic, version, manifest
size, flags), the manifest (``proto/recoveryd/v1/manifest.proto``; with a
plan key followed by its MAC), each joiner's answer, the donor's go or
abort, the data messages, a trailer (the checksums or MACs, when on), and
each joiner's done.
"""

from __future__ import annotations

from collections.abc import Iterable

from recoveryd.v1 import manifest_pb2 as pb

FORMAT_VERSION = 2
"""The manifest format this recoveryd writes and reads; both sides must agree.

2: a joiner's answer names the stripe of messages it wants (0: all) and the
donor's go echoes it (a donor of format 1 would send every message to a
joiner that asked for a stripe); a joiner's done may ask for one more stripe
(:data:`ACK_MORE`)."""

# Tags live far from 0 so the transport can share a group with a caller's own
# point-to-point traffic.
_TAG_BASE = 0x52440
TAG_HEADER = _TAG_BASE + 1
TAG_MANIFEST = _TAG_BASE + 2
TAG_ACK = _TAG_BASE + 3
TAG_GO = _TAG_BASE + 4
TAG_DATA = _TAG_BASE + 5
TAG_TRAILER = _TAG_BASE + 6
TAG_DONE = _TAG_BASE + 7
TAG_HELLO = _TAG_BASE + 8
TAG_ANSWER = _TAG_BASE + 9
TAG_PROOF = _TAG_BASE + 10

MAGIC = 0x5245434F56455259  # "RECOVERY"
TRAILER_MAGIC = 0x454E444F46535452  # "ENDOFSTR"

# Answers a joiner gives after reading the manifest, and the donor's go/abort.
ACK_OK = 0
ACK_STEP_MISMATCH = 1
ACK_STATE_MISMATCH = 2
ACK_BAD_MANIFEST = 3
ACK_OTHER = 4
ACK_NOT_NEEDED = 5
"""A striped joiner needs nothing from this donor (more donors than messages)."""
ACK_MORE = 6
"""In a done: this joiner also wants the messages of the stripe word that follows
(another donor of a striped receive died before its stripe arrived); the donor
sends them and a trailer for them, then waits for the next done."""
MAX_MORE = 16
"""Most extra stripes one donor sends on request in one transfer."""
GO = 0
ABORT = 1
HEADER_SENDER_FAILED = 1
"""Header flag: the donor failed before it could describe its state."""
HEADER_DATA_MACS = 2
"""Header flag: every data message is MAC'd (the trailer carries the MACs)."""

ACK_REASONS = {
    ACK_STEP_MISMATCH: "its demanded step differs from the sent step",
    ACK_STATE_MISMATCH: "its in-place state_dict does not match the manifest",
    ACK_BAD_MANIFEST: "it rejected the manifest",
    ACK_OTHER: "it failed before receiving data",
    ACK_NOT_NEEDED: "it needs no stripe from this donor (more donors than messages)",
}

SPAN_ALIGN = 16
"""Spans start on a 16-byte boundary (the largest itemsize, complex128), so every
tensor's byte offset inside its span is a whole number of elements."""
MAX_DEPTH = 256
"""The deepest tree a joiner rebuilds."""
MAX_NUMEL = 1 << 60
"""torch counts elements in int64; beyond this a shape cannot be a real tensor."""
MAX_MESSAGE_BYTES = 1 << 30
"""One message is never larger than this; bounds what a hostile manifest can make
the joiner stage."""

# Node and key kinds as plain ints, looked up once (not once per node).
NODE_DICT = pb.NODE_KIND_DICT
NODE_ORDERED_DICT = pb.NODE_KIND_ORDERED_DICT
NODE_LIST = pb.NODE_KIND_LIST
NODE_TUPLE = pb.NODE_KIND_TUPLE
NODE_VALUE = pb.NODE_KIND_VALUE
NODE_TENSOR = pb.NODE_KIND_TENSOR
NODE_DTENSOR = pb.NODE_KIND_DTENSOR
NODE_SHARDED_TENSOR = pb.NODE_KIND_SHARDED_TENSOR
LEAF_KINDS = frozenset((NODE_TENSOR, NODE_DTENSOR, NODE_SHARDED_TENSOR))
KEY_STR = pb.KEY_KIND_STR
KEY_INT = pb.KEY_KIND_INT

Path = tuple[object, ...]
"""A key path into a state_dict: dict keys and list indices from the root."""


def path_str(parts: Iterable[object]) -> str:
    """A key path as errors and mismatches name it, e.g. ``optim.state.0.exp_avg``."""
    return ".".join(str(p) for p in parts) or "<root>"
