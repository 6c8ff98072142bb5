"""``recoveryd example-trainer``: a small real trainer for a cluster, configured by environment.

The Kubernetes manifests under ``deploy/k8s`` run it as a StatefulSet: every
pod is one replica (one rank) of a data-parallel job, with an embedded agent.
The replicas do not exchange gradients; they train the same seeded MLP with
Adam on the same batches, so they hold the same state at the same step, as
the replicas of a data-parallel job do. A pod that is killed
comes back under the same name, asks the coordinator, and receives its
state from a live peer; the logs say from whom, over which interface, how
fast. It is the smallest thing that shows recovery on a real cluster: copy
its ~30 lines of agent wiring (:func:`run_example_trainer`) into a trainer.
"""

from __future__ import annotations

import copy
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from recoveryd.agent import Agent, AgentConfig, RankAgent
from recoveryd.demo.jobs import MODELS, Model, create_optimizer_state, mlp
from recoveryd.errors import ConfigError, CoordinatorUnavailableError, SidecarLostError
from recoveryd.sidecar.client import Attachment, attach

logger = logging.getLogger(__name__)


def _labels(text: str) -> dict[str, str]:
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError("RECOVERYD_LABELS", text, "must be KEY=VALUE[,KEY=VALUE...]")
        out[key] = value
    return out


@dataclass(frozen=True, kw_only=True, slots=True)
class ExampleTrainerConfig:
    """The example trainer's knobs; :meth:`from_env` reads them from ``RECOVERYD_*``."""

    coordinator: str
    """``host:port`` of the coordinator (``RECOVERYD_COORDINATOR``)."""
    replica_id: str
    """This replica (``RECOVERYD_REPLICA_ID``, else the host name: the pod's name)."""
    device: str = "cpu"
    """``cpu`` (Gloo transfers) or ``cuda`` (NCCL) (``RECOVERYD_DEVICE``)."""
    steps: int = 0
    """Stop after this step; 0: train until SIGTERM (``RECOVERYD_STEPS``)."""
    hidden: int = 1024
    """MLP width (``RECOVERYD_HIDDEN``); the state is ~ 3 x 4 x layers x hidden^2 bytes."""
    layers: int = 4
    step_delay_s: float = 0.5
    """Pause after each step, so a small model does not burn a node (``RECOVERYD_STEP_DELAY``)."""
    labels: dict[str, str] = field(default_factory=dict)
    """Locality labels (``RECOVERYD_LABELS=node=...,zone=...``)."""
    recover_timeout: timedelta = timedelta(minutes=10)
    sidecar_socket: str = ""
    """Attach to the sidecar agent on this socket (``RECOVERYD_SIDECAR_SOCKET``);
    empty: run the agent in this process."""
    model: Model = "mlp"
    """``mlp`` (plain tensors, Adam) or ``fsdp2`` (the MLP under FSDP2 with AdamW,
    over the pod's own rank: DTensor state) (``RECOVERYD_MODEL``)."""

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ConfigError("device", self.device, "must be 'cpu' or 'cuda'")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError(
                "device", self.device, "no CUDA device visible (request nvidia.com/gpu)"
            )
        if self.steps < 0:
            raise ConfigError("steps", self.steps, "must be >= 0 (0: until SIGTERM)")
        if self.hidden < 8 or self.layers < 1:
            raise ConfigError("hidden/layers", (self.hidden, self.layers), "must be >= 8 / >= 1")
        if self.step_delay_s < 0:
            raise ConfigError("step_delay_s", self.step_delay_s, "must be >= 0")
        if self.model not in MODELS:
            raise ConfigError("model", self.model, f"must be one of {MODELS}")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> ExampleTrainerConfig:
        """Reads the configuration from ``RECOVERYD_*`` variables.

        Raises:
            ConfigError: a variable is missing or malformed.
        """
        e = dict(os.environ if env is None else env)
        if not e.get("RECOVERYD_COORDINATOR"):
            raise ConfigError("RECOVERYD_COORDINATOR", "", "must be set to HOST:PORT")

        def num(name: str, default: float) -> float:
            try:
                return float(e.get(name, default))
            except ValueError:
                raise ConfigError(name, e[name], "must be a number") from None

        return cls(
            coordinator=e["RECOVERYD_COORDINATOR"],
            replica_id=e.get("RECOVERYD_REPLICA_ID") or e.get("HOSTNAME") or os.uname().nodename,
            device=e.get("RECOVERYD_DEVICE", "cpu"),
            steps=int(num("RECOVERYD_STEPS", 0)),
            hidden=int(num("RECOVERYD_HIDDEN", 1024)),
            layers=int(num("RECOVERYD_LAYERS", 4)),
            step_delay_s=num("RECOVERYD_STEP_DELAY", 0.5),
            labels=_labels(e.get("RECOVERYD_LABELS", "")),
            sidecar_socket=e.get("RECOVERYD_SIDECAR_SOCKET", ""),
            model=e.get("RECOVERYD_MODEL", "mlp"),  # type: ignore[arg-type]  # checked
        )


def _sharded_over_this_rank(model: torch.nn.Module, dev: torch.device) -> torch.nn.Module:
    """The model under FSDP2 over this pod's own one-rank world: its state is DTensors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh(dev.type, (1,), mesh_dim_names=("shard",))
    for layer in model.children():
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def run_example_trainer(
    config: ExampleTrainerConfig, stop: threading.Event, training: threading.Event | None = None
) -> int:
    """Recovers (or starts fresh), then trains until ``config.steps`` or ``stop``.

    ``training`` is set once recovery is over (the signal handler of
    :func:`main` exits at once before that, at a step boundary after).

    Returns:
        0 (a clean stop).
    """
    dev = torch.device(config.device)
    model = mlp(config.hidden, config.layers, seed=0).to(dev)
    opt: torch.optim.Optimizer
    if config.model == "fsdp2":
        model = _sharded_over_this_rank(model, dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    # The optimizer's state exists before recovery, so the layout matches the donors'.
    create_optimizer_state(opt)
    progress: dict[str, Any] = {"step": 0}

    def state() -> dict[str, Any]:
        return {"model": model.state_dict(), "optim": opt.state_dict(), "progress": progress}

    agent: RankAgent | None = None
    if config.sidecar_socket:
        try:
            agent = attach(
                config.sidecar_socket, state, replica_id=config.replica_id, labels=config.labels
            )
        except SidecarLostError as err:
            logger.error("%s: running the agent in this process instead", err)
    if agent is None:
        agent = Agent(
            AgentConfig(
                coordinator=config.coordinator, replica_id=config.replica_id, labels=config.labels
            ),
            state,
        )
    initial = copy.deepcopy(state())  # to start over if failed plans wrote into the state
    try:
        live = state()
        try:
            got = agent.recover(live, timeout=config.recover_timeout)
        except (CoordinatorUnavailableError, SidecarLostError) as err:
            logger.warning("no recovery (%s): starting from scratch", err)
            got = None
        rec = agent.last_recovery
        if got is None and rec is not None and rec.state_written:
            logger.warning("plans failed midway and wrote into the state: initialising it again")
            model.load_state_dict(initial["model"])
            opt.load_state_dict(initial["optim"])
            progress.update(initial["progress"])
        if got is not None:
            opt.load_state_dict(live["optim"])
        start, t0 = got or 0, time.monotonic()
        reason = rec.reason if rec is not None else None
        logger.info(
            "%s: %s at step %d",
            config.replica_id,
            "recovered" if got is not None else f"fresh ({reason or 'no answer'})",
            start,
        )
        if training is not None:
            training.set()
        step = start
        while not stop.is_set() and (config.steps == 0 or step < config.steps):
            step += 1
            g = torch.Generator().manual_seed(step)
            x = torch.randn(32, config.hidden, generator=g).to(dev)
            loss = torch.nn.functional.mse_loss(model(x), x[:, :8].sum(1, keepdim=True).tanh())
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            opt.zero_grad(set_to_none=True)
            progress["step"] = step
            try:
                agent.step(step)
            except SidecarLostError as err:  # once; training goes on without recovery
                logger.error("%s", err)
            if step % 100 == 0:
                rate = (step - start) / max(time.monotonic() - t0, 1e-9)
                logger.info("step %d loss %.5f (%.1f steps/s)", step, loss.item(), rate)
            stop.wait(config.step_delay_s)
        while not stop.is_set():  # done training: keep serving peers until SIGTERM
            if isinstance(agent, Attachment) and agent.lost:
                stop.wait(1)
                continue
            agent.park(timedelta(seconds=1))
    finally:
        agent.close()
    return 0


def main() -> int:
    """Entry point of ``recoveryd example-trainer``: SIGTERM/SIGINT stop it cleanly.

    While the trainer trains, a signal ends it at the next step boundary;
    before that (``recover()`` may wait minutes for a coordinator or a plan),
    it ends the process at once, closing the agent on the way out.
    """
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()
        if not training.is_set():
            raise SystemExit(128 + signum)

    training = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    return run_example_trainer(ExampleTrainerConfig.from_env(), stop, training)
