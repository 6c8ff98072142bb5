"""``recoveryd agent``: the agent as its own process next to the trainer (a sidecar).

It listens on a Unix socket. A trainer rank attaches (:func:`recoveryd.attach`)
and shares its live tensors (see :mod:`recoveryd.sidecar.share`); the sidecar
then runs the same agent core as the in-process :class:`recoveryd.Agent` over
those tensors: registration and heartbeats, the transfer groups, donor sends
at the trainer's step boundaries, and recovery straight into the trainer's
memory. One sidecar serves any number of attached ranks, each on its own
connection (:mod:`recoveryd.sidecar.session`), and outlives them: a trainer
that crashes is noticed at once (its socket closes), reported unhealthy to
the coordinator, and its state is dropped, never served again; the restarted
trainer attaches anew and recovers through the normal plan.

The socket is guarded (see :mod:`recoveryd.sidecar.trust`): only processes
of the sidecar's uid (or allowed ones) are served, at most ``max_sessions``
at once, each must present the attach token within ``attach_timeout``, and a
live rank is never taken from the process that holds it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import threading
from datetime import timedelta

import torch
from prometheus_client import CollectorRegistry

from recoveryd._time import Backoff, Deadline
from recoveryd.errors import (
    ConfigError,
    LimitExceededError,
    PermissionDeniedError,
    RecoverydError,
    error_to_fields,
)
from recoveryd.metrics import AgentMetrics, MetricsServer
from recoveryd.sidecar import frames, trust, wire
from recoveryd.sidecar.config import SidecarConfig
from recoveryd.sidecar.session import Session
from recoveryd.sidecar.share import raise_nofile_limit

__all__ = ["Sidecar", "SidecarConfig"]

logger = logging.getLogger(__name__)

_REPLACE_TIMEOUT = timedelta(seconds=10)
"""How long a new attachment waits for the older session of the same rank to end."""
_ACCEPT_PAUSE = (timedelta(milliseconds=50), timedelta(milliseconds=200))
"""The pauses (first, longest) while ``accept`` fails for want of resources: short,
as descriptors come back as soon as a session ends; long enough not to spin."""
_ACCEPT_LOG_EVERY_S = 5.0
_ACCEPT_SHORT_OF = {
    errno.EMFILE: "this process is out of file descriptors: raise its limit (ulimit -n, "
    "RLIMIT_NOFILE) or lower RECOVERYD_SIDECAR_MAX_SESSIONS",
    errno.ENFILE: "the host is out of file descriptors (fs.file-max)",
    errno.ENOBUFS: "the host is short of memory for sockets",
    errno.ENOMEM: "the host is short of memory",
}
"""The failures of ``accept`` that pass (the sidecar serves its attached ranks on)."""


class Sidecar:
    """Serves attached trainer ranks until :meth:`close`.

    Args:
        config: where to listen, which coordinator to use, who may attach.

    Raises:
        ConfigError: the socket is taken by a live sidecar, or the token file
            cannot be read (or written).
    """

    def __init__(self, config: SidecarConfig) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        self.metrics = AgentMetrics(
            self.registry, backends=("gloo", "nccl") if torch.cuda.is_available() else ("gloo",)
        )
        self.uids = frozenset({os.getuid(), *config.allowed_uids})
        """The uids whose processes may connect."""
        raise_nofile_limit()  # one descriptor per mapped storage of every attached rank
        _remove_stale_socket(config.socket_path)
        # The token first: once the socket exists, a trainer may read it.
        self._token = trust.ensure_token(config.token_path, generate=not config.token_file)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(config.socket_path)
            os.chmod(config.socket_path, 0o660)  # the pod's containers share a group, not the world
            self._listener.listen(64)
        except OSError:
            self._listener.close()
            self._remove_token()
            raise
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._sessions: dict[int, Session] = {}
        self._threads: list[threading.Thread] = []
        self._throttle = trust.Throttle()
        self._accept_throttle = trust.Throttle(every_s=_ACCEPT_LOG_EVERY_S)
        self._metrics_server = (
            MetricsServer(self.registry, port=config.metrics_port)
            if config.metrics_port is not None
            else None
        )
        logger.info(
            "sidecar agent on %s (coordinator %s%s); uids %s may attach with the token in %s",
            config.socket_path,
            config.coordinator,
            f", metrics on :{self._metrics_server.port}" if self._metrics_server else "",
            sorted(self.uids),
            config.token_path,
        )

    @property
    def metrics_port(self) -> int | None:
        """The port ``/metrics`` (every attached rank's transfers) is served on, or ``None``."""
        return self._metrics_server.port if self._metrics_server is not None else None

    @property
    def stopping(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._stop.is_set()

    def attached(self) -> int:
        """How many trainer ranks are attached now."""
        with self._lock:
            return sum(1 for s in self._sessions.values() if s.agent is not None)

    def sessions(self) -> int:
        """How many connections are served now (attached, or still attaching)."""
        with self._lock:
            return len(self._sessions)

    def token(self) -> str:
        """The attach token (a configured file is read again, so a rotated one takes effect)."""
        if self.config.token_file:
            try:
                self._token = trust.read_token(self.config.token_file, what="token_file")
            except ConfigError as err:
                self._throttle.warning("token", "keeping the attach token read before: %s", err)
        return self._token

    def serve_forever(self) -> None:
        """Accepts trainers until :meth:`close` (from another thread or a signal).

        An ``accept`` that fails for want of descriptors or memory (a flood of
        connections, a host under pressure) is logged, at most once per reason
        every few seconds, and tried again after a short pause: the attached
        ranks are served on meanwhile, never dropped with the accept loop.
        """
        self._listener.settimeout(0.2)
        n = 0
        pause = Backoff(*_ACCEPT_PAUSE)
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as err:
                if self._stop.is_set():
                    return
                if err.errno == errno.ECONNABORTED:  # a peer that left before it was accepted
                    continue
                if err.errno not in _ACCEPT_SHORT_OF:
                    raise
                self._short_of(err, pause.next())
                continue
            pause.reset()
            conn.settimeout(None)
            try:
                peer = trust.peer_of(conn)
            except OSError as err:
                logger.warning("closed a connection whose peer is unknown: %s", err)
                conn.close()
                continue
            if peer.uid not in self.uids:
                self._refuse(conn, peer, "uid", self._uid_error(peer))
                continue
            with self._lock:
                full = len(self._sessions) >= self.config.max_sessions
                if not full:
                    n += 1
                    session = Session(self, conn, n, peer)
                    self._sessions[n] = session
            if full:
                over = LimitExceededError(
                    "RECOVERYD_SIDECAR_MAX_SESSIONS",
                    self.config.max_sessions + 1,
                    self.config.max_sessions,
                    what=f"connections to the sidecar at {self.config.socket_path}",
                )
                self._refuse(conn, peer, "limit", over)
                continue
            self._threads = [t for t in self._threads if t.is_alive()]
            t = threading.Thread(target=session.run, name=f"recoveryd-session-{n}", daemon=True)
            try:
                t.start()
            except RuntimeError as err:  # no thread to be had now: as short of resources
                self.ended(session)
                self._refuse(conn, peer, "thread", err)
                continue
            self._threads.append(t)

    def _short_of(self, err: OSError, pause: timedelta) -> None:
        """Logs an ``accept`` that failed for want of resources (throttled), and pauses."""
        name = errno.errorcode.get(err.errno or 0, str(err.errno))
        self._accept_throttle.warning(
            name,
            "cannot accept a connection on %s (%s: %s): %s; the attached ranks are served on, "
            "and accepting resumes in %.0f ms",
            self.config.socket_path,
            name,
            err.strerror,
            _ACCEPT_SHORT_OF[err.errno or 0],
            pause.total_seconds() * 1000,
        )
        self._stop.wait(pause.total_seconds())

    def close(self, timeout: timedelta = timedelta(seconds=10)) -> None:
        """Stops accepting, detaches every trainer (reported unhealthy), stops serving."""
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            sessions = list(self._sessions.values())
        for s in sessions:
            s.shutdown()
        deadline = Deadline(timeout)
        for t in self._threads:
            t.join(deadline.remaining_s())
        with contextlib.suppress(OSError):
            os.unlink(self.config.socket_path)
        self._remove_token()
        if self._metrics_server is not None:
            self._metrics_server.close()
            self._metrics_server = None

    def _remove_token(self) -> None:
        if not self.config.token_file:  # only the token it made itself
            with contextlib.suppress(OSError):
                os.unlink(self.config.token_path)

    def _uid_error(self, peer: trust.Peer) -> ConfigError:
        return ConfigError(
            "uid",
            peer.uid,
            f"the sidecar at {self.config.socket_path} serves processes of uid "
            f"{' or '.join(map(str, sorted(self.uids)))} only: run the trainer as one of them, "
            "or add its uid to the sidecar's allowed_uids (RECOVERYD_SIDECAR_ALLOWED_UIDS)",
        )

    def _refuse(self, conn: socket.socket, peer: trust.Peer, reason: str, err: Exception) -> None:
        """Closes a connection that gets no session, saying why (to the log, and to the peer
        if its socket takes the reply at once); it holds nothing of the sidecar's."""
        self._throttle.warning(
            reason,
            "refused a connection from pid %d (uid %d, gid %d): %s",
            peer.pid,
            peer.uid,
            peer.gid,
            err,
        )
        wire.send_nowait(conn, frames.encode(frames.Failed(error=error_to_fields(err))))
        conn.close()
        peer.close()

    def ended(self, session: Session) -> None:
        """Forgets a session that ended (its slot is free)."""
        with self._lock:
            self._sessions.pop(session.n, None)

    def claim(self, new: Session, replica_id: str, group_rank: int, secret: str) -> None:
        """Makes ``new`` the holder of a rank.

        The rank's live holder keeps it, unless ``new`` proves it replaces it
        (``secret`` is the holder's: the same trainer process attaching again)
        or the holder's process is gone (its socket closed, or the process
        has exited while something else keeps its socket open); that holder's
        session is then ended, and awaited a while.

        Raises:
            PermissionDeniedError: a live process holds the rank.
        """
        identity = (replica_id, group_rank)
        with self._lock:
            old = next(
                (s for s in self._sessions.values() if s is not new and s.identity == identity),
                None,
            )
            if old is not None:
                why = old.replaceable_by(secret)
                if why is None:
                    raise PermissionDeniedError(replica_id, group_rank, old.held_by())
                old.identity = None
            new.identity = identity  # from now on, a third attach finds this one
        if old is None:
            return
        logger.warning("%s attached again (%s): ending its older session", old.who, why)
        old.shutdown()
        deadline = Deadline(_REPLACE_TIMEOUT)
        while not deadline.expired:
            with self._lock:
                if old.n not in self._sessions:
                    return
            deadline.sleep(timedelta(milliseconds=50))
        logger.warning("%s: its older session did not end within %s", new.who, _REPLACE_TIMEOUT)

    def refuse_attach(self, session: Session, err: RecoverydError) -> None:
        """Logs a refused attach (throttled: a peer may retry in a loop)."""
        self._throttle.warning(
            f"attach:{type(err).__name__}",
            "refused the attach of pid %d (uid %d): %s",
            session.peer.pid,
            session.peer.uid,
            err,
        )


def _remove_stale_socket(path: str) -> None:
    """Removes a socket file left by a dead sidecar; refuses to replace a live one."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError("socket_path", path, "exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # nobody listens: a leftover
        return
    except OSError as err:  # e.g. another user's: leave it alone
        raise ConfigError("socket_path", path, f"exists and cannot be probed ({err})") from err
    finally:
        probe.close()
    raise ConfigError("socket_path", path, "another sidecar is listening on it")
