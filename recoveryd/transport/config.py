"""Knobs of the data plane, as one frozen dataclass."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal

from recoveryd._time import MIN_WAIT, env_bool, env_choice, env_int, env_seconds
from recoveryd.errors import ConfigError

_MiB = 1 << 20

MIN_BUCKET_BYTES = 4096
"""The smallest ``bucket_bytes`` a donor may use: what bounds, on the joiner's side, how
many messages an honest donor cuts a span into."""
MANIFEST_COST_PER_BYTE = 200
"""The most memory (bytes) one manifest byte can make a joiner spend before any data arrives.

Everything a joiner builds from a manifest (nodes, keys, values, tensors,
spans, messages) is paid for by manifest bytes, and no count can exceed what
those bytes and the spans justify (see ``_validate``). The costliest
manifest found, 0-d tensors each in a span and a message of its own received
allocating (~14 manifest bytes for a tensor, its buffer and its message),
measured 153-156 bytes of peak RSS per manifest byte (torch 2.13, Python
3.11); in place the same manifest costs 46-50, and 0-d tensors sharing one
span 111, Parameters 127, ShardedTensor shards 122, DTensors 105, empty lists
47, dict keys 33 (tests/integration/test_transport_bounds.py checks the worst).
"""


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 50  # unknown: no practical limit


_FANOUTS: tuple[Literal["chain", "star"], ...] = ("chain", "star")


def _bytes(name: str, default: int) -> int:
    return env_int(name, default, what="an integer number of bytes")


@dataclass(frozen=True, kw_only=True, slots=True)
class TransferConfig:
    """How a state_dict is cut into messages and checked.

    Every field can also be set through the environment variable named in its
    description; an explicit argument wins over the environment.
    """

    bucket_bytes: int = field(default_factory=lambda: _bytes("RECOVERYD_BUCKET_BYTES", 16 * _MiB))
    """Size of one staging bucket (``RECOVERYD_BUCKET_BYTES``, default 16 MiB).

    Small tensors are packed into buckets, so the number of messages grows with
    bytes, not with tensors; each side holds at most two buckets of extra memory.
    Large spans travel in messages of at most this size.
    """

    direct_bytes: int = field(default_factory=lambda: _bytes("RECOVERYD_DIRECT_BYTES", 1 * _MiB))
    """Spans of at least this many bytes skip the buckets (``RECOVERYD_DIRECT_BYTES``, default 1 MiB).

    They travel straight from the donor's tensor memory into the joiner's, in
    messages of at most ``bucket_bytes``; smaller spans are packed. Below ~1 MiB
    a message's fixed cost outweighs the copy a bucket costs. Values above
    ``bucket_bytes`` act as ``bucket_bytes``.
    """

    checksums: bool = field(default_factory=lambda: env_bool("RECOVERYD_CHECKSUMS", False))
    """Verify an xxh3-64 checksum of every message (``RECOVERYD_CHECKSUMS``, default off).

    Off by default because it cost more than 5 % on the 1 GiB benchmark here
    (both ends on one 2-core machine, where hashing competes with the kernel's
    socket copies; bench/RESULTS.md). Only applies to CPU wires (Gloo); NCCL
    transfers are not checksummed.
    """

    fanout: Literal["chain", "star"] = field(
        default_factory=lambda: env_choice("RECOVERYD_FANOUT", "chain", _FANOUTS)
    )
    """How one donor reaches several joiners (``RECOVERYD_FANOUT``).

    ``"chain"`` (default): the donor sends each message once; every joiner
    forwards it to the next, so the donor's link carries the state once
    whatever the number of joiners. ``"star"``: the donor sends every message
    to every joiner itself.
    """

    max_manifest_bytes: int = field(
        default_factory=lambda: _bytes("RECOVERYD_MAX_MANIFEST_BYTES", 64 * _MiB)
    )
    """Largest manifest a joiner accepts (``RECOVERYD_MAX_MANIFEST_BYTES``, default 64 MiB).

    It also bounds the memory an offer costs before any data arrives: at most
    :data:`MANIFEST_COST_PER_BYTE` (200) bytes per manifest byte, so 12.8 GiB at
    the default (and a manifest comes only from the plan's donor: with a plan
    key, its MAC is checked before it is parsed). 64 MiB, not less, so that the
    DTensor state of a large sharded job fits (below). Real manifests are far smaller: an AdamW state of 20,001
    tensors is 0.55 MiB, with its model (26,668 tensors) 0.78 MiB; DTensors
    repeat their mesh's ranks, so 20,000 of them are 2.7 MiB on a 64-rank mesh
    and 38 MiB on a 1,024-rank one.
    """

    max_state_bytes: int = field(
        default_factory=lambda: _bytes("RECOVERYD_MAX_STATE_BYTES", _physical_memory())
    )
    """Largest state a joiner accepts (``RECOVERYD_MAX_STATE_BYTES``, default: physical memory).

    A manifest announcing more is refused before anything is allocated.
    """

    max_alloc_bytes: int | None = field(
        default_factory=lambda: env_int(
            "RECOVERYD_MAX_ALLOC_BYTES", None, what="an integer number of bytes"
        )
    )
    """Most memory one receive may allocate (``RECOVERYD_MAX_ALLOC_BYTES``, bytes).

    Counts the span buffers of an allocating receive, the scratch of an
    in-place one (spans laid out unlike the joiner's tensors) and two staging
    buffers of the largest message; an offer needing more is refused before
    anything is allocated or pre-faulted. Default (``None``): three quarters of
    the memory available when the receive starts, on the device an allocating
    receive fills (``MemAvailable`` in /proc/meminfo, or less when the cgroup's
    limit leaves less; a GPU's free memory). Available memory, not physical:
    a manifest announcing more than is free would otherwise end in the OOM
    killer after the data streamed. A quarter is left for what the receive
    builds from the manifest, for the page cache the kernel counts as
    available but that others use, and for the joiner to go on training.
    """

    handshake_timeout: timedelta = field(
        default_factory=lambda: env_seconds("RECOVERYD_HANDSHAKE_TIMEOUT", timedelta(seconds=30))
    )
    """The longest either side waits for the other during the handshake: the
    challenge, the header and manifest, the joiners' answers and the go
    (``RECOVERYD_HANDSHAKE_TIMEOUT``, default 30 s). A donor sends only once its
    joiner waits for it, so the handshake takes round trips plus the joiner's
    validation of the manifest (0.1-0.3 s for a 20,000-tensor state here); a
    joiner that vanished after the group formed holds the donor this long at
    most, not the whole transfer's timeout."""

    data_macs: bool = field(default_factory=lambda: env_bool("RECOVERYD_DATA_MACS", False))
    """On the joiner: demand a keyed MAC (BLAKE3) on every data message of a
    transfer that has a plan key (``RECOVERYD_DATA_MACS``, default off). The
    joiner decides: a donor that does not MAC them is refused before any data.
    The handshake and the manifest are MAC'd either way. Off by default for its
    cost (see bench/RESULTS.md); CPU (Gloo) wires only."""

    stall_timeout: timedelta = field(
        default_factory=lambda: env_seconds("RECOVERYD_STALL_TIMEOUT", timedelta(seconds=10))
    )
    """Longest wait for one message once the bytes flow (``RECOVERYD_STALL_TIMEOUT``, seconds, default 10).

    A message is at most ``bucket_bytes``, so 10 s allows links down to ~2 MB/s. Gloo does not always wake a pending receive when its peer dies between
    two messages; without this cap such a transfer would wait for its whole
    deadline. The wait for the first message (a donor reaching its fence
    step) is bounded by the call's timeout only.
    """

    hugepages: bool = field(default_factory=lambda: env_bool("RECOVERYD_HUGEPAGES", False))
    """Advise allocating receives' buffers with ``MADV_HUGEPAGE`` (``RECOVERYD_HUGEPAGES``).

    Off by default: on the VMs measured here the first touch of huge pages in
    a fresh process was 2-3x slower than 4 KiB pages populated ahead of the
    wire (bench/RESULTS.md). Worth trying on hosts with warm, host-backed memory.
    """

    reuse_layouts: bool = field(default_factory=lambda: env_bool("RECOVERYD_REUSE_LAYOUTS", True))
    """Reuse what was worked out for a layout seen before (``RECOVERYD_REUSE_LAYOUTS``, default on).

    Sending the same state again (a repeated heal, a sidecar's every
    transfer), the donor reuses its plan and its manifest's layout, and the
    joiner its checks of that layout and its in-place match, so a state of
    many small tensors costs time by its bytes, not by its tensor count
    (20,000 tensors: ~0.3 s first, ~0.1 s again; bench/RESULTS.md). A layout
    is the state's containers, keys and value types and, per tensor, its
    address, shape, strides, dtype, flags and storage size: any change there
    is worked out afresh. Nothing kept holds a tensor (8 layouts per side,
    about 64 MiB at most).
    """

    def __post_init__(self) -> None:
        if self.bucket_bytes < MIN_BUCKET_BYTES:
            raise ConfigError(
                "bucket_bytes", self.bucket_bytes, f"must be at least {MIN_BUCKET_BYTES}"
            )
        if self.direct_bytes <= 0:
            raise ConfigError("direct_bytes", self.direct_bytes, "must be positive")
        if self.fanout not in ("chain", "star"):
            raise ConfigError("fanout", self.fanout, "must be 'chain' or 'star'")
        if self.handshake_timeout < MIN_WAIT:
            raise ConfigError(
                "handshake_timeout", self.handshake_timeout, f"must be at least {MIN_WAIT}"
            )
        if self.stall_timeout < MIN_WAIT:
            raise ConfigError(
                "stall_timeout",
                self.stall_timeout,
                f"must be at least {MIN_WAIT.total_seconds() * 1e3:g} ms (backends read shorter "
                "waits as none)",
            )
        if self.max_state_bytes <= 0:
            raise ConfigError("max_state_bytes", self.max_state_bytes, "must be positive")
        if self.max_alloc_bytes is not None and self.max_alloc_bytes <= 0:
            raise ConfigError("max_alloc_bytes", self.max_alloc_bytes, "must be positive")
        if self.max_manifest_bytes < 1024:
            raise ConfigError("max_manifest_bytes", self.max_manifest_bytes, "must be >= 1024")
