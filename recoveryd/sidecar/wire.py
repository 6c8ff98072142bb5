"""Frames between a trainer and its sidecar agent over a Unix socket: bytes and descriptors.

A frame is a JSON header (one of :mod:`recoveryd.sidecar.frames`) and an optional binary
payload (a manifest), with file descriptors alongside (``SCM_RIGHTS``): the
shared-memory segments of the trainer's tensors. Tensor bytes never cross the
socket, and nothing on it is ever unpickled. Every receive has a deadline.
"""

from __future__ import annotations

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
MAX_HEADER_BYTES = 16 << 20
MAX_PAYLOAD_BYTES = 1 << 30


class WireError(RecoverydError, ConnectionError):
    """The peer closed the socket, sent a malformed frame, or did not answer in time."""


@dataclass(slots=True)
class Frame:
    """One message: its header, payload and the descriptors that came with it."""

    header: dict[str, Any]
    payload: bytes = b""
    fds: list[int] = field(default_factory=list)

    @property
    def op(self) -> str:
        return str(self.header.get("op", ""))


def send(
    sock: socket.socket, header: dict[str, Any], payload: bytes = b"", fds: Sequence[int] = ()
) -> None:
    """Sends one frame; descriptors go in chunks of :data:`MAX_FDS_PER_FRAME`.

    More descriptors than one message carries follow in ``fds`` frames, which
    :func:`recv` gathers before it returns the frame they belong to.
    """
    fds = list(fds)
    first, rest = fds[:MAX_FDS_PER_FRAME], fds[MAX_FDS_PER_FRAME:]
    body = json.dumps({**header, "nfds": len(fds)}).encode()
    data = _PREFIX.pack(len(body), len(payload)) + body + payload
    try:
        sent = socket.send_fds(sock, [data], first) if first else sock.send(data)
        if sent < len(data):
            sock.sendall(data[sent:])
        while rest:
            chunk, rest = rest[:MAX_FDS_PER_FRAME], rest[MAX_FDS_PER_FRAME:]
            extra = json.dumps({"op": "fds", "nfds": len(chunk)}).encode()
            more = _PREFIX.pack(len(extra), 0) + extra
            n = socket.send_fds(sock, [more], chunk)
            if n < len(more):
                sock.sendall(more[n:])
    except (OSError, ValueError) as err:
        raise WireError(f"send failed: {err}") from err


def recv(sock: socket.socket, *, deadline: Deadline) -> Frame:
    """Receives one frame before ``deadline``.

    Raises:
        WireError: the peer closed the socket (``str(err)`` starts with
            ``closed``), the deadline passed, or the frame is malformed.
    """
    fds: list[int] = []
    try:
        prefix = _read(sock, _PREFIX.size, deadline, fds)
        hlen, plen = _PREFIX.unpack(prefix)
        if hlen > MAX_HEADER_BYTES or plen > MAX_PAYLOAD_BYTES:
            raise WireError(f"frame too large ({hlen} + {plen} bytes)")
        header = json.loads(_read(sock, hlen, deadline, fds))
        payload = _read(sock, plen, deadline, fds) if plen else b""
        if not isinstance(header, dict):
            raise WireError("frame header is not an object")
        want = int(header.pop("nfds", 0))
        while len(fds) < want:
            more = recv(sock, deadline=deadline)
            if more.op != "fds":
                close_all(more.fds)
                raise WireError(f"expected descriptors, got {more.op!r}")
            fds += more.fds
    except WireError:
        close_all(fds)
        raise
    except ValueError as err:  # bad JSON, a bad count
        close_all(fds)
        raise WireError(f"malformed frame: {err}") from err
    if len(fds) != want:
        close_all(fds)
        raise WireError(f"expected {want} descriptors, got {len(fds)}")
    return Frame(header, payload, fds)


def _read(sock: socket.socket, n: int, deadline: Deadline, fds: list[int]) -> bytes:
    chunks: list[bytes] = []
    left = n
    while left:
        if deadline.expired:
            raise WireError(f"no answer within the deadline ({n - left} of {n} bytes)")
        if not readable(sock, min(deadline.remaining_s(), 1.0)):
            continue
        try:
            data, got, _flags, _addr = socket.recv_fds(sock, left, MAX_FDS_PER_FRAME)
        except (OSError, ValueError) as err:
            raise WireError(f"closed: {err}") from err
        fds += got
        if not data:
            raise WireError("closed by the peer")
        chunks.append(data)
        left -= len(data)
    return b"".join(chunks)


def readable(sock: socket.socket, wait_s: float) -> bool:
    """Whether ``sock`` has data or a hang-up within ``wait_s`` (``poll``: any descriptor number)."""
    p = select.poll()
    p.register(sock, select.POLLIN | select.POLLRDHUP | select.POLLHUP | select.POLLERR)
    try:
        return bool(p.poll(max(0, int(wait_s * 1000))))
    except (OSError, ValueError) as err:
        raise WireError(f"closed: {err}") from err


def hung_up(sock: socket.socket) -> bool:
    """Whether the peer closed its end (checked without waiting or consuming data)."""
    p = select.poll()
    p.register(sock, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
    try:
        return bool(p.poll(0))
    except (OSError, ValueError):
        return True


def close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
