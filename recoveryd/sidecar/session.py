"""One connection to a sidecar: the attach, checked step by step, then the rank's requests.

A connection starts untrusted. Its first frame must be an :class:`~frames.Attach`
of at most 64 KiB, with no descriptors, within ``attach_timeout``; the
sidecar checks the frames version, the token (:mod:`recoveryd.sidecar.admission`),
and that the rank is free (:meth:`recoveryd.sidecar.server.Sidecar.claim`) before it answers
:class:`~frames.Admitted` and takes the state the attach announced, at that
size and no larger. A refused attach is answered (the trainer raises the
error) and the connection closed. Once attached, every request is again a
small frame; a state (a refresh) is announced first and taken at its size;
a session silent for ``idle_timeout`` is ended, and so is one that does not
take a reply within :data:`REQUEST_TIMEOUT` (or ``idle_timeout``, if shorter):
a trainer stopped in the middle of a reply is as gone as a silent one.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Protocol

import torch

from recoveryd._time import Deadline
from recoveryd.agent.agent import Agent
from recoveryd.agent.config import AgentConfig
from recoveryd.errors import (
    ConfigError,
    LimitExceededError,
    ManifestError,
    RecoverydError,
    error_to_fields,
)
from recoveryd.metrics import AgentMetrics
from recoveryd.protocol import Report
from recoveryd.sidecar import admission, frames, trust, wire
from recoveryd.sidecar.config import SidecarConfig
from recoveryd.sidecar.share import SharedState
from recoveryd.transport.tree import describe

logger = logging.getLogger(__name__)

REQUEST_TIMEOUT = timedelta(seconds=30)
"""How long the rest of a request may take to arrive once it started, and
the longest a reply may take to be taken (a Recovered one carries the
manifest, often megabytes)."""


class Host(Protocol):
    """What a session needs of its sidecar (:class:`recoveryd.sidecar.server.Sidecar`)."""

    config: SidecarConfig
    metrics: AgentMetrics

    @property
    def metrics_port(self) -> int | None: ...

    @property
    def stopping(self) -> bool: ...

    def token(self) -> str: ...

    def claim(self, new: Session, replica_id: str, group_rank: int, secret: str) -> None: ...

    def refuse_attach(self, session: Session, err: RecoverydError) -> None: ...

    def ended(self, session: Session) -> None: ...


class Session:
    """One connection: its peer, and once attached, the rank's shared state and agent."""

    def __init__(self, sidecar: Host, conn: socket.socket, n: int, peer: trust.Peer) -> None:
        self.sidecar = sidecar
        self.conn = conn
        self.n = n
        self.peer = peer
        self.agent: Agent | None = None
        self.shared = SharedState(require_sealed=sidecar.config.require_sealed)
        self.state: object = None
        self.who = f"session {n} (pid {peer.pid})"
        self.identity: tuple[str, int] | None = None
        self.secret = secrets.token_urlsafe(32)
        """Proof for a later attach of the same rank (the holder's process keeps it)."""
        self._since = time.monotonic()
        self._max_frame_bytes = sidecar.config.max_frame_bytes
        self._reply_timeout = min(REQUEST_TIMEOUT, sidecar.config.idle_timeout)
        self._ending = False  # the state went bad: end the session after this reply
        self._had_agent = False

    def shutdown(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.shutdown(socket.SHUT_RDWR)

    def replaceable_by(self, secret: str) -> str | None:
        """Why an attach presenting ``secret`` may take this session's rank (``None``: it may not)."""
        if trust.same_secret(secret, self.secret):
            return "by the process that holds it"
        if wire.hung_up(self.conn):
            return "its trainer closed the connection"
        if self.peer.gone():
            return f"its trainer, pid {self.peer.pid}, has exited"
        return None

    def held_by(self) -> str:
        """Who holds this session's rank, and what an attach that wants it must do."""
        return (
            f"a live trainer (pid {self.peer.pid}, uid {self.peer.uid}) holds it through this "
            f"sidecar (attached {time.monotonic() - self._since:.0f} s ago). A second attach "
            "takes it only from that same process (attach presents the attachment's secret) "
            "or once that process has exited: stop that trainer first, or attach another rank"
        )

    def run(self) -> None:
        clean = False
        try:
            if self._attach():
                clean = self._serve()
        except wire.WireError as err:
            logger.warning("%s: trainer gone (%s): dropping its state", self.who, err)
        except Exception:
            logger.exception("%s: failed", self.who)
        finally:
            self._end(clean)

    # ---- attaching ----------------------------------------------------------------

    def _attach(self) -> bool:
        """The attach, within ``attach_timeout`` from the connection; whether it succeeded."""
        deadline = Deadline(self.sidecar.config.attach_timeout)
        try:
            f = wire.recv(self.conn, deadline=deadline, limits=admission.CONTROL)
        except wire.FrameTooLargeError as err:
            self._refuse(
                LimitExceededError(
                    "attach frame",
                    err.size,
                    err.limit,
                    what=f"the {err.what} of an attach (taken before its token is checked: "
                    "an attach announces its state, which follows once admitted)",
                )
            )
            return False
        except wire.MalformedFrameError as err:
            self._refuse(err)
            return False
        except wire.WireError as err:  # throttled: a local process may connect in a loop
            why = wire.WireError(f"no attach within {deadline.timeout} ({err}): closed")
            self.sidecar.refuse_attach(self, why)
            return False
        try:
            request, limits = self._admit(f)
        except RecoverydError as err:
            self._refuse(err)
            return False
        finally:
            wire.close_all(f.fds)
        self._send(frames.Admitted(max_frame_bytes=self._max_frame_bytes))
        g = wire.recv(self.conn, deadline=deadline, limits=limits)
        try:
            try:
                state = frames.decode_request(g.header)
                if not isinstance(state, frames.State):
                    raise ConfigError("op", state.OP, "an attach is followed by its state")
                self._share(state.layout, g)
            finally:
                wire.close_all(g.fds)
            agent = self._start_agent(request)
        except Exception as err:  # refused: a state that cannot be served, an identity
            self._refuse(_as_error(err, self.who, "attach"))
            return False
        self._send(
            frames.Attached(
                agent_id=agent.agent_id,
                rendezvous=agent.rendezvous,
                metrics_address=self._metrics_address(),
                secret=self.secret,
                idle_timeout_s=self.sidecar.config.idle_timeout.total_seconds(),
            )
        )
        return True

    def _admit(self, f: wire.Frame) -> tuple[frames.Attach, wire.Limits]:
        """The attach a first frame carries, if it may attach (the rank is then claimed),
        and the limits of the state it announced."""
        cfg = self.sidecar.config
        request = admission.check_attach(f, cfg, self.sidecar.token())
        self.who = f"{request.replica_id}/{request.group_rank}"
        limits = admission.state_limits(request.state, self.who, cfg.max_frame_bytes)
        self.sidecar.claim(self, request.replica_id, request.group_rank, request.secret)
        return request, limits

    def _refuse(self, err: RecoverydError) -> None:
        """Answers a refused attach (the trainer raises ``err``); the connection then closes."""
        self.sidecar.refuse_attach(self, err)
        with contextlib.suppress(wire.WireError):
            self._send(frames.Failed(error=error_to_fields(err)))

    def _send(self, reply: frames.Reply, payload: bytes = b"") -> None:
        """Sends a reply, which the trainer must take within the reply timeout.

        Raises:
            WireError: it did not (the session then ends as a dead trainer's does).
        """
        wire.send(self.conn, frames.encode(reply), payload, deadline=Deadline(self._reply_timeout))

    def _start_agent(self, request: frames.Attach) -> Agent:
        cfg = self.sidecar.config
        self._had_agent = True
        self.agent = agent = Agent(
            AgentConfig(
                coordinator=cfg.coordinator,
                replica_id=request.replica_id,
                group_rank=request.group_rank,
                group_world_size=request.group_world_size,
                labels=dict(request.labels),
                host=cfg.host,
                rendezvous_port=0,
                heartbeat_interval=cfg.heartbeat_interval,
                rendezvous_timeout=cfg.rendezvous_timeout,
                metrics_port=None,
                credentials=cfg.credentials,
            ),
            lambda: self.state,
            metrics=self.sidecar.metrics,
        )
        self._since = time.monotonic()
        logger.info("%s attached (pid %d, uid %d)", self.who, self.peer.pid, self.peer.uid)
        return agent

    def _metrics_address(self) -> str | None:
        port = self.sidecar.metrics_port
        return f"{self.agent.host}:{port}" if port is not None and self.agent else None

    # ---- serving --------------------------------------------------------------------

    def _serve(self) -> bool:
        """Serves requests until the trainer detaches (``True``) or goes (``False``)."""
        idle_s = self.sidecar.config.idle_timeout.total_seconds()
        last = time.monotonic()
        while not self.sidecar.stopping:
            if not wire.readable(self.conn, 0.5):
                if time.monotonic() - last > idle_s:
                    logger.warning(
                        "%s: silent for %.0f s (idle_timeout; a live attachment pings): "
                        "ending its session",
                        self.who,
                        idle_s,
                    )
                    return False
                continue
            frame = wire.recv(
                self.conn, deadline=Deadline(REQUEST_TIMEOUT), limits=admission.CONTROL
            )
            request, reply, payload = self._handle(frame)
            self._send(reply, payload)
            last = time.monotonic()
            if self._ending:
                return False
            if isinstance(request, frames.Close) and not isinstance(reply, frames.Failed):
                return True
        return False

    def _end(self, clean: bool) -> None:
        if self.agent is not None:
            # A trainer that went without saying goodbye may have died in the
            # middle of an update: its state must never be served again.
            self.agent.close(unhealthy=not clean)
            self.agent = None
        self.state = None
        self.shared.close()
        self.peer.close()
        with contextlib.suppress(OSError):
            self.conn.close()
        self.sidecar.ended(self)
        if self._had_agent:  # not for every connection that never attached: a flood costs little
            gc.collect()  # the agent's store, groups and threads sit in reference cycles

    @contextlib.contextmanager
    def _watching(self, agent: Agent) -> Iterator[None]:
        """While a long request runs (recover, park), a trainer that dies ends it:
        its agent is closed as unhealthy rather than serving or receiving on."""
        done = threading.Event()

        def watch() -> None:
            while not done.wait(0.2):
                if wire.hung_up(self.conn):
                    logger.warning("%s: trainer gone during a request: closing its agent", self.who)
                    agent.close(unhealthy=True)
                    return

        t = threading.Thread(target=watch, name=f"recoveryd-watch-{self.n}", daemon=True)
        t.start()
        try:
            yield
        finally:
            done.set()
            t.join(1)

    def _sync(self) -> None:
        """Lets GPU copies into or out of the trainer's memory finish before it goes on."""
        if self.shared.cuda:
            torch.cuda.synchronize()

    def _handle(self, f: wire.Frame) -> tuple[frames.Request | None, frames.Reply, bytes]:
        """The request a frame carries, and the reply to it (a failure is a ``Failed``)."""
        request: frames.Request | None = None
        try:
            request = frames.decode_request(f.header)
            reply, payload = self._dispatch(request)
            return request, reply, payload
        except wire.MalformedFrameError as err:  # read whole: answered, and the session goes on
            return request, frames.Failed(error=error_to_fields(err)), b""
        except wire.WireError:
            raise  # the peer went, or the stream broke (a state that did not come whole)
        except Exception as err:
            # A failed recovery says how far it went: plans may have written into the state.
            record = (
                self.agent.last_recovery
                if isinstance(request, frames.Recover) and self.agent is not None
                else None
            )
            error = _as_error(err, self.who, f.op)
            return request, frames.Failed(error=error_to_fields(error), record=record), b""
        finally:
            wire.close_all(f.fds)
            f.fds = []

    def _dispatch(self, request: frames.Request) -> tuple[frames.Reply, bytes]:
        agent = self.agent
        if agent is None:
            raise ConfigError("op", request.OP, "attach first")
        if isinstance(request, frames.Step | frames.Park | frames.Recover):
            self._check_memory()
        match request:
            case frames.Ping():
                return frames.Done(), b""
            case frames.Refresh(state=size):
                self._refresh(size)
                agent.refresh()
                return frames.Done(), b""
            case frames.Recover(timeout_s=timeout_s):
                with self._watching(agent):
                    step = agent.recover(self.state, timeout=timedelta(seconds=timeout_s))
                self._sync()
                record = agent.last_recovery
                assert record is not None
                values = describe(self.state).manifest.SerializeToString()
                return frames.Recovered(step=step, record=record), values
            case frames.Step(step=step, fresh=fresh):
                last = agent.sends[-1] if agent.sends else None
                # Never send on the first ask: the trainer refreshes (values, new
                # tensors) and asks again with `fresh`, held until the send is done.
                if agent.step(step, send=fresh) and not fresh:
                    return frames.Stepped(due=True), b""
                self._sync()
                return frames.Stepped(due=False, sends=_since(agent, last)), b""
            case frames.Park(timeout_s=timeout_s):
                last = agent.sends[-1] if agent.sends else None
                with self._watching(agent):
                    agent.park(timedelta(seconds=timeout_s))
                self._sync()
                return frames.Parked(sends=_since(agent, last)), b""
            case frames.Close(timeout_s=timeout_s):
                # The trainer detached on purpose: the rank leaves.
                agent.close(timedelta(seconds=timeout_s))
                self.agent = None
                return frames.Done(), b""
            case frames.Attach():
                raise ConfigError("attach", self.who, "this connection is attached")
        raise ConfigError("op", request.OP, "not a request a sidecar serves here")

    def _refresh(self, size: frames.StateSize) -> None:
        """Takes the state a refresh announced, at that size (a refresh past the limits
        ends the session: its state is on the way and the stream cannot be read past it)."""
        try:
            limits = admission.state_limits(size, self.who, self.sidecar.config.max_frame_bytes)
        except RecoverydError:
            self._ending = True
            raise
        g = wire.recv(self.conn, deadline=Deadline(REQUEST_TIMEOUT), limits=limits)
        try:
            state = frames.decode_request(g.header)
            if not isinstance(state, frames.State):
                self._ending = True
                raise ConfigError("op", state.OP, "a refresh is followed by its state")
            self._share(state.layout, g)
        finally:
            wire.close_all(g.fds)

    def _check_memory(self) -> None:
        try:
            self.shared.check_whole()
        except ManifestError:
            self._ending = True
            raise

    def _share(self, layout: frames.SharedLayout, f: wire.Frame) -> None:
        fds, f.fds = f.fds, []
        self.shared.update(layout, fds)
        self.state = self.shared.state(f.payload, layout.spans)


def _as_error(err: Exception, who: str, op: str) -> RecoverydError:
    """``err`` as the trainer gets it (an unexpected one is logged whole here)."""
    if not isinstance(err, RecoverydError | ValueError | TypeError):
        logger.exception("%s: %s failed", who, op)
    if isinstance(err, RecoverydError):
        return err
    return RecoverydError(f"sidecar: {type(err).__name__}: {err}")


def _since(agent: Agent, last: object) -> tuple[Report, ...]:
    """The agent's send reports newer than ``last``."""
    sends = list(agent.sends)
    start = 0  # ``last`` gone from the bounded deque: every report there is newer
    for i in range(len(sends) - 1, -1, -1):
        if sends[i] is last:
            start = i + 1
            break
    return tuple(sends[start:])
