"""The manifest on plain data: what the donor plans and what the joiner accepts."""

from __future__ import annotations

import re

import pytest
import torch
from torch.distributed._shard.sharded_tensor.metadata import TensorProperties
from torch.distributed._shard.sharding_spec import ChunkShardingSpec

from recoveryd.errors import ManifestError, StateMismatchError, UnsupportedValueError
from recoveryd.transport._allocating import allocate_targets, rebuild_allocated
from recoveryd.transport._flatten import build_plan, cut_messages
from recoveryd.transport._memory import Arena
from recoveryd.transport._pieces import cut
from recoveryd.transport._sharding import LocalDTensor, LocalShardedTensor
from recoveryd.transport._validate import PairBudget, TensorSpec, check_manifest, check_sharded
from recoveryd.transport.tree import TreeBuilder, decode_tensors
from recoveryd.v1 import manifest_pb2 as pb
from tests.statedicts import every_kind


def _plan(sd: object, bucket: int = 1 << 20) -> pb.Manifest:
    return build_plan(
        sd, step=1, chain=[0, 1], bucket_bytes=bucket, direct_bytes=bucket, checksums=True
    ).manifest


def test_tied_weights_and_views_share_one_span_of_exact_bytes() -> None:
    buf = torch.zeros(64, 1024)
    sd = {"a": buf, "b": buf, **{f"v{i}": buf[i] for i in range(64)}}
    m = _plan(sd)
    assert list(m.storage_nbytes) == [buf.numel() * 4]
    assert set(m.tensor_storage) == {0}


def test_disjoint_slices_of_one_buffer_send_only_their_bytes() -> None:
    big = torch.zeros(1 << 20)
    m = _plan({"head": big[:16], "tail": big[-16:]})
    assert sorted(m.storage_nbytes) == [64, 64]


def test_gappy_strided_view_is_sent_dense() -> None:
    big = torch.zeros(1000, 1000)
    m = _plan({"col": big[:, ::500]})
    assert list(m.storage_nbytes) == [1000 * 2 * 4]
    assert list(m.tensor_stride) == [2, 1]


def test_unsupported_leaf_names_its_path() -> None:
    with pytest.raises(UnsupportedValueError) as e:
        _plan({"optim": {"state": {0: {"fn": object()}}}})
    assert e.value.path == "optim.state.0.fn"
    assert isinstance(e.value, TypeError)


def test_unsupported_key_names_its_path() -> None:
    with pytest.raises(UnsupportedValueError, match=r"a\.<key \(1, 2\)>"):
        _plan({"a": {(1, 2): 3}})


def test_messages_grow_with_bytes_not_tensor_count() -> None:
    m = _plan({i: torch.zeros(256) for i in range(20_000)}, bucket=16 << 20)
    assert len(m.message_nbytes) == 2  # 19.5 MiB in 16 MiB buckets
    assert sum(m.message_nbytes) == 20_000 * 1024


@pytest.mark.parametrize(
    ("spans", "bucket"),
    [([10, 20, 30], 25), ([100], 7), ([5, 0, 5, 200, 3], 64), ([], 16), ([64, 64], 64)],
)
@pytest.mark.parametrize("direct", [1, 8, 64])
def test_cut_messages_covers_every_byte_within_bucket_size(
    spans: list[int], bucket: int, direct: int
) -> None:
    msgs = cut_messages(spans, bucket, min(direct, bucket))
    assert sum(msgs) == sum(spans)
    assert all(0 < n <= bucket for n in msgs)


def test_every_kind_plan_decodes_and_its_tree_rebuilds() -> None:
    m = pb.Manifest.FromString(_plan(every_kind()).SerializeToString())
    tensors = decode_tensors(m)
    check_manifest(m, tensors)
    tree = TreeBuilder(m, lambda kind, arg, path: ("leaf", arg)).build()
    assert isinstance(tree, dict)
    assert tree["values"]["big"] == 1 << 70
    assert tree["nested"]["tuple"][2] == torch.Size([3, 4])
    assert list(tree["optim"]["state"]) == [0, 1]


def _tensor_manifest(**over: object) -> pb.Manifest:
    m = _plan({"w": torch.zeros(4)})
    for k, v in over.items():
        field = getattr(m, k)
        del field[:]
        field.extend(v)  # type: ignore[arg-type]
    return m


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"tensor_shape": [5]}, "reaches byte"),
        ({"tensor_storage": [3]}, "out of range"),
        ({"tensor_byte_offset": [2]}, "not a multiple"),
        ({"tensor_dtype": [99]}, "unknown dtype"),
        ({"tensor_ndim": [2]}, "dimensions"),
        ({"message_nbytes": [8]}, "cover"),
    ],
)
def test_inconsistent_manifests_are_rejected(over: dict[str, object], needle: str) -> None:
    m = _tensor_manifest(**over)
    with pytest.raises(ManifestError, match=needle):
        check_manifest(m, decode_tensors(m))


def test_tree_with_missing_nodes_is_rejected() -> None:
    m = _plan({"a": [1, 2, 3]})
    del m.node_kind[-1]
    del m.node_arg[-1]
    with pytest.raises(ManifestError, match="runs out"):
        TreeBuilder(m, lambda *a: None).build()


def test_tensor_no_leaf_refers_to_is_rejected() -> None:
    m = _plan({"a": torch.zeros(2), "b": torch.zeros(2)})
    m.node_arg[2] = 0  # both leaves name tensor 0; tensor 1 is orphaned
    with pytest.raises(ManifestError, match="exactly once"):
        check_manifest(m, decode_tensors(m))


@pytest.mark.parametrize("text", ["--5", "\u00b2", "1" * 5000, ""])
def test_malformed_big_ints_are_rejected(text: str) -> None:
    from recoveryd.transport.tree import decode_value

    with pytest.raises(ManifestError):
        decode_value(pb.Value(big_int_value=text))


def test_absurd_element_counts_are_rejected() -> None:
    m = _tensor_manifest(tensor_ndim=[2], tensor_shape=[1 << 62, 4], tensor_stride=[0, 1])
    with pytest.raises(ManifestError, match="elements"):
        decode_tensors(m)


def test_an_allocating_receive_names_the_dtensor_it_cannot_place() -> None:
    # What a donor holding model.layers.0.w as a DTensor over a 2-rank mesh sends,
    # built by hand (a real DTensor needs a process group).
    m = _plan({"model": {"layers": [{"w": torch.zeros(4)}]}})
    at = list(m.node_kind).index(pb.NODE_KIND_TENSOR)
    m.node_kind[at] = pb.NODE_KIND_DTENSOR
    m.node_arg[at] = 0
    meta = m.dtensors.add(local_tensor=0, device_type="cpu")
    meta.global_shape.extend([8])
    meta.global_stride.extend([1])
    meta.mesh_shape.extend([2])
    meta.placements.add(kind=pb.Placement.KIND_SHARD, dim=0)
    tensors = decode_tensors(m)
    check_manifest(m, tensors)
    sizes = list(m.storage_nbytes)
    targets, _ = allocate_targets(
        sizes, cut(sizes, list(m.message_nbytes)), torch.device("cpu"), Arena(hugepages=False)
    )
    with pytest.raises(StateMismatchError, match=r"model\.layers\.0\.w: a DTensor was sent"):
        rebuild_allocated(m, tensors, targets, None, None)


# ---- sharding facts a donor (or a trainer, to its sidecar) cannot get past -------------


def _sharded(
    shards: list[tuple[list[int], list[int]]], local: list[int], size: list[int]
) -> object:
    meta = pb.ShardedTensorMeta(dtype=pb.DTYPE_FLOAT32, global_size=size, local_shard=local)
    for offsets, sizes in shards:
        meta.shards.add(offsets=offsets, sizes=sizes)
    tensors = [torch.zeros(*shards[i][1]) for i in local]
    return {"st": LocalShardedTensor(locals=tensors, meta=meta)}


def _dtensor(local: torch.Tensor, **facts: object) -> object:
    facts.setdefault("device_type", "cpu")
    meta = pb.DTensorMeta(**facts)  # type: ignore[arg-type]
    return {"dt": LocalDTensor(local=local, meta=meta)}


_SHARD0 = pb.Placement(kind=pb.Placement.KIND_SHARD, dim=0)
_ROWS_OVER_2: dict[str, object] = {
    "global_shape": [8, 2],
    "global_stride": [2, 1],
    "mesh_shape": [2],
    "mesh_ranks": [0, 1],
    "placements": [_SHARD0],
}


@pytest.mark.parametrize(
    ("state", "needle"),
    [
        (_sharded([([0, 0], [2, 2]), ([1, 0], [2, 2])], [0], [4, 2]), "shards 0 and 1 overlap"),
        (
            _sharded([([0, 0], [2, 2]), ([3, 0], [2, 2])], [0], [4, 2]),
            "shard 1 (offsets [3, 0], sizes [2, 2]) leaves the global size [4, 2]",
        ),
        (_sharded([([0, 0], [2, 2]), ([2, 0], [2, 2])], [0, 0], [4, 2]), "a shard is local twice"),
        (_sharded([([0, 0], [2, 2])], [0], [4, 2, 1]), "shard 0 is not 3-d"),
        (
            _dtensor(torch.zeros(4, 2), global_shape=[8, 2], global_stride=[2, 1], mesh_shape=[2]),
            "0 placements on a 1-d mesh",
        ),
        (
            _dtensor(
                torch.zeros(4, 2),
                global_shape=[8, 2],
                global_stride=[2, 1],
                mesh_shape=[2],
                placements=[pb.Placement(kind=pb.Placement.KIND_SHARD, dim=2)],
            ),
            "shards dim 2 of a 2-d tensor",
        ),
        (
            _dtensor(
                torch.zeros(9, 2),
                global_shape=[8, 2],
                global_stride=[2, 1],
                mesh_shape=[2],
                placements=[_SHARD0],
            ),
            "local shard of 9 > global 8",
        ),
        (
            _dtensor(
                torch.zeros(4, 2),
                global_shape=[8, 2],
                global_stride=[2, 1],
                mesh_shape=[2],
                mesh_ranks=[0, 1, 2],
                placements=[_SHARD0],
            ),
            "3 mesh ranks for a mesh of shape [2]",
        ),
        (
            _dtensor(torch.zeros(4, 2), global_shape=[8], global_stride=[1], mesh_shape=[2]),
            "1-d global shape",
        ),
        (
            _dtensor(torch.zeros(4, 1), **_ROWS_OVER_2),
            "dim 1 is not sharded, yet its local shard has 1 of 2",
        ),
        (
            _dtensor(torch.zeros(5, 2), **_ROWS_OVER_2),
            "dim 0 is cut 2 ways, yet its local shard has 5 of 8 (at most 4)",
        ),
        (
            _dtensor(torch.zeros(4, 2), **{**_ROWS_OVER_2, "mesh_ranks": [3, 3]}),
            "a rank appears twice in the mesh",
        ),
        (
            _dtensor(torch.zeros(4, 2), **{**_ROWS_OVER_2, "mesh_ranks": [0, 1 << 31]}),
            "a mesh rank outside [0, 2147483647]",
        ),
        (
            _dtensor(torch.zeros(4, 2), **{**_ROWS_OVER_2, "device_type": "cuda:0; rm"}),
            "the mesh's device type 'cuda:0; rm' is not one",
        ),
        (
            _dtensor(torch.zeros(4, 2), **{**_ROWS_OVER_2, "global_shape": [1 << 40, 1 << 40]}),
            "global shape [1099511627776, 1099511627776]",
        ),
        (
            _dtensor(
                torch.zeros(4, 2),
                **{
                    **_ROWS_OVER_2,
                    "placements": [pb.Placement(kind=pb.Placement.KIND_STRIDED_SHARD, dim=0)],
                },
            ),
            "a strided shard of split factor 0",
        ),
    ],
    ids=[
        "overlapping-shards",
        "shard-out-of-range",
        "shard-local-twice",
        "shard-ndim",
        "placements-per-mesh-dim",
        "shard-dim-out-of-range",
        "local-larger-than-global",
        "mesh-ranks-count",
        "local-ndim",
        "unsharded-dim-local-differs",
        "local-larger-than-its-chunk",
        "mesh-rank-twice",
        "mesh-rank-out-of-range",
        "bad-device-type",
        "global-too-large",
        "strided-split-factor",
    ],
)
def test_inconsistent_sharding_facts_are_refused_naming_the_path(
    state: object, needle: str
) -> None:
    m = build_plan(
        state, step=None, chain=[], bucket_bytes=1 << 20, direct_bytes=1, checksums=False
    ).manifest
    tensors = decode_tensors(m)
    check_manifest(m, tensors)  # the columns are fine: the facts are not
    path = "st" if "st" in state else "dt"  # type: ignore[operator]
    with pytest.raises(ManifestError, match=re.escape(f"{path}: {needle}")):
        TreeBuilder(m, lambda *a: None, tensors=tensors).build()


def test_consistent_sharding_facts_pass_and_a_stand_in_prints_as_a_dtensor_would() -> None:
    state = _dtensor(
        torch.zeros(4, 2),
        global_shape=[8, 2],
        global_stride=[2, 1],
        mesh_shape=[2],
        mesh_ranks=[0, 1],
        placements=[_SHARD0],
    )
    m = build_plan(
        state, step=None, chain=[], bucket_bytes=1 << 20, direct_bytes=1, checksums=False
    ).manifest
    tensors = decode_tensors(m)
    check_manifest(m, tensors)
    tree = TreeBuilder(m, lambda kind, arg, path: (kind, arg), tensors=tensors).build()
    assert tree == {"dt": (pb.NODE_KIND_DTENSOR, 0)}
    assert list(m.node_kind) == [pb.NODE_KIND_DICT, pb.NODE_KIND_DTENSOR]
    assert list(m.dtensors[0].mesh_ranks) == [0, 1]


def _facts(state: object) -> tuple[pb.Manifest, list[TensorSpec]]:
    m = build_plan(
        state, step=None, chain=[], bucket_bytes=1 << 20, direct_bytes=1, checksums=False
    ).manifest
    tensors = decode_tensors(m)
    check_manifest(m, tensors)
    return m, tensors


def test_chunk_sharding_of_a_short_dim_passes_with_its_empty_shards_past_the_end() -> None:
    # torch's ChunkShardingSpec cuts 9 rows over 8 ranks into 2,2,2,2,1 and
    # three empty chunks at offsets 10, 12 and 14: a real ShardedTensor.
    spec = ChunkShardingSpec(dim=0, placements=[f"rank:{r}/cpu" for r in range(8)])
    md = spec.build_metadata(torch.Size([9, 2]), TensorProperties())
    shards = [(list(s.shard_offsets), list(s.shard_sizes)) for s in md.shards_metadata]
    assert shards[-1] == ([14, 0], [0, 2])
    m, tensors = _facts(_sharded(shards, [4, 7], [9, 2]))
    TreeBuilder(m, lambda *a: None, tensors=tensors).build()
    bad = [*shards[:-1], ([14, 0], [1, 2])]  # not empty: it does leave the tensor
    m, tensors = _facts(_sharded(bad, [4], [9, 2]))
    with pytest.raises(ManifestError, match=r"st: shard 7 \(offsets \[14, 0\]"):
        TreeBuilder(m, lambda *a: None, tensors=tensors).build()


def _grid(n: int) -> list[tuple[list[int], list[int]]]:
    """An n x n grid of 1 x 1 shards: each row's shards overlap on dim 0, none overlap."""
    return [([i, j], [1, 1]) for i in range(n) for j in range(n)]


def test_the_overlap_check_sweeps_the_dim_the_shards_are_cut_along() -> None:
    columns = [([0, j], [64, 1]) for j in range(200)]  # 200 shards, all overlapping on dim 0
    m, tensors = _facts(_sharded(columns, [0], [64, 200]))
    budget = PairBudget(10)  # a dim-0 sweep would compare ~20000 pairs
    check_sharded(m.sharded_tensors[0], tensors, "st", budget)
    assert budget.left == 10


def test_one_pair_budget_spans_every_sharded_tensor_of_the_manifest() -> None:
    m, tensors = _facts(_sharded(_grid(4), [0], [4, 4]))  # 4 rows x 6 pairs = 24 compared
    budget = PairBudget(30)
    check_sharded(m.sharded_tensors[0], tensors, "a", budget)
    assert budget.left == 6
    with pytest.raises(ManifestError, match="b: the manifest's shards overlap in too many pairs"):
        check_sharded(m.sharded_tensors[0], tensors, "b", budget)
