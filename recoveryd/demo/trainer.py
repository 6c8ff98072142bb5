"""One rank of a small real training job, with an embedded recoveryd agent.

Each replica is a group of ``group_world_size`` ranks training one of the
jobs of :mod:`recoveryd.demo.jobs`: a data-parallel MLP with Adam (plain
tensors), or the same MLP sharded with FSDP2 and AdamW (DTensors). Replicas train
the same seeded model on the same data, so a replica that recovers from a
donor and trains on is bit-identical to the donor at every later step: the
demo and the end-to-end tests check exactly that.

The rank reports what happens to it as events on a queue (see
:class:`Event`); the launcher (:mod:`recoveryd.demo.cluster`) prints and checks them.
"""

from __future__ import annotations

import faulthandler
import hashlib
import logging
import os
import signal
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from recoveryd._time import Deadline
from recoveryd.agent import Agent, AgentConfig, RankAgent
from recoveryd.credentials import Credentials
from recoveryd.demo import jobs
from recoveryd.demo.jobs import Model
from recoveryd.sidecar.client import attach
from recoveryd.testing import netlab

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainerSpec:
    """One rank's job, and the faults to inject into it."""

    coordinator: str
    replica_id: str
    group_rank: int
    group_world_size: int
    store_port: int
    """Port of the launcher's store that the replica's training group forms on."""
    incarnation: int
    """How many times this replica was started before (keys its training group)."""
    steps: int
    """Train up to this step, then park (serve plans) until told to stop."""
    model: Model = "mlp"
    """``mlp`` (plain tensors, data parallel) or ``fsdp2`` (DTensors: FSDP2 over the replica)."""
    hidden: int = 512
    layers: int = 4
    batch: int = 32
    extra_bytes: int = 0
    """An extra tensor in the state, to make transfers longer."""
    step_delay_s: float = 0.02
    seed: int = 0
    heartbeat_interval_s: float = 0.2
    recover_timeout_s: float = 120.0
    rendezvous_timeout_s: float = 20.0
    hold_at: int | None = None
    """Stop stepping after this step (park), as a lagging donor would."""
    die_during_send_s: float | None = None
    """SIGKILL this process this long after its first send starts."""
    labels: dict[str, str] = field(default_factory=dict)
    metrics_port: int | None = None
    """Serve the agent's ``/metrics`` on this port (0: any free one); ``None``: off."""
    sidecar_socket: str | None = None
    """Attach to the sidecar agent on this socket instead of running one in-process."""
    token_file: str = ""
    """The job's token file the agent presents to the coordinator ("": none)."""
    netns: str = ""
    """Run in this network namespace (fault tests: :mod:`recoveryd.testing.netlab`);
    the replica must then have one rank (its training group needs no store)."""
    host: str = "127.0.0.1"
    """The address the agent advertises for transfers."""
    join_together: tuple[str, int] | None = None
    """``(key, ranks)``: call ``recover()`` only once that many ranks reached the
    same key on the launcher's store (tests: replicas that join at once)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Event:
    """Something that happened to one rank."""

    kind: str
    """``started``, ``fresh``, ``recovered``, ``sent``, ``progress``,
    ``finished``, ``metrics`` (where the agent serves ``/metrics``), ``error``."""
    replica_id: str
    group_rank: int
    incarnation: int
    time: float
    data: dict[str, Any]


def state_digest(state: object) -> str:
    """A digest of every tensor's bytes and every value in ``state`` (order-sensitive)."""
    h = hashlib.blake2b(digest_size=16)

    def walk(obj: object) -> None:
        if isinstance(obj, DTensor):  # this rank's shard: every rank digests its own
            walk(obj.to_local())
        elif isinstance(obj, torch.Tensor):
            t = obj.detach().contiguous().cpu()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(obj, dict):
            for k, v in obj.items():
                h.update(repr(k).encode())
                walk(v)
        elif isinstance(obj, list | tuple):
            for v in obj:
                walk(v)
        else:
            h.update(repr(obj).encode())

    walk(state)
    return h.hexdigest()


def _batch(spec: TrainerSpec, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(spec.seed * 1_000_003 + step * 64 + spec.group_rank)
    x = torch.randn(spec.batch, spec.hidden, generator=g)
    return x, x[:, :8].sum(dim=1, keepdim=True).tanh()


def run_trainer(spec: TrainerSpec, events: Any, stop: Any) -> None:
    """Process entry point: recover or start fresh, train, park until ``stop`` is set."""

    def emit(kind: str, **data: Any) -> None:
        events.put(
            Event(
                kind=kind,
                replica_id=spec.replica_id,
                group_rank=spec.group_rank,
                incarnation=spec.incarnation,
                time=time.time(),
                data=data,
            )
        )

    try:
        if spec.netns:
            netlab.enter(spec.netns)  # before any socket or thread of this process
        _train(spec, emit, stop)
    except BaseException as err:
        emit("error", error=f"{err!r}", traceback=traceback.format_exc())
    finally:
        # Flush the queue, then skip Gloo's destructors, which can block on dead peers.
        events.close()
        events.join_thread()
        os._exit(0)


def _train(spec: TrainerSpec, emit: Any, stop: Any) -> None:
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>`: every stack
    torch.set_num_threads(1)  # replicas must compute bit-identically, and share the cores
    level = os.environ.get("RECOVERYD_LOG", "WARNING").upper()
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s {spec.replica_id}/{spec.group_rank} %(name)s: %(message)s",
    )
    emit("started", pid=os.getpid())
    parent = os.getppid()
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()
    store: dist.Store
    if spec.netns:  # the launcher's store is out of reach; one rank needs none
        if spec.group_world_size != 1 or spec.join_together is not None:
            raise ValueError("a replica in a network namespace has one rank and no join_together")
        store = dist.HashStore()
    else:
        store = dist.TCPStore("127.0.0.1", spec.store_port, None, False, timedelta(seconds=60))
    train_store = dist.PrefixStore(f"train/{spec.replica_id}/{spec.incarnation}", store)
    job = jobs.build(
        spec.model,
        train_store,
        spec.group_rank,
        spec.group_world_size,
        hidden=spec.hidden,
        layers=spec.layers,
        seed=spec.seed,
        timeout=timedelta(seconds=spec.recover_timeout_s),
    )
    model, opt = job.model, job.opt
    progress: dict[str, Any] = {"step": 0, "samples": 0}
    extra = {"blob": torch.zeros(spec.extra_bytes // 4)} if spec.extra_bytes else {}

    def state() -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "optim": opt.state_dict(),
            "progress": progress,
            **extra,
        }

    agent: RankAgent
    if spec.sidecar_socket is not None:
        agent = attach(
            spec.sidecar_socket,
            state,
            replica_id=spec.replica_id,
            group_rank=spec.group_rank,
            group_world_size=spec.group_world_size,
            labels=spec.labels,
            timeout=timedelta(seconds=60),
        )
    else:
        agent = Agent(
            AgentConfig(
                coordinator=spec.coordinator,
                replica_id=spec.replica_id,
                group_rank=spec.group_rank,
                group_world_size=spec.group_world_size,
                host=spec.host,
                labels=spec.labels,
                heartbeat_interval=timedelta(seconds=spec.heartbeat_interval_s),
                rendezvous_timeout=timedelta(seconds=spec.rendezvous_timeout_s),
                metrics_port=spec.metrics_port,
                credentials=(
                    Credentials(token_file=spec.token_file)
                    if spec.token_file
                    else Credentials.from_env()
                ),
            ),
            state,
        )
    if agent.metrics_address is not None:
        emit("metrics", address=agent.metrics_address)
    if spec.join_together is not None:
        _barrier(store, *spec.join_together, timeout=timedelta(seconds=spec.recover_timeout_s))
    live = state()
    t0 = time.monotonic()
    got = agent.recover(live, timeout=timedelta(seconds=spec.recover_timeout_s))
    rec = agent.last_recovery
    assert rec is not None
    record = asdict(rec)
    if got is None:
        emit("fresh", reason=record["reason"], seconds=time.monotonic() - t0)
        start = 0
    else:
        opt.load_state_dict(live["optim"])  # the optimizer's own copy of hyper-parameters
        emit("recovered", digest=state_digest(state()), **record)
        start = got

    dying = False
    for step in range(start + 1, spec.steps + 1):
        if spec.hold_at is not None and step > spec.hold_at:
            break
        loss = job.train_step(*_batch(spec, step))
        progress["step"] = step
        progress["samples"] += spec.batch * spec.group_world_size
        sent_before = len(agent.sends)
        if spec.die_during_send_s is not None and not dying and isinstance(agent, Agent):
            dying = _arm_death_on_send(agent, step, spec.die_during_send_s)
        agent.step(step)
        _emit_sends(agent, sent_before, emit, state)
        if step % 10 == 0 or step == spec.steps:
            emit("progress", step=step, loss=loss)
        if spec.step_delay_s:
            time.sleep(spec.step_delay_s)
    final = progress["step"]
    emit("finished", step=final, digest=state_digest(state()))
    while not stop.is_set():
        sent_before = len(agent.sends)
        agent.park(timedelta(seconds=0.2))
        _emit_sends(agent, sent_before, emit, state)
    agent.close()


def _emit_sends(agent: RankAgent, since: int, emit: Any, state: Any) -> None:
    """One ``sent`` event per send the agent made since ``since``, with the digest of what went."""
    for report in list(agent.sends)[since:]:
        emit(
            "sent",
            plan_id=report.plan_id,
            step=report.step,
            result=report.result,
            bytes=report.bytes,
            seconds=report.seconds,
            digest=state_digest(state()) if report.result == "ok" else "",
        )


def _barrier(store: dist.Store, key: str, ranks: int, *, timeout: timedelta) -> None:
    """Waits until ``ranks`` ranks arrived at ``key`` (each adds itself once)."""
    counter = f"join-together/{key}"
    store.add(counter, 1)
    deadline = Deadline(timeout)
    while store.add(counter, 0) < ranks:
        if deadline.expired:
            raise TimeoutError(f"only {store.add(counter, 0)} of {ranks} ranks reached {key!r}")
        deadline.sleep(timedelta(milliseconds=10))


def _exit_when_orphaned(parent: int) -> None:
    """Exits when the launcher is gone (killed), so no rank outlives a demo or test."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _arm_death_on_send(agent: Agent, step: int, after_s: float) -> bool:
    """Fault injection: SIGKILL this process ``after_s`` into a send due at ``step``.

    Returns whether a send is due (the timer is then set).
    """
    if not agent.send_due(step):
        return False
    timer = threading.Timer(after_s, lambda: os.kill(os.getpid(), signal.SIGKILL))
    timer.daemon = True
    timer.start()
    return True
