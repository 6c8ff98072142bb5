"""The trainer's end of the sidecar's socket: one exchange at a time, under a deadline, kept alive.

A :class:`Channel` connects (waiting for a sidecar that starts after the
trainer), sends a request and reads its reply, raising a ``Failed`` reply as
the error it carries and a broken socket as one :class:`SidecarLostError`.
While the trainer does not call, a thread pings the sidecar every quarter of
its ``idle_timeout`` (:meth:`Channel.keep_alive`), so no gap between steps
ends the session; a sidecar found gone by a ping is raised at the trainer's
next call. This module also keeps what a trainer process holds: the secret
of each of its live attachments (presented when the same process attaches
the same rank again) and the token it reads from the sidecar's token file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import weakref
from datetime import timedelta
from typing import TypeVar

from recoveryd._time import Deadline
from recoveryd.agent.interface import RecoveryRecord
from recoveryd.errors import ConfigError, RecoverydError, SidecarLostError, error_from_fields
from recoveryd.sidecar import frames, trust, wire

logger = logging.getLogger(__name__)

_R = TypeVar("_R", bound=frames.Reply)
_REPLY_HEADER_BYTES = 16 << 20
"""The largest reply header read (an error naming every mismatching tensor fits)."""
_MIN_REPLY_PAYLOAD_BYTES = 1 << 20
_REFUSAL_WAIT = timedelta(seconds=1)
"""How long a send that failed waits for the reason the sidecar gave before it closed."""
_SECRETS: dict[tuple[str, str, int], tuple[int, str]] = {}
"""This process's live attachments: (socket, replica, rank) -> (pid, secret)."""
_SECRETS_LOCK = threading.Lock()


class Channel:
    """A connection to the sidecar at ``path``.

    Args:
        path: the sidecar's socket.
        timeout: how long to wait for it to accept, and for each quick request.
    """

    def __init__(self, path: str, timeout: timedelta) -> None:
        self.path = path
        self.timeout = timeout
        self.max_frame_bytes = 256 << 20
        """The largest state the sidecar takes (it says so when it admits the attach)."""
        self.lost: SidecarLostError | None = None
        """Why the sidecar is gone, once it is."""
        self.unraised: SidecarLostError | None = None
        """The sidecar found gone by a ping, for the trainer's next call to raise."""
        self.record: RecoveryRecord | None = None
        """The recovery record a failed request came back with."""
        self._lock = threading.Lock()  # one exchange on the socket at a time
        self._closing = threading.Event()
        self._last_call = time.monotonic()
        self._sock = self._connect()

    def call(
        self,
        request: frames.Request | bytes,
        expect: type[_R],
        payload: bytes = b"",
        fds: list[int] | None = None,
        *,
        deadline: timedelta | None = None,
        then: tuple[bytes, bytes, list[int]] | None = None,
    ) -> tuple[_R, bytes | bytearray]:
        """One request and its reply (of type ``expect``).

        Args:
            request: the request, or a state packed by :func:`wire.pack`.
            expect: the reply's type.
            payload: the request's payload.
            fds: descriptors sent with it.
            deadline: how long the reply may take (default: ``timeout``).
            then: a state frame (packed header, manifest, descriptors) sent
                right after the request.

        Raises:
            SidecarLostError: the socket broke (every later call raises it too).
            RecoverydError: the error the sidecar answered with, as raised there.
        """
        with self._lock:
            try:
                return self._exchange(request, expect, payload, fds, deadline=deadline, then=then)
            finally:
                self._last_call = time.monotonic()

    def keep_alive(self, every: timedelta) -> None:
        """Pings the sidecar whenever the trainer has not called for ``every``, until :meth:`close`."""
        threading.Thread(
            target=_ping,
            args=(weakref.ref(self), self._closing, every.total_seconds()),
            name="recoveryd-attach-ping",
            daemon=True,
        ).start()

    def close(self) -> None:
        """Closes the socket (the sidecar ends the session) and stops the pings."""
        self._closing.set()
        self.lost = self.lost or SidecarLostError(self.path, "closed")
        self._sock.close()

    def _connect(self) -> socket.socket:
        deadline = Deadline(self.timeout)
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.path)
                return sock
            except OSError as err:
                sock.close()
                if deadline.expired:
                    raise SidecarLostError(self.path, f"cannot connect: {err}") from err
                deadline.sleep(timedelta(seconds=0.1))

    def _ping_if_idle(self, every_s: float) -> bool:
        """Pings if the trainer has not called for ``every_s``; whether to go on pinging."""
        if self.lost is not None:
            return False
        if time.monotonic() - self._last_call < every_s or not self._lock.acquire(blocking=False):
            return True  # called recently, or now: the sidecar knows the trainer lives
        try:
            self._exchange(frames.Ping(), frames.Done)
        except SidecarLostError as err:
            self.unraised = err
            return False
        except RecoverydError as err:
            logger.warning("the sidecar at %s refused a ping: %s", self.path, err)
        finally:
            self._last_call = time.monotonic()
            self._lock.release()
        return True

    def _exchange(
        self,
        request: frames.Request | bytes,
        expect: type[_R],
        payload: bytes = b"",
        fds: list[int] | None = None,
        *,
        deadline: timedelta | None = None,
        then: tuple[bytes, bytes, list[int]] | None = None,
    ) -> tuple[_R, bytes | bytearray]:
        op = "state" if isinstance(request, bytes) else request.OP
        limits = wire.Limits(
            header_bytes=_REPLY_HEADER_BYTES,
            payload_bytes=max(self.max_frame_bytes, _MIN_REPLY_PAYLOAD_BYTES),
        )
        try:
            wait = deadline or self.timeout
            try:
                header = request if isinstance(request, bytes) else frames.encode(request)
                # The sidecar reads a request as it comes: one that stops reading is gone.
                sending = Deadline(self.timeout)
                wire.send(self._sock, header, payload, fds or [], deadline=sending)
                if then is not None:
                    wire.send(self._sock, *then, deadline=sending)
            except wire.WireError:
                wait = _REFUSAL_WAIT  # refused at once (uid, limit)? It said why before closing
            frame = wire.recv(self._sock, deadline=Deadline(wait), limits=limits)
            try:
                reply = frames.decode_reply(frame.header)
            except wire.WireError as err:
                raise wire.WireError(
                    f"its answer to {op} is not one this trainer reads ({err}): run the "
                    "same recoveryd version in the trainer and in its sidecar"
                ) from err
        except wire.WireError as err:
            self.lost = SidecarLostError(self.path, str(err))
            logger.error("%s", self.lost)
            # Closing tells the sidecar at once: it reports the rank unhealthy
            # and drops the state, instead of serving it on after a timeout.
            with contextlib.suppress(OSError):
                self._sock.close()
            raise self.lost from err
        if isinstance(reply, frames.Failed):
            self.record = reply.record
            try:
                error = error_from_fields(reply.error)
            except ValueError as err:
                raise RecoverydError(f"the sidecar failed {op}: {err}") from None
            raise error
        if not isinstance(reply, expect):
            raise RecoverydError(
                f"the sidecar answered {op} with {reply.OP}, not {expect.OP}: "
                "run the same recoveryd version in the trainer and the sidecar"
            )
        return reply, frame.payload


def _ping(ref: weakref.ref[Channel], closing: threading.Event, every_s: float) -> None:
    while not closing.wait(every_s):
        channel = ref()
        if channel is None or not channel._ping_if_idle(every_s):
            return
        del channel  # not held between pings: a channel dropped without close() can go


def read_token(token_file: str, socket_path: str) -> str:
    """The attach token a trainer presents to the sidecar at ``socket_path``.

    Raises:
        ConfigError: the file cannot be read; the message says where the sidecar keeps it.
    """
    try:
        return trust.read_token(token_file, what="token_file")
    except ConfigError as err:
        why = str(err).split(": ", 1)[-1]
        raise ConfigError(
            "token_file",
            token_file,
            f"{why}; the sidecar at {socket_path} takes attaches with its token only: it "
            f"writes a new one to {trust.default_token_file(socket_path)} (mode 0600) when it "
            "starts, unless it was given a token file (RECOVERYD_SIDECAR_TOKEN_FILE). Run the "
            "trainer as the sidecar's uid, or give both the same token file "
            "(attach(token_file=...) / RECOVERYD_SIDECAR_TOKEN_FILE)",
        ) from None


def held_secret(key: tuple[str, str, int]) -> str:
    """The secret of this process's live attachment of a rank ("" if it holds none)."""
    with _SECRETS_LOCK:
        held = _SECRETS.get(key)
    return held[1] if held is not None and held[0] == os.getpid() else ""


def hold_secret(key: tuple[str, str, int], secret: str) -> None:
    """Remembers this process's attachment of a rank."""
    with _SECRETS_LOCK:
        _SECRETS[key] = (os.getpid(), secret)


def drop_secret(key: tuple[str, str, int], secret: str) -> None:
    """Forgets an attachment (unless a newer one of the same rank replaced it)."""
    with _SECRETS_LOCK:
        if _SECRETS.get(key) == (os.getpid(), secret):
            del _SECRETS[key]
