"""Who may attach to a sidecar: the peer's uid, the attach token, and whether a peer still lives.

Three checks stand between a local process and a trainer's rank:

- The kernel's word on who connected (``SO_PEERCRED``): the peer must run as
  the sidecar's uid or one it was told to allow. Anything else is closed
  before it is read from, and counts toward nothing.
- The attach token: a secret in a file (:func:`ensure_token`) that the peer
  must read and present. Unless one is configured, the sidecar makes one
  at start and writes it next to its socket, mode 0600, so a trainer of the
  same uid that can reach the socket can read it, and other users cannot.
- The rank's holder: a second attach of a live rank must come from the
  process that holds it (it presents the attachment's secret) or find that
  process gone (:class:`Peer.gone`), so a stray attach never evicts the real
  trainer.

A process of the sidecar's own uid can signal or trace the sidecar anyway:
these checks keep other users out and keep a buggy trainer from hurting the
ranks of another, not a hostile process of the same uid.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import secrets
import select
import socket
import struct
import tempfile
import threading
import time
from dataclasses import dataclass, field

from recoveryd.errors import ConfigError

logger = logging.getLogger(__name__)

TOKEN_SUFFIX = ".token"
"""The generated token's file: the socket's path with this suffix."""
MIN_TOKEN_CHARS = 16
"""A token shorter than this is refused as too easy to guess."""
MAX_TOKEN_CHARS = 4096
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(slots=True)
class Peer:
    """The process at the other end of a connection, as the kernel saw it connect.

    ``pid`` is 0 when the peer is in a PID namespace this process cannot see
    (e.g. another container without a shared process namespace).
    """

    pid: int
    uid: int
    gid: int
    pidfd: int | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def gone(self) -> bool | None:
        """Whether the peer process has exited (``None``: cannot tell)."""
        with self._lock:  # never poll a descriptor that close() let go (its number is reused)
            if self.pidfd is not None:
                p = select.poll()
                p.register(self.pidfd, select.POLLIN)
                return bool(p.poll(0))  # a pidfd turns readable when its process exits
        if self.pid <= 0:
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def close(self) -> None:
        """Lets go of the process handle."""
        with self._lock:
            if self.pidfd is not None:
                with contextlib.suppress(OSError):
                    os.close(self.pidfd)
                self.pidfd = None


def peer_of(conn: socket.socket) -> Peer:
    """Who connected (``SO_PEERCRED``), with a handle on the process where one can be had.

    The handle (a pidfd) is taken at once, while the peer is connected, so
    "that process has exited" later cannot be fooled by a reused pid.
    """
    pid, uid, gid = _CRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    pidfd = None
    if pid > 0 and hasattr(os, "pidfd_open"):
        with contextlib.suppress(OSError):
            pidfd = os.pidfd_open(pid)
    return Peer(pid=pid, uid=uid, gid=gid, pidfd=pidfd)


def default_token_file(socket_path: str) -> str:
    """Where the sidecar writes its generated token, and trainers look for it."""
    return socket_path + TOKEN_SUFFIX


def ensure_token(path: str, *, generate: bool) -> str:
    """The attach token: read from ``path``, or (``generate``) a new one written there.

    A generated token replaces the file at once (a temporary file in the same
    directory, mode 0600, renamed over it: a link planted there is replaced,
    never followed), so a trainer never reads half a token.

    Raises:
        ConfigError: the file cannot be written, or read, or holds no valid token.
    """
    if not generate:
        return read_token(path, what="token_file")
    token = secrets.token_urlsafe(32)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".recoveryd-token-", dir=directory)
    except OSError as err:
        raise ConfigError("token_file", path, f"cannot be written: {err.strerror}") from None
    try:
        with os.fdopen(fd, "w") as fh:  # mkstemp made it 0600
            fh.write(token + "\n")
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise ConfigError("token_file", path, f"cannot be written: {err.strerror}") from None
    return token


def read_token(path: str, *, what: str) -> str:
    """The token in ``path`` (its first line).

    Raises:
        ConfigError: (naming ``what``) the file cannot be read or holds no valid token.
    """
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_TOKEN_CHARS + 2)
    except OSError as err:
        raise ConfigError(what, path, f"cannot be read: {err.strerror}") from None
    lines = raw.decode("utf-8", "replace").splitlines()
    token = lines[0].strip() if lines else ""
    if not MIN_TOKEN_CHARS <= len(token) <= MAX_TOKEN_CHARS or not token.isprintable():
        raise ConfigError(
            what,
            path,
            f"its first line must be a token of {MIN_TOKEN_CHARS} to {MAX_TOKEN_CHARS} "
            "printable characters",
        )
    return token


def same_secret(given: str, expected: str) -> bool:
    """Whether two secrets are equal, in time that does not depend on where they differ."""
    return bool(expected) and hmac.compare_digest(given.encode(), expected.encode())


class Throttle:
    """At most one log line per reason a second, so a peer connecting in a loop cannot
    flood the log; the lines left out are counted in the next one."""

    def __init__(self, every_s: float = 1.0) -> None:
        self._every_s = every_s
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._dropped: dict[str, int] = {}

    def warning(self, reason: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(reason, -self._every_s) < self._every_s:
                self._dropped[reason] = self._dropped.get(reason, 0) + 1
                return
            self._last[reason] = now
            dropped = self._dropped.pop(reason, 0)
        suffix = f" ({dropped} more like it not logged)" if dropped else ""
        logger.warning(msg + "%s", *args, suffix)
