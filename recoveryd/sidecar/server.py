"""``recoveryd agent``: the agent as its own process next to the trainer (a sidecar).

It listens on a Unix socket. A trainer rank attaches (:func:`recoveryd.attach`)
and shares its live tensors (see :mod:`recoveryd.sidecar.share`); the sidecar
then runs the same agent core as the in-process :class:`recoveryd.Agent` over
those tensors: registration and heartbeats, the transfer groups, donor sends
at the trainer's step boundaries, and recovery straight into the trainer's
memory. One sidecar serves any number of attached ranks, each on its own
connection, and outlives them: a trainer that crashes is noticed at once (its
socket closes), reported unhealthy to the coordinator, and its state is
dropped, never served again; the restarted trainer attaches anew and
recovers through the normal plan.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import socket
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta

import torch
from prometheus_client import CollectorRegistry

from recoveryd._time import Deadline, env_str
from recoveryd.agent.agent import Agent
from recoveryd.agent.config import AgentConfig
from recoveryd.errors import ConfigError, RecoverydError, error_to_fields
from recoveryd.metrics import AgentMetrics, MetricsServer
from recoveryd.protocol import Report
from recoveryd.sidecar import frames, wire
from recoveryd.sidecar.share import SharedState
from recoveryd.transport.tree import describe

logger = logging.getLogger(__name__)

REQUEST_TIMEOUT = timedelta(seconds=30)
"""How long the rest of a request may take to arrive once it started."""
_REPLACE_TIMEOUT = timedelta(seconds=10)
"""How long a new attachment waits for the older session of the same rank to end."""


@dataclass(frozen=True, kw_only=True, slots=True)
class SidecarConfig:
    """The sidecar's knobs (the ranks' identities come from the trainers that attach)."""

    coordinator: str
    """``host:port`` of the coordinator."""
    socket_path: str
    """The Unix socket trainers attach to (its directory must exist)."""
    metrics_port: int | None = None
    """Serve ``/metrics`` (every attached rank's transfers) on this port; ``None``: off."""
    host: str = field(default_factory=lambda: env_str("RECOVERYD_HOST"))
    """Address peers reach transfers at (empty: the interface that routes to the coordinator)."""
    heartbeat_interval: timedelta = timedelta(seconds=2)
    rendezvous_timeout: timedelta = timedelta(seconds=60)

    def __post_init__(self) -> None:
        if not self.socket_path:
            raise ConfigError("socket_path", self.socket_path, "must be a path")
        parent = os.path.dirname(os.path.abspath(self.socket_path))
        if not os.path.isdir(parent):
            raise ConfigError("socket_path", self.socket_path, f"directory {parent} does not exist")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ConfigError("metrics_port", self.metrics_port, "must be a port number")


class Sidecar:
    """Serves attached trainer ranks until :meth:`close`.

    Args:
        config: where to listen and which coordinator to use.
    """

    def __init__(self, config: SidecarConfig) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        self.metrics = AgentMetrics(
            self.registry, backends=("gloo", "nccl") if torch.cuda.is_available() else ("gloo",)
        )
        _remove_stale_socket(config.socket_path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(config.socket_path)
        os.chmod(config.socket_path, 0o660)  # the pod's containers share a group, not the world
        self._listener.listen(64)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._sessions: dict[int, _Session] = {}
        self._threads: list[threading.Thread] = []
        self._metrics_server = (
            MetricsServer(self.registry, port=config.metrics_port)
            if config.metrics_port is not None
            else None
        )
        logger.info(
            "sidecar agent on %s (coordinator %s%s)",
            config.socket_path,
            config.coordinator,
            f", metrics on :{self._metrics_server.port}" if self._metrics_server else "",
        )

    @property
    def metrics_port(self) -> int | None:
        """The port ``/metrics`` (every attached rank's transfers) is served on, or ``None``."""
        return self._metrics_server.port if self._metrics_server is not None else None

    def attached(self) -> int:
        """How many trainer ranks are attached now."""
        with self._lock:
            return sum(1 for s in self._sessions.values() if s.agent is not None)

    def serve_forever(self) -> None:
        """Accepts trainers until :meth:`close` (from another thread or a signal)."""
        self._listener.settimeout(0.2)
        n = 0
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                raise
            n += 1
            self._threads = [t for t in self._threads if t.is_alive()]
            session = _Session(self, conn, n)
            with self._lock:
                self._sessions[n] = session
            t = threading.Thread(target=session.run, name=f"recoveryd-session-{n}", daemon=True)
            self._threads.append(t)
            t.start()

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
        if self._metrics_server is not None:
            self._metrics_server.close()
            self._metrics_server = None

    def _done(self, n: int) -> None:
        with self._lock:
            self._sessions.pop(n, None)

    def _replace(self, new: _Session, replica_id: str, group_rank: int) -> None:
        """Ends another session attached as the same rank: the newest attachment
        wins (a restarted trainer whose old connection is not cleaned up yet)."""
        with self._lock:
            old = [
                s
                for s in self._sessions.values()
                if s is not new and s.identity == (replica_id, group_rank)
            ]
        for s in old:
            logger.warning("%s attached again: ending its older session", s.who)
            s.shutdown()
        deadline = Deadline(_REPLACE_TIMEOUT)
        while old and not deadline.expired:
            with self._lock:
                old = [s for s in old if s.n in self._sessions]
            deadline.sleep(timedelta(milliseconds=50))
        new.identity = (replica_id, group_rank)


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


class _Session:
    """One attached trainer rank: its connection, shared state and agent."""

    def __init__(self, sidecar: Sidecar, conn: socket.socket, n: int) -> None:
        self.sidecar = sidecar
        self.conn = conn
        self.n = n
        self.agent: Agent | None = None
        self.shared = SharedState()
        self.state: object = None
        self.who = f"session {n}"
        self.identity: tuple[str, int] | None = None

    def shutdown(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.shutdown(socket.SHUT_RDWR)

    def run(self) -> None:
        clean = False
        try:
            while not self.sidecar._stop.is_set():
                if not wire.readable(self.conn, 0.5):
                    continue
                frame = wire.recv(self.conn, deadline=Deadline(REQUEST_TIMEOUT))
                request, reply, payload = self._handle(frame)
                wire.send(self.conn, frames.encode(reply), payload)
                if isinstance(request, frames.Close):
                    clean = True
                    return
        except wire.WireError as err:
            logger.warning("%s: trainer gone (%s): dropping its state", self.who, err)
        except Exception:
            logger.exception("%s: failed", self.who)
        finally:
            self._end(clean)

    def _end(self, clean: bool) -> None:
        if self.agent is not None:
            # A trainer that went without saying goodbye may have died in the
            # middle of an update: its state must never be served again.
            self.agent.close(unhealthy=not clean)
            self.agent = None
        self.state = None
        self.shared.close()
        with contextlib.suppress(OSError):
            self.conn.close()
        self.sidecar._done(self.n)
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
            reply, payload = self._dispatch(request, f)
            return request, reply, payload
        except Exception as err:
            if not isinstance(err, RecoverydError | ValueError | TypeError):
                logger.exception("%s: %s failed", self.who, f.header.get("op"))
            if not isinstance(err, RecoverydError):
                err = RecoverydError(f"sidecar: {type(err).__name__}: {err}")
            # A failed recovery says how far it went: plans may have written into the state.
            record = (
                self.agent.last_recovery
                if isinstance(request, frames.Recover) and self.agent is not None
                else None
            )
            return request, frames.Failed(error=error_to_fields(err), record=record), b""
        finally:
            wire.close_all(f.fds)  # those not taken over by the shared state
            f.fds = []

    def _dispatch(self, request: frames.Request, f: wire.Frame) -> tuple[frames.Reply, bytes]:
        if isinstance(request, frames.Attach):
            return self._attach(request, f), b""
        agent = self.agent
        if agent is None:
            raise ConfigError("op", request.OP, "attach first")
        match request:
            case frames.Refresh(layout=layout):
                self._share(layout, f)
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
        raise ConfigError("op", request.OP, "not a request a sidecar serves")

    def _attach(self, request: frames.Attach, f: wire.Frame) -> frames.Attached:
        if request.version != frames.FRAMES_VERSION:
            raise ConfigError(
                "frames version",
                request.version,
                f"this sidecar speaks version {frames.FRAMES_VERSION}: run the same recoveryd "
                "version in the trainer and in its sidecar",
            )
        if self.agent is not None:
            raise ConfigError("attach", request.replica_id, "this connection is attached")
        self.sidecar._replace(self, request.replica_id, request.group_rank)
        self._share(request.layout, f)
        cfg = self.sidecar.config
        self.agent = Agent(
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
            ),
            lambda: self.state,
            metrics=self.sidecar.metrics,
        )
        self.who = f"{request.replica_id}/{request.group_rank}"
        logger.info("%s attached (pid %d)", self.who, request.pid)
        port = self.sidecar.metrics_port
        return frames.Attached(
            agent_id=self.agent.agent_id,
            rendezvous=self.agent.rendezvous,
            metrics_address=f"{self.agent.host}:{port}" if port is not None else None,
        )

    def _share(self, layout: frames.SharedLayout, f: wire.Frame) -> None:
        fds, f.fds = f.fds, []
        self.shared.update(layout, fds)
        self.state = self.shared.state(f.payload, layout.spans)


def _since(agent: Agent, last: object) -> tuple[Report, ...]:
    """The agent's send reports newer than ``last``."""
    sends = list(agent.sends)
    start = 0  # ``last`` gone from the bounded deque: every report there is newer
    for i in range(len(sends) - 1, -1, -1):
        if sends[i] is last:
            start = i + 1
            break
    return tuple(sends[start:])
