"""Knobs of the data plane, as one frozen dataclass."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal

from recoveryd._time import MIN_WAIT, env_bool, env_choice, env_int, env_seconds
from recoveryd.errors import ConfigError

_MiB = 1 << 20


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
        default_factory=lambda: _bytes("RECOVERYD_MAX_MANIFEST_BYTES", 256 * _MiB)
    )
    """Largest manifest a joiner accepts (``RECOVERYD_MAX_MANIFEST_BYTES``)."""

    max_state_bytes: int = field(
        default_factory=lambda: _bytes("RECOVERYD_MAX_STATE_BYTES", _physical_memory())
    )
    """Largest state a joiner accepts (``RECOVERYD_MAX_STATE_BYTES``, default: physical memory).

    A manifest announcing more is refused before anything is allocated.
    """

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

    def __post_init__(self) -> None:
        if self.bucket_bytes < 4096:
            raise ConfigError("bucket_bytes", self.bucket_bytes, "must be at least 4096")
        if self.direct_bytes <= 0:
            raise ConfigError("direct_bytes", self.direct_bytes, "must be positive")
        if self.fanout not in ("chain", "star"):
            raise ConfigError("fanout", self.fanout, "must be 'chain' or 'star'")
        if self.stall_timeout < MIN_WAIT:
            raise ConfigError(
                "stall_timeout",
                self.stall_timeout,
                f"must be at least {MIN_WAIT.total_seconds() * 1e3:g} ms (backends read shorter "
                "waits as none)",
            )
        if self.max_state_bytes <= 0:
            raise ConfigError("max_state_bytes", self.max_state_bytes, "must be positive")
        if self.max_manifest_bytes < 1024:
            raise ConfigError("max_manifest_bytes", self.max_manifest_bytes, "must be >= 1024")
