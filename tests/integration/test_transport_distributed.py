"""DTensor and ShardedTensor leaves: replica A (ranks 0, 1) streams into replica B (ranks 2, 3).

Each replica shards its tensors over its own two ranks; rank r of A sends to
rank r + 2 of B over the transfer group, as a joining replica pulls rank r
from rank r of its donor.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor import Shard as ShardPlacement

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


def _run(rank: int, ws: int, pg: dist.ProcessGroup, store: dist.Store, in_place: bool) -> object:
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
    if in_place:
        got = recv_state_dict(pg, rank - 2, into=sd, step=3, timeout=T).state_dict
        assert got["dt_shard"] is sd["dt_shard"]  # type: ignore[index]
    else:
        got = recv_state_dict(
            pg, rank - 2, step=3, timeout=T, device_mesh=mesh, shard_group=group
        ).state_dict
    assert isinstance(got, dict)
    dt = got["dt_shard"]
    assert isinstance(dt, DTensor)
    assert dt.placements == (ShardPlacement(0),)
    assert dt.shape == (8, 4)
    assert dt.device_mesh == mesh
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


@pytest.mark.parametrize("in_place", [True, False], ids=["in_place", "allocating"])
def test_dtensor_and_sharded_tensor_cross_replicas(in_place: bool) -> None:
    run_ranks(_run, 4, args=(in_place,), timeout=timedelta(seconds=150))
