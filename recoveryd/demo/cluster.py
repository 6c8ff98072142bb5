"""A training job on one machine: a coordinator, replicas as real processes, and their events.

Used by ``recoveryd demo`` and by the end-to-end tests. Every rank is a
spawned process (see :mod:`recoveryd.demo.trainer`); the launcher hosts the
store the replicas' training groups form on, can kill and restart replicas,
and collects the ranks' events. :meth:`LocalCluster.close` kills whatever is
still running, so nothing is left behind.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from recoveryd.agent.client import CoordinatorClient
from recoveryd.coordinator.config import CoordinatorConfig
from recoveryd.coordinator.server import Coordinator
from recoveryd.credentials import Credentials
from recoveryd.demo.trainer import Event, TrainerSpec, run_trainer
from recoveryd.errors import RecoverydError


@contextlib.contextmanager
def _environment(extra: dict[str, str]) -> Iterator[None]:
    """``extra`` in this process's environment while a child is spawned (it execs with it)."""
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class ClusterError(RecoverydError, RuntimeError):
    """A rank failed or an expected event did not come in time."""


class LocalCluster:
    """Replicas of a small training job on this machine.

    Args:
        coordinator: address of a running coordinator; ``None`` starts one in
            this process on 127.0.0.1, which demands a token made for this
            cluster (every rank and sidecar is given it, as a job's Secret would).
        coordinator_config: for the coordinator started here.
        prometheus_sd: write the ``/metrics`` addresses of the coordinator
            started here and of every rank to this file, as Prometheus
            ``file_sd_configs`` targets (label ``component``: ``coordinator`` or
            ``agent``), and serve them; ``None``: no metrics endpoints.
        sidecars: run every rank's agent as a sidecar process (``recoveryd
            agent``) that the rank attaches to; a sidecar outlives its rank
            (a killed replica's ranks attach again when restarted).
        defaults: :class:`TrainerSpec` fields every rank gets unless overridden.
    """

    def __init__(
        self,
        *,
        coordinator: str | None = None,
        coordinator_config: CoordinatorConfig | None = None,
        prometheus_sd: str | None = None,
        sidecars: bool = False,
        token_file: str = "",
        **defaults: Any,
    ) -> None:
        self.coordinator: Coordinator | None = None
        self._sd_path = prometheus_sd
        self._coordinator_target: list[str] = []
        self._agent_targets: dict[tuple[str, int], str] = {}
        """Each rank's latest incarnation's ``/metrics`` (a killed one's goes with it)."""
        if prometheus_sd is not None:
            defaults.setdefault("metrics_port", 0)
        if token_file and coordinator is None:
            raise ValueError(
                "token_file is for an outside coordinator; one started here makes its own"
            )
        self._token_dir = tempfile.mkdtemp(prefix="recoveryd-token-")  # 0700
        self.token_file = token_file
        """The token file every rank and sidecar presents ("": none, an outside coordinator's own)."""
        if token_file:
            defaults.setdefault("token_file", token_file)
        if coordinator is None:
            self.token_file = os.path.join(self._token_dir, "token")
            fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32) + "\n")
            defaults.setdefault("token_file", self.token_file)
            self.coordinator = Coordinator(
                "127.0.0.1:0",
                coordinator_config
                or CoordinatorConfig(
                    heartbeat_interval=timedelta(seconds=0.2),
                    heartbeat_timeout=timedelta(seconds=2),
                    warmup=timedelta(seconds=1),
                ),
                metrics_port=0 if prometheus_sd is not None else None,
                credentials=Credentials(token_file=self.token_file),
            ).start()
            coordinator = self.coordinator.address
            if self.coordinator.metrics_address is not None:
                self._coordinator_target.append(self.coordinator.metrics_address)
        self.address = coordinator
        self._defaults = defaults
        self._ctx = mp.get_context("spawn")
        # One queue per rank: a rank SIGKILLed while writing would leave a
        # shared queue's lock held, and every other rank blocked on it.
        self._queues: list[Any] = []
        self._stop: Any = self._ctx.Event()
        self._store = dist.TCPStore(
            "127.0.0.1", 0, None, True, timedelta(seconds=60), wait_for_workers=False
        )
        self._procs: dict[tuple[str, int], Any] = {}
        self._sidecars: dict[tuple[str, int], subprocess.Popen[bytes]] = {}
        self._sidecar_dir = tempfile.mkdtemp(prefix="recoveryd-sidecars-") if sidecars else None
        self._incarnations: dict[str, int] = {}
        self.events: list[Event] = []
        self.t0 = time.time()
        self._write_sd()

    def client(self, timeout: timedelta = timedelta(seconds=5)) -> CoordinatorClient:
        """A client of the cluster's coordinator, with the cluster's token."""
        creds = Credentials(token_file=self.token_file) if self.token_file else None
        return CoordinatorClient(self.address, timeout=timeout, credentials=creds)

    def start_replica(
        self,
        replica_id: str,
        world_size: int,
        *,
        env: dict[str, str] | None = None,
        **overrides: Any,
    ) -> int:
        """Starts every rank of a replica; returns its incarnation (0 the first time).

        Args:
            replica_id: the replica.
            world_size: its ranks.
            env: variables added to the ranks' environment (read at exec, so
                ``LD_PRELOAD`` works: see :func:`recoveryd.testing.clock.faketime_env`).
            overrides: :class:`TrainerSpec` fields for these ranks.
        """
        inc = self._incarnations.get(replica_id, -1) + 1
        self._incarnations[replica_id] = inc
        sockets = {}
        if self._sidecar_dir is not None:
            # Sidecars first, and up, so that no rank of the replica trains (and
            # waits in a collective) while a sibling still waits for its sidecar.
            sockets = {rank: self._sidecar(replica_id, rank) for rank in range(world_size)}
            self._await_sidecars(replica_id, sockets, timedelta(seconds=120))
        for rank in range(world_size):
            fields = {**self._defaults, **overrides}
            if rank in sockets:
                fields["sidecar_socket"] = sockets[rank]
            spec = TrainerSpec(
                coordinator=self.address,
                replica_id=replica_id,
                group_rank=rank,
                group_world_size=world_size,
                store_port=self._store.port,
                incarnation=inc,
                **fields,
            )
            events = self._ctx.Queue()
            self._queues.append(events)
            p = self._ctx.Process(target=run_trainer, args=(spec, events, self._stop), daemon=True)
            with _environment(env or {}):
                p.start()
            self._procs[(replica_id, rank)] = p
        return inc

    def _sidecar(self, replica_id: str, rank: int) -> str:
        """The socket of the rank's sidecar, started the first time it is asked for."""
        assert self._sidecar_dir is not None
        path = os.path.join(self._sidecar_dir, f"{replica_id}-{rank}.sock")
        proc = self._sidecars.get((replica_id, rank))
        if proc is None or proc.poll() is not None:
            cmd = [sys.executable, "-m", "recoveryd", "agent", "--coordinator", self.address]
            # --parent-pid: no sidecar outlives a killed demo. (Not preexec_fn:
            # forking a process with gRPC threads and running Python in the
            # child before exec can abort it.)
            cmd += ["--socket", path, "--host", "127.0.0.1", "--parent-pid", str(os.getpid())]
            if self._sd_path is not None:
                cmd += ["--metrics-port", "0"]
            if self.token_file:
                cmd += ["--token-file", self.token_file]
            with open(f"{path}.log", "ab") as log:
                self._sidecars[(replica_id, rank)] = subprocess.Popen(
                    cmd,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
        return path

    def start_sidecars(self, replicas: dict[str, int]) -> None:
        """Starts the sidecars of several replicas at once (``{replica: ranks}``) and
        waits for them, so that the replicas' trainers then start together."""
        sockets = {
            (rid, rank): self._sidecar(rid, rank)
            for rid, n in replicas.items()
            for rank in range(n)
        }
        for rid in replicas:
            self._await_sidecars(
                rid,
                {rank: path for (r, rank), path in sockets.items() if r == rid},
                timedelta(seconds=120),
            )

    def _await_sidecars(self, replica_id: str, sockets: dict[int, str], timeout: timedelta) -> None:
        end = time.monotonic() + timeout.total_seconds()
        for rank, path in sockets.items():
            proc = self._sidecars[(replica_id, rank)]
            while not os.path.exists(path):
                if proc.poll() is not None:
                    raise ClusterError(
                        f"the sidecar of {replica_id}/{rank} exited ({proc.returncode})"
                    )
                if time.monotonic() > end:
                    raise ClusterError(f"the sidecar of {replica_id}/{rank} not up in {timeout}")
                time.sleep(0.05)

    def kill_replica(self, replica_id: str) -> None:
        """SIGKILLs every rank of a replica and waits for them to die."""
        procs = [p for (rid, _), p in self._procs.items() if rid == replica_id]
        for p in procs:
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGKILL)
        for p in procs:
            p.join(10)
        gone = [k for k in self._agent_targets if k[0] == replica_id]
        for k in gone:
            del self._agent_targets[k]
        if gone:
            self._write_sd()

    def alive(self, replica_id: str) -> list[bool]:
        """Whether each rank of a replica is alive."""
        return [p.is_alive() for (rid, _), p in sorted(self._procs.items()) if rid == replica_id]

    def drain(self, wait_s: float = 0.0) -> list[Event]:
        """Collects the events that arrived (waiting up to ``wait_s`` for the first).

        Raises:
            ClusterError: a rank reported an error.
        """
        new: list[Event] = []
        deadline = time.monotonic() + wait_s
        while True:
            for q in self._queues:
                while True:
                    try:
                        new.append(q.get_nowait())
                    except (queue.Empty, OSError, EOFError):
                        break
            if new or time.monotonic() >= deadline:
                break
            time.sleep(0.01)
        new.sort(key=lambda e: e.time)
        self.events += new
        served = [e for e in new if e.kind == "metrics"]
        for e in served:
            self._agent_targets[(e.replica_id, e.group_rank)] = e.data["address"]
        if served:
            self._write_sd()
        for ev in new:
            if ev.kind == "error":
                raise ClusterError(
                    f"{ev.replica_id}/{ev.group_rank} failed: {ev.data['error']}\n"
                    f"{ev.data['traceback']}"
                )
        return new

    def _write_sd(self) -> None:
        """Rewrites the Prometheus targets file atomically (Prometheus watches it)."""
        if self._sd_path is None:
            return
        targets = {
            "coordinator": self._coordinator_target,
            "agent": sorted(self._agent_targets.values()),
        }
        groups = [{"targets": t, "labels": {"component": c}} for c, t in targets.items() if t]
        tmp = f"{self._sd_path}.tmp"
        with open(tmp, "w") as f:
            json.dump(groups, f, indent=1)
        os.replace(tmp, self._sd_path)

    def wait_for(
        self, predicate: Callable[[Event], bool], *, count: int = 1, timeout: timedelta
    ) -> list[Event]:
        """Waits until ``count`` events (seen before or now) satisfy ``predicate``."""
        end = time.monotonic() + timeout.total_seconds()
        while True:
            hits = [e for e in self.events if predicate(e)]
            if len(hits) >= count:
                return hits[:count]
            if time.monotonic() > end:
                kinds = [
                    (e.kind, e.replica_id, e.group_rank, e.incarnation) for e in self.events[-8:]
                ]
                raise ClusterError(
                    f"waited {timeout} for {count} matching event(s), saw {len(hits)}; last events: {kinds}"
                )
            self.drain(0.05)

    def step_of(self, replica_id: str) -> int:
        """The highest step any rank of the replica's latest incarnation reported."""
        inc = self._incarnations.get(replica_id, 0)
        steps = [
            int(e.data.get("step", 0))
            for e in self.events
            if e.replica_id == replica_id
            and e.incarnation == inc
            and e.kind in ("progress", "finished", "recovered")
            and e.data.get("step") is not None
        ]
        return max(steps, default=0)

    def stop(self, timeout: timedelta = timedelta(seconds=30)) -> None:
        """Tells parked ranks to exit and waits for them (killing stragglers)."""
        self._stop.set()
        end = time.monotonic() + timeout.total_seconds()
        for p in self._procs.values():
            p.join(max(0.0, end - time.monotonic()))
        self.drain(0.1)

    def close(self) -> None:
        """Kills every rank still running and stops the coordinator started here."""
        self._stop.set()
        for p in self._procs.values():
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGKILL)
        for p in self._procs.values():
            p.join(10)
        for s in self._sidecars.values():
            if s.poll() is None:
                s.terminate()
        for s in self._sidecars.values():
            try:
                s.wait(15)
            except subprocess.TimeoutExpired:
                s.kill()
                s.wait(5)
        if self._sidecar_dir is not None:
            shutil.rmtree(self._sidecar_dir, ignore_errors=True)
        shutil.rmtree(self._token_dir, ignore_errors=True)
        if self.coordinator is not None:
            self.coordinator.stop()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
