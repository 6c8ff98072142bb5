"""The interface every benchmarked transport implements, and what a rank hands it.

An :class:`Adapter` drives one transport on one rank: ``send`` on the donor (rank 0),
``recv`` on the joiner (rank 1). ``recv`` gets ``into=None`` for an allocating receive or the
joiner's preexisting state_dict for an in-place one; a transport without an in-place API
receives into new tensors and copies them over (:func:`copy_into`), inside the timed region,
and says so through ``native_in_place = False``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ClassVar

import torch
from torch.utils._pytree import tree_flatten_with_path

from bench._measure import CountingProcessGroup, SocketByteCounter
from bench._workloads import StateDict


@dataclass(kw_only=True, slots=True)
class Env:
    """What a rank gives its adapter."""

    rank: int
    """0 = donor, 1 = joiner."""
    pg: CountingProcessGroup
    """The explicit ProcessGroupGloo, wrapped so point-to-point bytes are counted."""
    store: Any
    """The pair's PrefixStore (over the harness's TCPStore), for side-band strings."""
    timeout: timedelta
    """Deadline for any single transfer call."""
    sockets: SocketByteCounter
    """Counts HTTP bytes; installed only by adapters that use sockets."""
    logical_bytes: int
    """Sum of the workload's tensor nbytes (the raw anchors' buffer size)."""


@dataclass(kw_only=True, slots=True)
class WireCount:
    """Bytes this rank put on / took off the wire during one transfer, as the harness saw them."""

    sent_bytes: int
    recv_bytes: int
    messages: int
    source: str
    """``pg`` (CountingProcessGroup send/recv) or ``http`` (socket file bytes)."""
    uncounted_calls: dict[str, int]
    """ProcessGroup calls other than send/recv (bytes moved there are not in the counts)."""


class Adapter(ABC):
    """Drives one transport on one rank."""

    name: ClassVar[str]
    native_in_place: ClassVar[bool] = True

    def __init__(self) -> None:
        self._env: Env | None = None

    @property
    def env(self) -> Env:
        """The rank's environment (set by :meth:`open`)."""
        if self._env is None:
            raise RuntimeError(f"{self.name}: open() was not called")
        return self._env

    def open(self, env: Env) -> None:
        """Called once per process before the first transfer."""
        self._env = env

    def ready(self, state_dict: StateDict | None, into: StateDict | None) -> None:  # noqa: B027
        """Called once, after :meth:`open` and before the first (timed) transfer, with the
        donor's state or the joiner's template: what a transport does when its group forms."""

    @abstractmethod
    def send(self, state_dict: StateDict, step: int) -> dict[str, Any]:
        """Sends ``state_dict`` to rank 1; returns transport-reported extras (may be empty)."""

    @abstractmethod
    def recv(self, into: StateDict | None, step: int) -> tuple[StateDict, dict[str, Any]]:
        """Receives from rank 0 (into ``into`` when given); returns (state_dict, extras)."""

    def wire(self) -> WireCount:
        """Bytes moved since the last reset of the counters."""
        pg = self.env.pg
        return WireCount(
            sent_bytes=pg.sent_bytes,
            recv_bytes=pg.recv_bytes,
            messages=pg.sends + pg.recvs,
            source="pg",
            uncounted_calls=dict(pg.other_calls),
        )

    def reset_counters(self) -> None:
        """Zeroes the wire counters before a transfer."""
        self.env.pg.reset()
        self.env.sockets.reset()

    def close(self) -> None:  # noqa: B027 -- optional hook; most adapters hold nothing
        """Called once per process after the last transfer."""


def copy_into(into: StateDict, got: StateDict) -> StateDict:
    """Copies every tensor leaf of ``got`` into the same path of ``into``; returns ``into``."""
    src = dict(tree_flatten_with_path(got)[0])
    for path, dst in tree_flatten_with_path(into)[0]:
        if isinstance(dst, torch.Tensor):
            value = src[path]
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"received a {type(value).__name__} where a tensor was expected")
            dst.copy_(value)
    return into
