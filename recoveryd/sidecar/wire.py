"""Frames between a trainer and its sidecar agent over a Unix socket: bytes and descriptors.

A frame is a JSON header (one of :mod:`recoveryd.sidecar.frames`) and an optional binary
payload (a manifest), with file descriptors alongside (``SCM_RIGHTS``): the
shared-memory segments of the trainer's tensors. Tensor bytes never cross the
socket, and nothing on it is ever unpickled. Every receive has a deadline and
:class:`Limits`: the sizes and the descriptor count the receiver accepts for
that frame, checked from the frame's 8-byte prefix before anything is
allocated, so a peer cannot make the receiver hold more than it agreed to.
The header and payload are read straight into buffers of their final size
(never gathered in chunks and joined, which held every byte twice).
Descriptors are taken only as many as the frame may carry (the kernel drops
the rest) and every one is closed again on any failure. A header nested
deeper than :data:`MAX_HEADER_DEPTH` is refused before it is parsed. Every
send has a deadline too: a peer that stops reading cannot hold the sender.
"""

from __future__ import annotations

import array
import json
import os
import select
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from recoveryd._time import Deadline
from recoveryd.errors import RecoverydError

_PREFIX = struct.Struct("!II")  # header bytes, payload bytes
MAX_FDS_PER_FRAME = 250
"""The kernel passes at most 253 descriptors per message (``SCM_MAX_FD``)."""
_SCM_MAX_FD = 253
_FD_BYTES = array.array("i").itemsize
MAX_HEADER_DEPTH = 32
"""How deep a header's arrays and objects may nest (ours, a few levels): parsing
recurses once per level, and a 64 KiB header of ``[[[...`` would otherwise
exhaust the interpreter's recursion limit (a ``RecursionError``, not a bad frame)."""
_NOT_QUOTE_OR_BRACKET = bytes(c for c in range(256) if c not in b'"[]{}')
_BRACES_AS_BRACKETS = bytes.maketrans(b"{}", b"[]")
_FDS_HEADER_BYTES = 64
"""The header of a frame that only carries more descriptors (``{"op": "fds", "nfds": N}``)."""


@dataclass(frozen=True, slots=True)
class Limits:
    """What a receiver accepts in one frame (a frame past them is refused unread)."""

    header_bytes: int
    payload_bytes: int = 0
    fds: int = 0


class WireError(RecoverydError, ConnectionError):
    """The peer closed the socket, sent a malformed frame, or did not answer in time."""


class MalformedFrameError(WireError):
    """A whole frame was read, but it is not one the receiver understands (the stream goes on)."""


class FrameTooLargeError(WireError):
    """A frame past the receiver's :class:`Limits` (refused before it is read).

    Attributes:
        what: ``header bytes``, ``payload bytes`` or ``descriptors``.
        size: what the frame carries.
        limit: what the receiver accepts.
    """

    def __init__(self, what: str, size: int, limit: int) -> None:
        super().__init__(f"frame too large: {size} {what} over the limit of {limit}")
        self.what = what
        self.size = size
        self.limit = limit


@dataclass(slots=True)
class Frame:
    """One message: its header, payload and the descriptors that came with it."""

    header: dict[str, Any]
    payload: bytes | bytearray = b""
    fds: list[int] = field(default_factory=list)

    @property
    def op(self) -> str:
        return str(self.header.get("op", ""))


def pack(header: dict[str, Any], nfds: int = 0) -> bytes:
    """The encoded header of a frame with ``nfds`` descriptors (:func:`send` takes it as is)."""
    return json.dumps({**header, "nfds": nfds}).encode()


def send(
    sock: socket.socket,
    header: dict[str, Any] | bytes,
    payload: bytes | bytearray = b"",
    fds: Sequence[int] = (),
    *,
    deadline: Deadline,
) -> None:
    """Sends one frame before ``deadline``; descriptors go in chunks of :data:`MAX_FDS_PER_FRAME`.

    ``header`` is a header, or one :func:`pack` encoded (with ``len(fds)``).
    More descriptors than one message carries follow in ``fds`` frames, which
    :func:`recv` gathers before it returns the frame they belong to. The
    socket is written without blocking and waited on while full, so a peer
    that stops reading holds the sender until ``deadline`` at most.

    Raises:
        WireError: the peer closed the socket, or did not take the frame
            before ``deadline`` (the stream cannot be used any more).
    """
    fds = list(fds)
    first, rest = fds[:MAX_FDS_PER_FRAME], fds[MAX_FDS_PER_FRAME:]
    body = header if isinstance(header, bytes) else pack(header, len(fds))
    try:
        _write(sock, [_PREFIX.pack(len(body), len(payload)) + body, payload], first, deadline)
        while rest:
            chunk, rest = rest[:MAX_FDS_PER_FRAME], rest[MAX_FDS_PER_FRAME:]
            extra = pack({"op": "fds"}, len(chunk))
            _write(sock, [_PREFIX.pack(len(extra), 0) + extra], chunk, deadline)
    except (OSError, ValueError) as err:
        raise WireError(f"send failed: {err}") from err


def _write(
    sock: socket.socket, parts: list[bytes | bytearray], fds: list[int], deadline: Deadline
) -> None:
    """Writes ``parts`` (``fds`` with their first byte), resuming partial writes."""
    views = [memoryview(p) for p in parts if len(p)]
    total = sum(len(v) for v in views)
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sent = 0
    while views:
        try:
            n = sock.sendmsg(views, ancillary, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except BlockingIOError:
            n = 0
        if n:
            ancillary = []  # they went with the first byte taken
            sent += n
            while n:
                if n < len(views[0]):
                    views[0] = views[0][n:]
                    break
                n -= len(views.pop(0))
            continue
        if deadline.expired:
            raise WireError(
                f"the peer took {sent} of {total} bytes within {deadline.timeout}: it stopped "
                "reading (stopped or wedged)"
            )
        _wait(sock, select.POLLOUT, min(deadline.remaining_s(), 1.0))


def send_nowait(sock: socket.socket, header: dict[str, Any]) -> None:
    """Sends a small frame if the socket takes it at once, else nothing (a refusal's reason)."""
    body = pack(header)
    try:
        sock.setblocking(False)
        sock.send(_PREFIX.pack(len(body), 0) + body)
    except OSError:
        pass


def recv(sock: socket.socket, *, deadline: Deadline, limits: Limits) -> Frame:
    """Receives one frame before ``deadline``, within ``limits``.

    Descriptors past ``limits.fds`` end the read as soon as they arrive (the
    kernel takes at most one more than the frame may carry from a message, and
    drops the rest); every descriptor received is closed again on any failure.

    Raises:
        FrameTooLargeError: the frame is past ``limits`` (nothing of it was read
            past its prefix, or past the message that brought one descriptor
            too many; the stream cannot be used any more).
        MalformedFrameError: the frame's header is not a JSON object nested at
            most :data:`MAX_HEADER_DEPTH` deep (the frame was read whole).
        WireError: the peer closed the socket (``str(err)`` starts with
            ``closed``), or the deadline passed.
    """
    fds: list[int] = []
    try:
        prefix = _read(sock, _PREFIX.size, deadline, fds, limits.fds)
        hlen, plen = _PREFIX.unpack(prefix)
        if hlen > limits.header_bytes:
            raise FrameTooLargeError("header bytes", hlen, limits.header_bytes)
        if plen > limits.payload_bytes:
            raise FrameTooLargeError("payload bytes", plen, limits.payload_bytes)
        raw = _read(sock, hlen, deadline, fds, limits.fds)
        payload = _read(sock, plen, deadline, fds, limits.fds) if plen else b""
        header, want = _parse(raw)  # once the whole frame is in: a bad one leaves the stream usable
        if want > limits.fds:
            raise FrameTooLargeError("descriptors", want, limits.fds)
        while len(fds) < want:
            more = recv(
                sock,
                deadline=deadline,
                limits=Limits(header_bytes=_FDS_HEADER_BYTES, fds=want - len(fds)),
            )
            if more.op != "fds":
                close_all(more.fds)
                raise WireError(f"expected descriptors, got {more.op!r}")
            fds += more.fds
        if len(fds) != want:
            raise WireError(f"expected {want} descriptors, got {len(fds)}")
    except BaseException:  # whatever broke the read, the descriptors it took go back
        close_all(fds)
        raise
    return Frame(header, payload, fds)


def _parse(raw: bytearray) -> tuple[dict[str, Any], int]:
    """A header, and the count of descriptors it says come with it."""
    try:
        text = raw.decode()
        if _nests_deeper(raw, MAX_HEADER_DEPTH):
            raise MalformedFrameError(
                f"malformed frame: its header nests deeper than {MAX_HEADER_DEPTH} levels, "
                "or its brackets do not balance"
            )
        header = json.loads(text)
        if not isinstance(header, dict):
            raise MalformedFrameError("malformed frame: its header is not an object")
        return header, int(header.pop("nfds", 0))
    except (ValueError, TypeError, OverflowError, RecursionError) as err:  # JSON, a bad count
        raise MalformedFrameError(f"malformed frame: {err}") from err


def _nests_deeper(raw: bytes | bytearray, depth: int) -> bool:
    """Whether the JSON in ``raw`` nests deeper than ``depth`` (or its brackets do not balance).

    Found without recursion, each step a pass in C: the strings go first,
    without parsing them (escaped backslashes, then escaped quotes, as JSON
    pairs them from the left; then everything but quotes and brackets; then
    the empty strings, most of them; then whatever the remaining quotes
    enclose); then, objects and arrays alike, each round takes out the
    innermost pairs. A mismatched ``[}`` is left for the parser to refuse.
    """
    rest = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    rest = rest.translate(None, _NOT_QUOTE_OR_BRACKET).replace(b'""', b"")
    brackets = b"".join(rest.split(b'"')[::2]).translate(_BRACES_AS_BRACKETS)
    for _ in range(depth):
        if not brackets:
            return False
        inner = brackets.replace(b"[]", b"")
        if len(inner) == len(brackets):
            return True
        brackets = inner
    return bool(brackets)


def _read(
    sock: socket.socket, n: int, deadline: Deadline, fds: list[int], max_fds: int
) -> bytearray:
    """``n`` bytes, read in place; descriptors that come along are appended to ``fds``
    (past ``max_fds`` in all, :class:`FrameTooLargeError`)."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        if deadline.expired:
            raise WireError(f"no answer within the deadline ({got} of {n} bytes)")
        if not readable(sock, min(deadline.remaining_s(), 1.0)):
            continue
        # Room for one descriptor past the limit, so that a message over it is
        # seen as such; the kernel closes what does not fit.
        room = min(max_fds - len(fds) + 1, _SCM_MAX_FD)
        try:
            k, ancillary, flags, _ = sock.recvmsg_into(
                [view[got:]], socket.CMSG_SPACE(room * _FD_BYTES), socket.MSG_CMSG_CLOEXEC
            )
        except (OSError, ValueError) as err:
            raise WireError(f"closed: {err}") from err
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got_fds = array.array("i")
                got_fds.frombytes(data[: len(data) - len(data) % _FD_BYTES])
                fds += got_fds
        if len(fds) > max_fds:
            raise FrameTooLargeError("descriptors", len(fds), max_fds)
        if flags & socket.MSG_CTRUNC:
            raise WireError(
                "descriptors cut short (more than a message may carry, or this process is out "
                "of descriptors): the stream is cut"
            )
        if not k:
            raise WireError("closed by the peer")
        got += k
    return buf


def readable(sock: socket.socket, wait_s: float) -> bool:
    """Whether ``sock`` has data or a hang-up within ``wait_s`` (``poll``: any descriptor number)."""
    return _wait(sock, select.POLLIN | select.POLLRDHUP, wait_s)


def _wait(sock: socket.socket, events: int, wait_s: float) -> bool:
    """Whether ``events`` (or a hang-up, an error) come on ``sock`` within ``wait_s``."""
    p = select.poll()
    try:
        p.register(sock, events | select.POLLHUP | select.POLLERR)
        return bool(p.poll(max(0, int(wait_s * 1000))))
    except (OSError, ValueError) as err:
        raise WireError(f"closed: {err}") from err


def hung_up(sock: socket.socket) -> bool:
    """Whether the peer closed its end (checked without waiting or consuming data)."""
    p = select.poll()
    try:  # a socket closed here (its number is -1) is as gone
        p.register(sock, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
        return bool(p.poll(0))
    except (OSError, ValueError):
        return True


def close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
