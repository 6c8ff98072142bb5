"""The manifest on plain data: what the donor plans and what the joiner accepts."""

from __future__ import annotations

import re

import pytest
import torch

from recoveryd.errors import ManifestError, StateMismatchError, UnsupportedValueError
from recoveryd.transport._allocating import allocate_targets, rebuild_allocated
from recoveryd.transport._flatten import build_plan, cut_messages
from recoveryd.transport._memory import Arena
from recoveryd.transport._pieces import cut
from recoveryd.transport._sharding import LocalDTensor, LocalShardedTensor
from recoveryd.transport._validate import check_manifest
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
    meta = pb.DTensorMeta(device_type="cpu", **facts)  # type: ignore[arg-type]
    return {"dt": LocalDTensor(local=local, meta=meta)}


_SHARD0 = pb.Placement(kind=pb.Placement.KIND_SHARD, dim=0)


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
