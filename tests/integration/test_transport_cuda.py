"""CUDA paths: NCCL straight from and into GPU memory; a CPU Gloo wire staged through pinned memory.

Skipped without CUDA. The NCCL cases need two GPUs (NCCL does not run two
ranks on one GPU); the Gloo cases run on one GPU, both ranks sharing it:
CPU tensors received in place into GPU tensors (and allocating on the GPU)
through pinned host staging, and GPU tensors sent to a CPU joiner.
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
two_gpus = pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="NCCL between two ranks needs two GPUs"
)


def _state(dev: torch.device) -> dict[str, object]:
    g = torch.Generator(device="cpu").manual_seed(0)
    return {
        "big": torch.randn(8 << 20, generator=g).to(dev),  # 32 MiB: direct messages
        "small": [torch.randn(100, generator=g).to(dev) for _ in range(50)],  # packed
        "cpu": torch.randn(1000, generator=g),
        "step": 4,
    }


def _zeros_like(sd: dict[str, object], dev: torch.device) -> dict[str, object]:
    return {
        "big": torch.zeros(8 << 20, device=dev),
        "small": [torch.zeros(100, device=dev) for _ in range(50)],
        "cpu": torch.zeros(1000),
        "step": 0,
    }


def _check(got: object, sd: dict[str, object]) -> None:
    assert isinstance(got, dict)
    assert torch.equal(got["big"].cpu(), sd["big"].cpu())  # type: ignore[attr-defined]
    for a, b in zip(got["small"], sd["small"], strict=True):  # type: ignore[call-overload]
        assert torch.equal(a.cpu(), b.cpu())
    assert torch.equal(got["cpu"].cpu(), sd["cpu"])  # type: ignore[attr-defined]
    assert got["step"] == 4


def _nccl(rank: int, ws: int, pg: object, store: dist.Store, in_place: bool) -> object:
    dev = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(dev)
    nccl = dist.ProcessGroupNCCL(dist.PrefixStore("nccl", store), rank, ws)
    sd = _state(dev)
    if rank == 0:
        return send_state_dict(nccl, [1], sd, step=4, timeout=T).payload_bytes
    if in_place:
        mine = _zeros_like(sd, dev)
        got = recv_state_dict(nccl, 0, into=mine, step=4, timeout=T).state_dict
        assert got["big"] is mine["big"]  # type: ignore[index]
    else:
        got = recv_state_dict(nccl, 0, step=4, timeout=T, alloc_device=dev).state_dict
    _check(got, sd)
    return None


@two_gpus
@pytest.mark.parametrize("in_place", [True, False], ids=["in_place", "allocating"])
def test_nccl_round_trip(in_place: bool) -> None:
    run_ranks(_nccl, 2, args=(in_place,), timeout=timedelta(seconds=180))


def _gloo_staged(rank: int, ws: int, pg: object, store: dist.Store, mode: str) -> object:
    """Over the CPU Gloo group: CPU -> GPU in place or allocating, or GPU -> CPU."""
    gpu = torch.device("cuda", 0)
    cpu = torch.device("cpu")
    donor_dev, joiner_dev = (gpu, cpu) if mode == "gpu_to_cpu" else (cpu, gpu)
    if rank == 0:
        sd = _state(donor_dev)
        return send_state_dict(pg, [1], sd, step=4, timeout=T).payload_bytes  # type: ignore[arg-type]
    want = _state(cpu)
    if mode == "cpu_to_gpu_allocating":
        got = recv_state_dict(pg, 0, step=4, timeout=T, alloc_device=gpu).state_dict  # type: ignore[arg-type]
        assert got["big"].is_cuda  # type: ignore[index]
    else:
        mine = _zeros_like(want, joiner_dev)
        ptr = mine["big"].data_ptr()  # type: ignore[attr-defined]
        got = recv_state_dict(pg, 0, into=mine, step=4, timeout=T).state_dict  # type: ignore[arg-type]
        assert got["big"] is mine["big"]  # type: ignore[index]
        assert mine["big"].data_ptr() == ptr  # type: ignore[attr-defined]
    _check(got, want)
    return None


@pytest.mark.parametrize("mode", ["cpu_to_gpu_in_place", "cpu_to_gpu_allocating", "gpu_to_cpu"])
def test_a_cpu_wire_meets_gpu_memory_through_pinned_staging(mode: str) -> None:
    run_ranks(_gloo_staged, 2, args=(mode,), timeout=timedelta(seconds=180))
