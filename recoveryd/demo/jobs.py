"""The demo's two training jobs: a data-parallel MLP, and the same MLP sharded with FSDP2.

``mlp``: every rank holds the whole model (plain tensors) and Adam; gradients
are averaged over the replica's own Gloo group. ``fsdp2``: the replica's
ranks are its default process group, each ``Linear`` and the model are
``fully_shard``-ed over a 1-D mesh of them, and AdamW runs on the shards:
the model and optimizer state are DTensors, what large jobs hold.

Either job creates its optimizer state before the rank recovers (a step
with zero gradients and no learning rate leaves the weights as they are),
so a joiner's state has the donors' layout; replicas seeded alike then
compute bit-identically.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal, Protocol

import torch
import torch.distributed as dist

from recoveryd.testing.ranks import gloo_group

Model = Literal["mlp", "fsdp2"]
MODELS: tuple[Model, ...] = ("mlp", "fsdp2")


class Job(Protocol):
    """What a trainer rank trains: its model and optimizer, and one step of them."""

    model: torch.nn.Module
    opt: torch.optim.Optimizer

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One step on this rank's batch, gradients averaged over the replica; the loss."""
        ...


def mlp(hidden: int, layers: int, seed: int) -> torch.nn.Module:
    """The demo's MLP (``layers`` x ``hidden`` wide, ReLU), seeded."""
    torch.manual_seed(seed)
    mods: list[torch.nn.Module] = []
    for _ in range(layers):
        mods += [torch.nn.Linear(hidden, hidden), torch.nn.ReLU()]
    mods.append(torch.nn.Linear(hidden, 1))
    return torch.nn.Sequential(*mods)


def create_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """Makes the optimizer's state exist now, leaving the weights as they are."""
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    lrs = [group["lr"] for group in opt.param_groups]
    for group in opt.param_groups:
        group["lr"] = 0.0  # AdamW's decoupled decay would move the weights otherwise
    opt.step()
    for group, lr in zip(opt.param_groups, lrs, strict=True):
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)


class DataParallelMLP:
    """Every rank the whole model; gradients averaged by one all-reduce per step."""

    def __init__(
        self,
        store: dist.Store,
        rank: int,
        world: int,
        *,
        hidden: int,
        layers: int,
        seed: int,
        timeout: timedelta,
    ) -> None:
        self._pg = gloo_group(store, rank, world, timedelta(seconds=60))
        self._world = world
        self._timeout = timeout
        self.model = mlp(hidden, layers, seed)
        self.opt: torch.optim.Optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        create_optimizer_state(self.opt)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        loss = torch.nn.functional.mse_loss(self.model(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        # As long as recover() may take: a sibling rank may still be recovering.
        self._pg.allreduce([flat]).wait(self._timeout)
        flat /= self._world
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


class ShardedMLP:
    """The MLP sharded with FSDP2 over the replica's ranks (its default group), with AdamW."""

    def __init__(
        self,
        store: dist.Store,
        rank: int,
        world: int,
        *,
        hidden: int,
        layers: int,
        seed: int,
        timeout: timedelta,
    ) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # The replica's own world: a recoveryd agent never uses the default
        # group, so FSDP may. A collective waits as long as recover() may take.
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("shard",))
        self.model = mlp(hidden, layers, seed)
        for layer in self.model.children():
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)
        self.opt: torch.optim.Optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        create_optimizer_state(self.opt)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        loss = torch.nn.functional.mse_loss(self.model(x), y)
        loss.backward()  # type: ignore[no-untyped-call]  # FSDP averages the gradients
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


def build(
    model: Model,
    store: dist.Store,
    rank: int,
    world: int,
    **kwargs: Any,
) -> Job:
    """The job ``model`` names, on the replica's training ``store``."""
    if model == "fsdp2":
        return ShardedMLP(store, rank, world, **kwargs)
    return DataParallelMLP(store, rank, world, **kwargs)
