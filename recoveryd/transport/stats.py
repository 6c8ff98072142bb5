"""What a transfer did: bytes, messages and time, for logs, metrics and benchmarks."""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
import xxhash


@dataclass(frozen=True, slots=True)
class TransferStats:
    """Counters of one side of one transfer.

    Attributes:
        role: ``"donor"`` (the side that sends) or ``"joiner"`` (a side that receives).
        payload_bytes: tensor bytes the state carries (each shared storage once).
        bytes_sent: bytes this rank put on the wire (payload, forwards, control).
        bytes_received: bytes this rank took off the wire.
        messages: point-to-point operations this rank issued.
        manifest_bytes: size of the encoded manifest.
        seconds: wall time of the call.
        phases: seconds spent in each phase, in order. Donor: ``plan``
            (walk the state, build the manifest), ``handshake`` (manifest out,
            joiners' verdicts in), ``data``, ``confirm`` (trailer out,
            joiners' confirmations in). Joiner: ``manifest`` (wait for
            and parse it), ``prepare`` (validate, match or allocate),
            ``handshake``, ``data``, ``verify``.
    """

    role: Literal["donor", "joiner"]
    payload_bytes: int
    bytes_sent: int
    bytes_received: int
    messages: int
    manifest_bytes: int
    seconds: float
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def wire_bytes(self) -> int:
        """Bytes this rank moved in either direction."""
        return self.bytes_sent + self.bytes_received

    @property
    def gbps(self) -> float:
        """Payload throughput in GB/s (10^9 bytes per second)."""
        return self.payload_bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


class PhaseClock:
    """Splits a call's wall time into named phases."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self._last = self.start
        self.phases: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        """Ends ``phase`` now."""
        now = time.perf_counter()
        self.phases[phase] = now - self._last
        self._last = now

    def total(self) -> float:
        """Seconds since the clock started."""
        return time.perf_counter() - self.start


@dataclass(frozen=True, slots=True)
class ReceivedState:
    """The outcome of a receive.

    Attributes:
        state_dict: the received state_dict. In place, its tensors are the
            joiner's own tensor objects, now holding the donor's values; its
            containers and non-tensor values are the donor's.
        step: the step the donor sent, or ``None`` if it sent none.
        stats: the receive's counters.
    """

    state_dict: object
    step: int | None
    stats: TransferStats


def checksum(buf: torch.Tensor) -> int:
    """xxh3-64 of a contiguous CPU uint8 tensor, as a signed int64 (as it travels)."""
    n = buf.numel()
    if n == 0:
        h = xxhash.xxh3_64_intdigest(b"")
    else:
        h = xxhash.xxh3_64_intdigest((ctypes.c_char * n).from_address(buf.data_ptr()))
    return h - (1 << 64) if h >= 1 << 63 else h
