"""Deadline-bounded point-to-point messaging over a ProcessGroup.

Every wait here takes what is left of one deadline that the caller's timeout
set, and every backend failure becomes a :class:`TransferTimeoutError` or a
:class:`PeerLostError` naming the peer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Protocol

import torch

from recoveryd._time import Deadline
from recoveryd.errors import PeerLostError, TransferError, TransferTimeoutError

# Gloo raises RuntimeError subclasses whose text is all we get to tell a
# deadline from a dead peer.
_TIMEOUT_HINTS = ("timed out", "timeout", "deadline")
_WATCH_S = 0.1
"""How often a watched wait asks whether the transfer is still wanted."""


class Group(Protocol):
    """What the transport needs of a process group: its rank, size and point-to-point ops.

    torch's ProcessGroup and Gloo/NCCL backends and torchft's process groups
    all qualify.
    """

    def rank(self) -> int: ...

    def size(self) -> int: ...

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int, /) -> Any: ...

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int, /) -> Any: ...


def group_rank(pg: Group) -> int:
    """This rank in ``pg``, asked at call time (torchft reconfigures its groups)."""
    # torchft's ProcessGroupWrapper reports rank 0 itself; its live inner group knows.
    parent = getattr(pg, "parent", None)
    if parent is not None and callable(getattr(parent, "rank", None)):
        return int(parent.rank())
    return int(pg.rank())


class Wire:
    """Point-to-point messages on ``pg`` with one deadline.

    Args:
        pg: the process group; never the default group's identity is assumed.
        device: where message buffers live (``cpu`` for Gloo, ``cuda`` for NCCL).
        deadline: the transfer's deadline.
    """

    def __init__(self, pg: Group, device: torch.device, deadline: Deadline) -> None:
        self.pg = pg
        self.device = device
        self.deadline = deadline
        self.bytes_sent = 0
        self.bytes_received = 0
        self.messages = 0
        self.stall: timedelta | None = None
        """Once set, no single wait lasts longer (the bytes are flowing)."""
        self.abandoned: Callable[[], bool] | None = None
        """While set, asked every 0.1 s during a wait; ``True`` ends the wait with a
        :class:`TransferError` at once (the plan was dropped: nobody will answer).
        A Gloo wait cannot be cut short without breaking the pair, so the backend's
        wait goes on in a thread until its own timeout, on a group that is then
        abandoned anyway."""
        self.peer_gone: Callable[[], bool] | None = None
        """While set, asked every 0.1 s during a wait; ``True`` ends the wait with a
        :class:`PeerLostError` at once (a probe outside the group saw the peer die:
        Gloo does not always wake a receive whose peer was killed)."""
        # Posted operations not yet waited for, by id of their work. If the
        # transfer fails, the backend may still write into or read from their
        # buffers later, so those must outlive it (see abandon()).
        self._outstanding: dict[int, tuple[Any, torch.Tensor]] = {}

    def isend(self, t: torch.Tensor, dst: int, tag: int) -> Any:
        self.bytes_sent += t.numel() * t.element_size()
        self.messages += 1
        try:
            work = self.pg.send([t], dst, tag)
        except RuntimeError as e:
            self.abandon()
            raise _translate(e, dst, self.deadline) from e
        self._outstanding[id(work)] = (work, t)
        return work

    def irecv(self, t: torch.Tensor, src: int, tag: int) -> Any:
        self.bytes_received += t.numel() * t.element_size()
        self.messages += 1
        try:
            work = self.pg.recv([t], src, tag)
        except RuntimeError as e:
            self.abandon()
            raise _translate(e, src, self.deadline) from e
        self._outstanding[id(work)] = (work, t)
        return work

    def wait(self, work: Any, peer: int, cap: timedelta | None = None) -> None:
        """Waits for ``work`` within the deadline (and within ``cap``, if given)."""
        stalled = False
        if self.deadline.expired:
            self.abandon()
            raise TransferTimeoutError(
                f"timed out: the transfer did not finish within {self.deadline.timeout}",
                peer_rank=peer,
            )
        left = self.deadline.remaining()
        if cap is not None:
            left = min(left, cap)
        if self.stall is not None and self.stall < left:
            left, stalled = self.stall, True
        try:
            watched = self.abandoned is not None or self.peer_gone is not None
            ok = self._watched(work, left, peer) if watched else work.wait(left)
        except _Gone:
            self.abandon()
            raise PeerLostError(
                f"lost rank {peer}: it is gone (seen outside the group, e.g. its agent's "
                "store reset the connection); the process group must be rebuilt",
                peer_rank=peer,
            ) from None
        except _Abandoned:
            self.abandon()
            raise TransferError(
                f"the transfer was abandoned while waiting for rank {peer} (its plan was "
                "cancelled or the peer left it)",
                peer_rank=peer,
            ) from None
        except RuntimeError as e:
            self.abandon()
            err = _translate(e, peer, self.deadline)
            if stalled and isinstance(err, TransferTimeoutError):
                raise self._stalled(peer) from e
            raise err from e
        if ok is False:
            self.abandon()
            if stalled:
                raise self._stalled(peer)
            raise TransferTimeoutError(
                f"timed out: rank {peer} did not answer within {self.deadline.timeout}",
                peer_rank=peer,
            )
        self._outstanding.pop(id(work), None)

    def _watched(self, work: Any, left: timedelta, peer: int) -> Any:
        """``work.wait(left)`` in a thread, asking :attr:`abandoned` meanwhile."""
        box: list[tuple[bool, Any]] = []

        def run() -> None:
            try:
                box.append((True, work.wait(left)))
            except BaseException as e:  # handed to the waiting thread
                box.append((False, e))

        t = threading.Thread(target=run, name="recoveryd-wait", daemon=True)
        t.start()
        while True:
            t.join(_WATCH_S)
            if box:
                done, value = box[0]
                if done:
                    return value
                raise value
            if self.abandoned is not None and self.abandoned():
                raise _Abandoned
            if self.peer_gone is not None and self.peer_gone():
                raise _Gone

    def _stalled(self, peer: int) -> TransferTimeoutError:
        return TransferTimeoutError(
            f"timed out: no message from or to rank {peer} for {self.stall} while the bytes "
            "were flowing: the peer died or hangs (RECOVERYD_STALL_TIMEOUT bounds this wait)",
            peer_rank=peer,
        )

    def send(self, t: torch.Tensor, dst: int, tag: int) -> None:
        self.wait(self.isend(t, dst, tag), dst)

    def recv(self, t: torch.Tensor, src: int, tag: int) -> None:
        self.wait(self.irecv(t, src, tag), src)

    def send_ints(self, values: list[int], dst: int, tag: int) -> None:
        self.send(torch.tensor(values, dtype=torch.int64, device=self.device), dst, tag)

    def recv_ints(self, n: int, src: int, tag: int, cap: timedelta | None = None) -> list[int]:
        t = torch.zeros(n, dtype=torch.int64, device=self.device)
        self.wait(self.irecv(t, src, tag), src, cap=cap)
        return [int(x) for x in t.tolist()]

    def abandon(self) -> None:
        """Keeps the buffers of every unfinished operation alive as long as the group.

        Called when the transfer fails: an operation the backend still holds
        may complete later, and must not write into freed memory.
        """
        if not self._outstanding:
            return
        parked: list[tuple[Any, torch.Tensor]] = getattr(self.pg, "_recoveryd_orphans", [])
        parked.extend(self._outstanding.values())
        self._outstanding.clear()
        try:
            self.pg._recoveryd_orphans = parked  # type: ignore[attr-defined]
        except AttributeError:
            _UNPARKABLE.extend(parked)  # a group that takes no attributes: keep them for good


class _Abandoned(Exception):
    """A watched wait saw the transfer abandoned."""


class _Gone(Exception):
    """A watched wait saw the peer gone."""


# Orphaned buffers of groups that cannot hold attributes (leaked on purpose).
_UNPARKABLE: list[tuple[Any, torch.Tensor]] = []


def _translate(e: RuntimeError, peer: int, deadline: Deadline) -> Exception:
    text = str(e)
    if any(h in text.lower() for h in _TIMEOUT_HINTS):
        return TransferTimeoutError(
            f"timed out: rank {peer} did not answer within {deadline.timeout}: "
            f"{text.strip()[:300]}",
            peer_rank=peer,
        )
    return PeerLostError(
        f"lost rank {peer} during the transfer: {text.strip()[:300]}; the process group must be "
        "rebuilt before it is used again",
        peer_rank=peer,
    )


def wire_device(pg: Group, device: torch.device | None) -> torch.device:
    """The device message buffers live on: ``device`` if given, else cuda for NCCL groups."""
    if device is not None:
        return device
    name = ""
    for getter in ("_get_backend_name", "name", "getBackendName"):
        fn = getattr(pg, getter, None)
        if fn is not None:
            try:
                name = str(fn())
                break
            except (RuntimeError, NotImplementedError):
                continue
    if "nccl" in name.lower() and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
