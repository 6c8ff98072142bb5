"""DTensor and ShardedTensor leaves: replica A streams into replica B, rank r into rank r.

Each replica shards its tensors over its own two ranks; rank r of A sends to
rank r + 2 of B over the transfer group, as a joining replica pulls rank r
from rank r of its donor.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor import Shard as ShardPlacement

from recoveryd.errors import StateMismatchError, TransferError
from recoveryd.testing import run_ranks
from recoveryd.transport import recv_state_dict, send_state_dict

pytestmark = pytest.mark.integration
T = timedelta(seconds=60)


def _sharded(group: dist.ProcessGroup, fill: float) -> ShardedTensor:
    """A 8x4 tensor in four row blocks of 2, two local to each rank of ``group``."""
    r = dist.get_rank(group)
    shards = []
    for j in (2 * r, 2 * r + 1):
        md = ShardMetadata([2 * j, 0], [2, 4], f"rank:{dist.get_global_rank(group, r)}/cpu")
        shards.append(Shard(torch.full((2, 4), fill + j), md))
    return ShardedTensor._init_from_local_shards(shards, [8, 4], process_group=group)


class _Said(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _run(rank: int, ws: int, pg: dist.ProcessGroup, store: dist.Store, mode: str) -> object:
    dist.init_process_group(
        "gloo", store=dist.PrefixStore("default", store), rank=rank, world_size=ws
    )
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replica", "shard"))["shard"]
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    group = groups[rank // 2]
    donor = rank < 2
    fill = 100.0 if donor else 0.0
    full = torch.arange(32, dtype=torch.float32).reshape(8, 4) + fill
    sd = {
        "dt_shard": DTensor.from_local(
            full.chunk(2)[rank % 2].clone(), mesh, [ShardPlacement(0)], run_check=False
        ),
        "dt_rep": DTensor.from_local(torch.full((3,), fill), mesh, [Replicate()], run_check=False),
        "st": _sharded(group, fill),
    }
    if donor:
        send_state_dict(pg, [rank + 2], sd, step=3, timeout=T)
        return None
    said = _Said()
    logging.getLogger("recoveryd").addHandler(said)
    if mode == "in_place":
        got = recv_state_dict(pg, rank - 2, into=sd, step=3, timeout=T).state_dict
        assert got["dt_shard"] is sd["dt_shard"]  # type: ignore[index]
    elif mode == "allocating":
        got = recv_state_dict(
            pg, rank - 2, step=3, timeout=T, device_mesh=mesh, shard_group=group
        ).state_dict
    else:  # no mesh given: the donor's is rebuilt, and this rank is not in it
        got = recv_state_dict(pg, rank - 2, step=3, timeout=T, shard_group=group).state_dict
    assert isinstance(got, dict)
    dt = got["dt_shard"]
    assert isinstance(dt, DTensor)
    assert dt.placements == (ShardPlacement(0),)
    assert dt.shape == (8, 4)
    if mode == "rebuilt":
        assert dt.device_mesh.mesh.tolist() == [rank - 2 - rank % 2, rank - 1 - rank % 2]
        warned = [line for line in said.lines if "is not in the donor's mesh" in line]
        assert len(warned) == 1, said.lines  # once for the two DTensors on that mesh
        assert "pass device_mesh=" in warned[0]
    else:
        assert dt.device_mesh == mesh
        assert said.lines == []
    want = (torch.arange(32, dtype=torch.float32).reshape(8, 4) + 100.0).chunk(2)[rank % 2]
    assert torch.equal(dt.to_local(), want)
    assert torch.equal(got["dt_rep"].to_local(), torch.full((3,), 100.0))
    st = got["st"]
    assert isinstance(st, ShardedTensor)
    assert len(st.local_shards()) == 2
    for s in st.local_shards():
        j = s.metadata.shard_offsets[0] // 2
        assert torch.equal(s.tensor, torch.full((2, 4), 100.0 + j))
    dist.destroy_process_group()
    return None


@pytest.mark.parametrize("mode", ["in_place", "allocating", "rebuilt"])
def test_dtensor_and_sharded_tensor_cross_replicas(mode: str) -> None:
    run_ranks(_run, 4, args=(mode,), timeout=timedelta(seconds=150))


def _mismatch(rank: int, ws: int, pg: dist.ProcessGroup, store: dist.Store) -> object:
    """Replica B shards its DTensor by columns, A by rows: B refuses before any write."""
    dist.init_process_group(
        "gloo", store=dist.PrefixStore("default", store), rank=rank, world_size=ws
    )
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replica", "shard"))["shard"]
    donor = rank < 2
    full = torch.arange(32, dtype=torch.float32).reshape(8, 4) + (100.0 if donor else 0.0)
    placement = ShardPlacement(0) if donor else ShardPlacement(1)
    sd = {"model": {"w": distribute_local(full, mesh, placement)}}
    if donor:
        with pytest.raises(TransferError, match="refused"):
            send_state_dict(pg, [rank + 2], sd, step=3, timeout=T)
        dist.destroy_process_group()
        return None
    before = sd["model"]["w"].to_local().clone()
    with pytest.raises(StateMismatchError) as e:
        recv_state_dict(pg, rank - 2, into=sd, step=3, timeout=T)
    assert torch.equal(sd["model"]["w"].to_local(), before)  # nothing written
    dist.destroy_process_group()
    return str(e.value)


def distribute_local(full: torch.Tensor, mesh: object, placement: object) -> DTensor:
    """This rank's chunk of ``full`` as a DTensor (no collective: each rank cuts its own)."""
    dim = placement.dim  # type: ignore[attr-defined]
    coord = mesh.get_coordinate()  # type: ignore[attr-defined]
    local = full.chunk(2, dim=dim)[coord[0]].contiguous()
    return DTensor.from_local(local, mesh, [placement], run_check=False)  # type: ignore[arg-type]


def test_an_in_place_receive_sharded_otherwise_is_refused_naming_the_path() -> None:
    texts = run_ranks(_mismatch, 4, timeout=timedelta(seconds=150))
    for text in texts[2:]:
        assert "model.w: placements [Shard(dim=1)] here, [Shard(dim=0)] sent" in text
        assert "nothing was written" in text


def _hsdp(rank: int, ws: int, pg: dist.ProcessGroup, store: dist.Store) -> object:
    """Two replicas of 4 ranks, each HSDP over its own (replicate x shard) 2x2 mesh, with AdamW;
    rank r of replica A streams into rank r of replica B in place."""
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", store=dist.PrefixStore("default", store), rank=rank, world_size=ws
    )
    world = init_device_mesh("cpu", (2, 2, 2), mesh_dim_names=("replica", "dp_rep", "dp_shard"))
    mesh = world["dp_rep", "dp_shard"]
    replica = rank // 4
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    for layer in model.children():
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    steps = 3 if replica == 0 else 1  # the donor is ahead; the joiner has its layout only
    for step in range(steps):
        g = torch.Generator().manual_seed(step * 8 + rank % 4)
        model(torch.randn(4, 16, generator=g)).sum().backward()
        opt.step()
        opt.zero_grad()
    sd = {"model": model.state_dict(), "optim": opt.state_dict()}
    # Plain lists back to the test: tensors would cross the result queue by file
    # descriptors a rank that exits takes with it.
    local = {k: v.to_local().tolist() for k, v in sd["model"].items()}
    if replica == 0:
        send_state_dict(pg, [rank + 4], sd, step=steps, timeout=T)
        out = local
    else:
        ptrs = {k: v.to_local().data_ptr() for k, v in sd["model"].items()}
        got = recv_state_dict(pg, rank - 4, into=sd, step=3, timeout=T)
        assert got.step == 3
        assert {k: v.to_local().data_ptr() for k, v in sd["model"].items()} == ptrs  # in place
        assert all(v.device_mesh.ndim == 2 for v in sd["model"].values())
        out = {k: v.to_local().tolist() for k, v in sd["model"].items()}
    moments = {
        f"{i}.{k}": v.to_local().tolist()
        for i, st in sd["optim"]["state"].items()
        for k, v in st.items()
        if isinstance(v, DTensor)
    }
    dist.destroy_process_group()
    return out, moments


def test_a_2d_hsdp_replica_recovers_in_place_shard_by_shard() -> None:
    results = run_ranks(_hsdp, 8, timeout=timedelta(seconds=240))
    for r in range(4):
        (sent, sent_moments), (got, got_moments) = results[r], results[r + 4]
        assert sent.keys() == got.keys()
        assert got == sent, r  # every local shard, bit for bit (float lists compare exactly)
        assert sent_moments
        assert got_moments == sent_moments, r
