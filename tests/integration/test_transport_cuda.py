"""CUDA paths: NCCL straight from and into GPU memory, CPU tensors staged for a GPU joiner.

Skipped without CUDA. With one GPU both ranks share it; with two or more each
rank gets its own.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from recoveryd.testing import run_ranks
from recoveryd.transport import recv_state_dict, send_state_dict

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.integration,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
T = timedelta(seconds=60)


def _nccl(rank: int, ws: int, pg: object, store: dist.Store, in_place: bool) -> object:
    dev = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(dev)
    nccl = dist.ProcessGroupNCCL(dist.PrefixStore("nccl", store), rank, ws)
    g = torch.Generator(device="cpu").manual_seed(0)
    sd = {
        "gpu": torch.randn(1 << 20, generator=g).to(dev),
        "small": [torch.randn(100, generator=g).to(dev) for _ in range(50)],
        "cpu": torch.randn(1000, generator=g),
        "step": 4,
    }
    if rank == 0:
        return send_state_dict(nccl, [1], sd, step=4, timeout=T).payload_bytes
    if in_place:
        mine = {
            "gpu": torch.zeros(1 << 20, device=dev),
            "small": [torch.zeros(100, device=dev) for _ in range(50)],
            "cpu": torch.zeros(1000),
            "step": 0,
        }
        got = recv_state_dict(nccl, 0, into=mine, step=4, timeout=T).state_dict
        assert got["gpu"] is mine["gpu"]  # type: ignore[index]
    else:
        got = recv_state_dict(nccl, 0, step=4, timeout=T, alloc_device=dev).state_dict
    assert isinstance(got, dict)
    assert torch.equal(got["gpu"].cpu(), sd["gpu"].cpu())
    assert all(
        torch.equal(a.cpu(), b.cpu()) for a, b in zip(got["small"], sd["small"], strict=True)
    )
    assert torch.equal(got["cpu"].cpu(), sd["cpu"])
    return None


@pytest.mark.parametrize("in_place", [True, False], ids=["in_place", "allocating"])
def test_nccl_round_trip(in_place: bool) -> None:
    run_ranks(_nccl, 2, args=(in_place,), timeout=timedelta(seconds=180))
