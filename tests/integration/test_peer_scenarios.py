"""The peers' own transport scenarios, run against recoveryd's drop-ins.

Re-implemented from what PyTorch's ``test/distributed/checkpoint/test_pg_transport.py``
checks (8 Gloo ranks on the default group, a ring where each rank sends its
state to the next and receives the previous one's, with no mesh or group
passed to the receive): a small model's state; mixed content with a DTensor
over a 1-D mesh of the world; a 64x8 ShardedTensor whose local shard each rank
receives from the rank before it. And torchft's own contract,
``torchft.checkpointing.transport_test.run_multi_recovery_test``, imported
from the installed torchft and run on :class:`recoveryd.transport.TorchftTransport`.
"""

from __future__ import annotations

import unittest
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, init_from_local_shards
from torch.distributed._shard.sharded_tensor.metadata import ShardMetadata
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from recoveryd.testing import run_ranks
from recoveryd.transport import PGTransport

pytestmark = pytest.mark.integration

WORLD = 8
T = timedelta(seconds=30)


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(42)  # every rank builds the same model
        self.net1 = torch.nn.Linear(10, 10)
        self.relu = torch.nn.ReLU()
        self.net2 = torch.nn.Linear(10, 10)


def _ring(transport: PGTransport, state: object, rank: int, world: int) -> object:
    """Sends ``state`` to the next rank and receives the previous rank's (rank 0 sends first)."""
    nxt, prev = (rank + 1) % world, (rank - 1) % world
    if rank == 0:
        transport.send_checkpoint([nxt], state)
        return transport.recv_checkpoint(prev)
    got = transport.recv_checkpoint(prev)
    transport.send_checkpoint([nxt], state)
    return got


def _same(a: object, b: object, where: str = "") -> list[str]:
    """Where two states differ (tensors by value, DTensors by local shard and spec)."""
    if isinstance(a, DTensor) or isinstance(b, DTensor):
        if not (isinstance(a, DTensor) and isinstance(b, DTensor)):
            return [f"{where}: {type(a).__name__} vs {type(b).__name__}"]
        out = [] if torch.equal(a.to_local(), b.to_local()) else [f"{where}: local shards"]
        if a._spec != b._spec:
            out.append(f"{where}: spec {a._spec} vs {b._spec}")
        return out
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return [] if torch.equal(a, b) else [f"{where}: values"]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(a)} vs {sorted(b)}"]
        return [d for k in a for d in _same(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return [f"{where}: lengths"]
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in _same(x, y, f"{where}.{i}")
        ]
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


def _sharded_state(rank: int, world: int) -> dict[str, object]:
    """A 64x8 ShardedTensor, rows split evenly over the world, and the rank as a scalar."""
    rows = 64 // world
    start = rank * rows
    local = torch.arange(start * 8, (start + rows) * 8, dtype=torch.float32).reshape(rows, 8)
    md = ShardMetadata(
        shard_offsets=[start, 0], shard_sizes=[rows, 8], placement=f"rank:{rank}/cpu"
    )
    st = init_from_local_shards([Shard(tensor=local, metadata=md)], 64, 8)
    return {"sharded_tensor": st, "rank_scalar": torch.tensor(float(rank))}


def _scenarios(rank: int, world: int, pg: Any, store: dist.Store) -> dict[str, list[str]]:
    """Each scenario's differences on this rank ([] when it passed)."""
    dist.init_process_group(
        "gloo", store=dist.PrefixStore("default", store), rank=rank, world_size=world
    )
    transport = PGTransport(dist.group.WORLD, T, torch.device("cpu"))
    out: dict[str, list[str]] = {}

    model_state = _Model().state_dict()
    out["ring"] = _same(model_state, _ring(transport, model_state, rank, world), "state")

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(7)
    mixed = {
        **{k: v for k, v in _Model().state_dict().items()},
        "dtensor": DTensor.from_local(torch.randn(10, 10), mesh),
        "non-tensor": "some string",
        "nested": {"tensor": torch.randn(1, 2), "value": 42},
        "list": [1, 2, 3],
    }
    out["mixed"] = _same(mixed, _ring(transport, mixed, rank, world), "state")

    got = _ring(transport, _sharded_state(rank, world), rank, world)
    prev = (rank - 1) % world
    rows = 64 // world
    want = torch.arange(prev * rows * 8, (prev + 1) * rows * 8, dtype=torch.float32).reshape(
        rows, 8
    )
    st = got["sharded_tensor"]  # type: ignore[index]
    problems = []
    if not isinstance(st, ShardedTensor):
        problems.append(f"sharded_tensor is a {type(st).__name__}")
    elif not torch.equal(st.local_shards()[0].tensor, want):
        problems.append("the local shard is not the previous rank's")
    if not torch.equal(got["rank_scalar"], torch.tensor(float(prev))):  # type: ignore[index]
        problems.append(f"rank_scalar {got['rank_scalar']} from rank {prev}")  # type: ignore[index]
    out["sharded"] = problems
    dist.destroy_process_group()
    return out


@pytest.fixture(scope="module")
def ring_results() -> list[dict[str, list[str]]]:
    out: list[dict[str, list[str]]] = run_ranks(_scenarios, WORLD, timeout=timedelta(seconds=240))
    return out


@pytest.mark.parametrize("scenario", ["ring", "mixed", "sharded"])
def test_pytorch_pg_transport_scenario(
    ring_results: list[dict[str, list[str]]], scenario: str
) -> None:
    failed = {rank: r[scenario] for rank, r in enumerate(ring_results) if r[scenario]}
    assert failed == {}


def _torchft_contract(rank: int, world: int, pg: Any, store: dist.Store) -> str:
    """torchft's own transport test, on TorchftTransport over torchft's Gloo groups."""
    from torchft.checkpointing.transport_test import run_multi_recovery_test
    from torchft.process_group import ProcessGroupGloo

    from recoveryd.transport import TorchftTransport

    tcp = dist.TCPStore("localhost", 0, None, True, timedelta(seconds=30), wait_for_workers=False)

    def init(rank: int, world_size: int) -> TorchftTransport[dict[str, object]]:
        group = ProcessGroupGloo()
        group.configure(
            store_addr=f"localhost:{tcp.port}/prefix",
            replica_id="0",
            rank=rank,
            world_size=world_size,
        )
        return TorchftTransport(group, timeout=timedelta(seconds=10), device=torch.device("cpu"))

    class Case(unittest.TestCase):
        def runTest(self) -> None:
            run_multi_recovery_test(self, init, device=torch.device("cpu"))

    result = unittest.TextTestRunner(verbosity=0).run(Case())
    problems = [text for _, text in result.errors + result.failures]
    return "\n".join(problems)


def test_torchft_multi_recovery_contract() -> None:
    [problems] = run_ranks(_torchft_contract, 1, timeout=timedelta(seconds=120))
    assert problems == ""


def _unbuildable(rank: int, world: int, pg: Any, store: dist.Store) -> list[str]:
    """What an allocating receive says of meshes it cannot rebuild, on a world of one rank."""
    from recoveryd.errors import StateMismatchError
    from recoveryd.transport._sharding import rebuild_mesh
    from recoveryd.v1 import manifest_pb2 as pb

    dist.init_process_group(
        "gloo", store=dist.PrefixStore("default", store), rank=rank, world_size=world
    )
    said = []
    for meta in (
        pb.DTensorMeta(device_type="cpu", mesh_shape=[2], mesh_ranks=[0, 1]),  # no group [0, 1]
        pb.DTensorMeta(device_type="cpu", mesh_shape=[2]),  # an older donor: no ranks
    ):
        try:
            rebuild_mesh(meta, ("model", "w"), {})
            said.append("rebuilt")
        except StateMismatchError as err:
            said.append(str(err))
    mesh = rebuild_mesh(pb.DTensorMeta(device_type="cpu", mesh_shape=[1], mesh_ranks=[0]), (), {})
    said.append(str(mesh.mesh.tolist()))
    dist.destroy_process_group()
    return said


def test_a_mesh_that_cannot_be_rebuilt_is_named_with_what_to_pass() -> None:
    [(no_group, no_ranks, world_mesh)] = run_ranks(_unbuildable, 1, timeout=timedelta(seconds=60))
    assert (
        "model.w: the DTensor's mesh [0, 1] needs, on this rank, a process group of ranks [0, 1]"
        in no_group
    )
    assert "pass device_mesh=" in no_group
    assert "model.w: a DTensor was sent without its mesh's ranks" in no_ranks
    assert "pass device_mesh=" in no_ranks
    assert world_mesh == "[0]"  # the world's own group serves a mesh of the world


def _unanswered_send(rank: int, world: int, pg: Any, store: dist.Store) -> list[str]:
    """A background send nobody receives: torchft's call returns, the failure is kept."""
    from recoveryd.transport import TorchftTransport

    said: list[str] = []
    if rank == 0:
        transport: TorchftTransport[dict[str, object]] = TorchftTransport(
            pg, timeout=timedelta(seconds=1), device=torch.device("cpu")
        )
        transport.send_checkpoint([1], 3, {"w": torch.ones(4)}, timeout=None)
        said.append(f"started, error {transport.last_send_error}")
        transport.disallow_checkpoint()  # bounded by the transport's own deadline
        said.append(f"{type(transport.last_send_error).__name__}: {transport.last_send_error}")
        store.set("donor_done", "1")
    else:
        store.wait(["donor_done"], timedelta(seconds=60))  # never receives
    return said


def test_a_failed_background_send_is_kept_and_bounded_by_the_transport_deadline() -> None:
    donor, _ = run_ranks(_unanswered_send, 2, timeout=timedelta(seconds=90))
    assert donor[0] == "started, error None"
    assert donor[1].startswith("TransferTimeoutError: timed out: rank 1 did not answer"), donor[1]
