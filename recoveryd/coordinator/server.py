"""The coordinator process: a gRPC server with health and reflection, run in a thread or forever.

``Coordinator(...).start()`` serves from a background thread (tests, the demo,
a trainer that hosts it); ``recoveryd coordinator`` calls :meth:`serve_forever`,
which stops gracefully on SIGTERM/SIGINT: health turns NOT_SERVING, open
streams are cancelled, and in-flight RPCs get ``grace`` to finish.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from recoveryd.coordinator.config import CoordinatorConfig
from recoveryd.coordinator.gate import Gate, check_exposure, server_credentials
from recoveryd.coordinator.service import CoordinatorService
from recoveryd.credentials import Credentials
from recoveryd.errors import ConfigError, RecoverydError
from recoveryd.metrics import CoordinatorMetrics, MetricsServer
from recoveryd.v1 import coordinator_pb2, coordinator_pb2_grpc

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

SERVICE_NAME = coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].full_name
_TICK_S = 0.25
MAX_MESSAGE_BYTES = 1 << 20
"""The largest request the coordinator reads (its biggest honest one, a
heartbeat of 4,096 beats, is ~0.4 MiB)."""
MAX_STREAMS = 1024
"""Concurrent calls per client connection (each rank holds one Watch and at
most a few calls; a process serving many ranks shares one connection)."""


class Coordinator:
    """The recoveryd coordinator.

    Args:
        bind: ``host:port`` to listen on; port 0 picks a free port (see :attr:`address`).
        config: health, fencing and timeout policy.
        metrics_port: serve ``/metrics`` on this port (``None``: not served).
        registry: where the metrics live (default: a new one).
        credentials: what callers must present (a token and/or client
            certificates; see :mod:`recoveryd.credentials`); default none.
        insecure: serve a non-loopback ``bind`` without credentials (refused otherwise).
        health_port: also serve the gRPC health service alone, in plaintext,
            on this port (Kubernetes' gRPC probes speak no TLS); ``None``: not.

    Example::

        with Coordinator("127.0.0.1:0") as coord:
            agent = Agent(AgentConfig(coordinator=coord.address, ...), state_fn)
    """

    def __init__(
        self,
        bind: str = "127.0.0.1:0",
        config: CoordinatorConfig | None = None,
        *,
        metrics_port: int | None = None,
        registry: CollectorRegistry | None = None,
        credentials: Credentials | None = None,
        insecure: bool = False,
        health_port: int | None = None,
    ) -> None:
        host, _, port = bind.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError("bind", bind, "must be HOST:PORT, e.g. 0.0.0.0:29400")
        self.credentials = credentials or Credentials()
        check_exposure(host, self.credentials, insecure=insecure)
        self._server_credentials = server_credentials(self.credentials)
        if health_port is not None and not 0 <= health_port < 65536:
            raise ConfigError("health_port", health_port, "must be a port number")
        self._health_port_asked = health_port
        self.health_port: int | None = None
        """The plaintext health-only port, once started (``None``: not served)."""
        self._bind = bind
        self._host = host
        self.config = config or CoordinatorConfig()
        self._port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._service: CoordinatorService | None = None
        self._stopped: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.registry = registry or CollectorRegistry()
        """Where the coordinator's metrics live (served on ``metrics_port`` when given)."""
        self.metrics = CoordinatorMetrics(self.registry)
        self._metrics_port = metrics_port
        self._metrics_server: MetricsServer | None = None

    @property
    def address(self) -> str:
        """``host:port`` the server listens on (valid once started)."""
        return f"{self._host}:{self._port}"

    @property
    def metrics_address(self) -> str | None:
        """``host:port`` of ``/metrics``, or ``None`` when not served."""
        if self._metrics_server is None:
            return None
        return f"{self._host}:{self._metrics_server.port}"

    @property
    def service(self) -> CoordinatorService:
        """The servicer (its state may only be read from the server's loop)."""
        assert self._service is not None, "start() first"
        return self._service

    async def _serve(self) -> None:
        self._stopped = asyncio.Event()
        gate = Gate(self.credentials)
        self._service = CoordinatorService(
            self.config, metrics=self.metrics, check_identities=gate.requires_certificates()
        )
        server = grpc.aio.server(
            interceptors=[gate],
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.keepalive_time_ms", 20_000),
                ("grpc.http2.max_pings_without_data", 0),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_concurrent_streams", MAX_STREAMS),
            ],
        )
        coordinator_pb2_grpc.add_CoordinatorServicer_to_server(self._service, server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        if self._server_credentials is not None:
            self._port = server.add_secure_port(self._bind, self._server_credentials)
        else:
            self._port = server.add_insecure_port(self._bind)
        if self._port == 0:
            raise RecoverydError(f"could not listen on {self._bind} (address in use?)")
        await server.start()
        self._server = server
        if self._health_port_asked is not None:
            self._health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self._health, self._health_server)
            self.health_port = self._health_server.add_insecure_port(
                f"{self._host}:{self._health_port_asked}"
            )
            if self.health_port == 0:
                raise RecoverydError(f"could not listen on health port {self._health_port_asked}")
            await self._health_server.start()
        await self._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        ticker = asyncio.create_task(self._service.tick_forever(_TICK_S))
        logger.info(
            "coordinator %s serving on %s (credentials: %s)",
            self._service.coordinator_id,
            self.address,
            self.credentials.describe(),
        )
        self._ready.set()
        await self._stopped.wait()  # serves until stop() or a signal: no deadline, by design
        ticker.cancel()
        # Handlers still unwinding (a held long poll) finish here, not in a closed loop.
        # Give them a moment to end on their own (server.stop cancelled their
        # RPCs), then cancel what is left.
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if rest:
            _, pending = await asyncio.wait(rest, timeout=1.0)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _shutdown(self, grace: timedelta) -> None:
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace.total_seconds())
        if self._health_server is not None:
            await self._health_server.stop(0)
        if self._stopped is not None:
            self._stopped.set()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as err:
            self._error = err
            self._ready.set()
        finally:
            loop.close()

    def start(self, timeout: timedelta = timedelta(seconds=30)) -> Coordinator:
        """Serves from a daemon thread; returns once listening.

        Raises:
            RecoverydError: the server did not start (e.g. the port is taken).
        """
        if self._metrics_port is not None:
            self._metrics_server = MetricsServer(
                self.registry, host=self._host, port=self._metrics_port
            )
            logger.info("metrics on http://%s/metrics", self.metrics_address)
        self._thread = threading.Thread(target=self._run, name="recoveryd-coordinator", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout.total_seconds()):
            raise RecoverydError(f"coordinator did not start within {timeout}")
        if self._error is not None:
            raise RecoverydError(f"coordinator failed to start: {self._error}") from self._error
        return self

    def stop(self, grace: timedelta = timedelta(seconds=2)) -> None:
        """Stops serving: NOT_SERVING first, then in-flight RPCs get ``grace``."""
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            fut = asyncio.run_coroutine_threadsafe(self._shutdown(grace), loop)
            fut.result(grace.total_seconds() + 10)
            thread.join(grace.total_seconds() + 10)
        if self._metrics_server is not None:
            self._metrics_server.close()
            self._metrics_server = None

    def serve_forever(self, grace: timedelta = timedelta(seconds=5)) -> None:
        """Serves in this thread until SIGTERM or SIGINT, then shuts down gracefully."""
        done = threading.Event()

        def _on_signal(signum: int, _frame: object) -> None:
            logger.info("signal %d: shutting down (grace %s)", signum, grace)
            done.set()

        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
        # Everything imported so far (torch included) lives as long as the
        # process: keep it out of the collector, whose full passes over it
        # otherwise stall donor decisions by ~150 ms every few calls.
        gc.freeze()
        self.start()
        while not done.wait(0.5):
            if self._thread is not None and not self._thread.is_alive():
                raise RecoverydError(f"coordinator stopped unexpectedly: {self._error}")
        self.stop(grace)

    def call(
        self, fn: Callable[[CoordinatorService], _T], timeout: timedelta = timedelta(seconds=10)
    ) -> _T:
        """Runs ``fn(service)`` on the server's loop and returns its result (for tests and tools)."""
        assert self._loop is not None, "start() first"

        async def _go() -> _T:
            return fn(self.service)

        return asyncio.run_coroutine_threadsafe(_go(), self._loop).result(timeout.total_seconds())

    def __enter__(self) -> Coordinator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
