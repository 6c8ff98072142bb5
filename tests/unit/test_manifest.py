"""The manifest on plain data: what the donor plans and what the joiner accepts."""

from __future__ import annotations

import os
import random
import re
import tracemalloc

import pytest
import torch
from torch.distributed._shard.sharded_tensor.metadata import TensorProperties
from torch.distributed._shard.sharding_spec import ChunkShardingSpec

from recoveryd.errors import ManifestError, StateMismatchError, UnsupportedValueError
from recoveryd.transport import TransferConfig
from recoveryd.transport._allocating import allocate_targets, rebuild_allocated
from recoveryd.transport._flatten import build_plan, cut_messages
from recoveryd.transport._inplace import match_in_place
from recoveryd.transport._memory import Arena, Prefaulter
from recoveryd.transport._pieces import cut
from recoveryd.transport._sharding import LocalDTensor, LocalShardedTensor
from recoveryd.transport._validate import PairBudget, TensorSpec, check_manifest, check_sharded
from recoveryd.transport.format import FORMAT_VERSION
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


@pytest.mark.parametrize("seed", range(40))
def test_cut_maps_every_byte_of_every_nonempty_span_once_in_order(seed: int) -> None:
    rng = random.Random(seed)
    spans = [rng.choice([0, 1, 16, 100, 4096, 70_000]) for _ in range(rng.randint(1, 40))]
    total = sum(spans)
    if rng.random() < 0.5:
        msgs = cut_messages(spans, rng.choice([4096, 65_536]), rng.choice([1, 1024, 1 << 20]))
    else:  # any cut at all, as a hostile manifest may ask (check_packing judges it after)
        cuts = sorted(rng.sample(range(1, total), min(total - 1, 6))) if total > 1 else []
        msgs = [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)]
    pieces = [
        (s, o, n)
        for m in cut(spans, msgs)
        for s, o, n in zip(m.span_ids, m.offsets, m.sizes, strict=True)
    ]
    for m, n in zip(cut(spans, msgs), msgs, strict=True):
        assert m.nbytes == n == sum(m.sizes)
    # Read back in order, the pieces are the nonempty spans, whole, each from byte 0.
    expect: list[int] = []
    at: dict[int, int] = {}
    for s, o, n in pieces:
        assert n > 0, s
        assert o == at.get(s, 0), (s, o)
        at[s] = o + n
        if not expect or expect[-1] != s:
            expect.append(s)
    assert expect == [i for i, n in enumerate(spans) if n]
    assert all(at[i] == n for i, n in enumerate(spans) if n)


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


# ---- a hostile donor's offer is bounded before anything is built (issue 12) ----------


def _offer(
    m: pb.Manifest, into: object | None = None, config: TransferConfig | None = None
) -> object:
    """What a joiner (group rank 1 of 2, from rank 0) makes of an offer, up to its answer."""
    from recoveryd.transport import receiver

    got = pb.Manifest.FromString(m.SerializeToString())  # as the wire hands it over
    got.chain[:] = [0, 1]
    with Prefaulter() as prefaulter:
        return receiver._prepare(  # type: ignore[attr-defined]
            got,
            0,
            1,
            2,
            None,
            config or TransferConfig(),
            receiver._Into(into, torch.device("cpu"), None, None),  # type: ignore[attr-defined]
            prefaulter,
        )


def _one_span(nbytes: int, messages: list[int]) -> pb.Manifest:
    """One uint8 tensor filling one span, cut into ``messages``."""
    m = pb.Manifest(format_version=FORMAT_VERSION, chain=[0, 1])
    m.node_kind.append(pb.NODE_KIND_TENSOR)
    m.node_arg.append(0)
    m.tensor_dtype.append(pb.DTYPE_UINT8)
    m.tensor_ndim.append(1)
    m.tensor_shape.append(nbytes)
    m.tensor_stride.append(1)
    m.tensor_storage.append(0)
    m.tensor_byte_offset.append(0)
    m.tensor_requires_grad.append(False)
    m.tensor_is_parameter.append(False)
    m.storage_nbytes.append(nbytes)
    m.message_nbytes.extend(messages)
    return m


def test_a_manifest_of_one_byte_messages_is_refused_before_a_message_is_built() -> None:
    # The attack: 1 MiB of manifest cutting 1 MiB of data into 1-byte messages
    # cost the joiner +325 MiB and 3.4 s of message objects before any check.
    m = _one_span(1 << 20, [1] * (1 << 20))
    assert m.ByteSize() > 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(ManifestError) as e:
            _offer(m)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(e.value).startswith(
        "1048576 messages for 1048576 bytes in 1 spans; a donor cuts them into at most 256"
    )
    assert peak < 16 << 20, f"{peak} bytes traced"


@pytest.mark.parametrize(
    ("spans", "bucket", "direct"),
    [([5000, 4096 * 3 + 1, 10, 0, 70], 4096, 1), ([100_000, 3], 4096, 4096), ([9000], 8192, 1)],
)
def test_the_message_bound_is_the_donors_own_cut_and_one_more_is_refused(
    spans: list[int], bucket: int, direct: int
) -> None:
    state = {f"s{i}": torch.zeros(n, dtype=torch.uint8) for i, n in enumerate(spans)}
    m = build_plan(
        state, step=None, chain=[0, 1], bucket_bytes=bucket, direct_bytes=direct, checksums=False
    ).manifest
    decode_tensors(m)  # what an honest donor cuts passes
    sizes = list(m.message_nbytes)
    big = max(range(len(sizes)), key=lambda i: sizes[i])
    m.message_nbytes[big : big + 1] = [sizes[big] - 1, 1]
    most = sum(-(-n // 4096) for n in spans)
    if len(m.message_nbytes) > most:
        with pytest.raises(ManifestError, match=f"a donor cuts them into at most {most} "):
            decode_tensors(m)
    else:
        decode_tensors(m)  # still within what a 4 KiB-bucket donor could cut


def test_at_most_ceil_of_a_span_over_4_kib_messages_fit_exactly() -> None:
    m = _one_span(3 * 4096 + 1, [4096, 4096, 4096, 1])
    decode_tensors(m)
    m.message_nbytes[:] = [4096, 4096, 4095, 1, 1]
    with pytest.raises(ManifestError, match="5 messages for 12289 bytes in 1 spans"):
        decode_tensors(m)


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        (
            {"storage_nbytes": [32], "message_nbytes": [32]},
            "span 0 is 32 bytes, its tensors cover bytes 0 to 16",
        ),
        (
            {"storage_nbytes": [16, 16], "message_nbytes": [32]},
            "2 spans for 1 tensors: every span is some tensor's",
        ),
        (
            {"tensor_byte_offset": [16], "storage_nbytes": [32], "message_nbytes": [32]},
            "bytes 16 to 32",
        ),
        ({"key_kind": [pb.KEY_KIND_STR] * 2}, "2 dict keys, 1 str and 0 int ones"),
        ({"values": [pb.Value(none=True)] * 3}, "more values, DTensors and ShardedTensors than"),
    ],
    ids=["span-wider", "span-of-no-tensor", "span-padded-before", "keys", "values"],
)
def test_counts_and_spans_no_donor_makes_are_refused(over: dict[str, object], needle: str) -> None:
    m = _tensor_manifest(**over)
    with pytest.raises(ManifestError, match=re.escape(needle)):
        decode_tensors(m)


@pytest.mark.parametrize(
    ("shape", "stride"),
    [([1 << 59], [0]), ([4, 3], [1, 1]), ([2, 3, 4], [12, 0, 1]), ([3, 4], [2, 1])],
    ids=["expanded-5.8e17-over-4-bytes", "equal-strides", "zero-inner", "unfold-windows"],
)
def test_strides_that_put_elements_in_one_place_are_refused(
    shape: list[int], stride: list[int]
) -> None:
    m = _tensor_manifest(tensor_ndim=[len(shape)], tensor_shape=shape, tensor_stride=stride)
    extent = 4 * (1 + sum((d - 1) * s for d, s in zip(shape, stride, strict=True)))
    m.storage_nbytes[:] = [extent]
    m.message_nbytes[:] = [extent]
    with pytest.raises(ManifestError, match=r"tensor 0: shape .* puts several elements in one"):
        decode_tensors(m)


def test_any_stride_on_a_dim_of_one_element_is_fine() -> None:
    m = _tensor_manifest(tensor_ndim=[3], tensor_shape=[1, 4, 1], tensor_stride=[0, 1, 0])
    assert decode_tensors(m)[0].extent == 16


def test_a_view_whose_elements_share_memory_travels_dense() -> None:
    base = torch.arange(10.0)
    state = {"expanded": torch.tensor([7.0]).expand(1000), "windows": base.unfold(0, 4, 2)}
    m = _plan(state)
    tensors = decode_tensors(m)
    assert [t.stride for t in tensors] == [(1,), (4, 1)]
    assert sorted(m.storage_nbytes) == [4 * 4 * 4, 1000 * 4]


@pytest.mark.parametrize("kind", [pb.NODE_KIND_VALUE, pb.NODE_KIND_DTENSOR])
def test_one_value_or_dtensor_named_by_two_nodes_is_refused(kind: int) -> None:
    # Two nodes naming one entry would make the joiner decode (or check) it twice:
    # a large value or mesh named by a million 2-byte nodes.
    m = _plan({"a": 1, "b": 2})
    m.node_kind[1:] = [kind, kind]
    m.node_arg[1:] = [0, 0]
    del m.values[1:]
    if kind == pb.NODE_KIND_DTENSOR:
        del m.values[:]
        m.dtensors.add(device_type="cpu")
    with pytest.raises(ManifestError, match="not each used once, in pre-order"):
        TreeBuilder(m, lambda *a: None).build()


def _two_gib() -> pb.Manifest:
    """The attack: a 63-byte manifest announcing one 2 GiB tensor."""
    m = _one_span(1 << 31, [1 << 30, 1 << 30])
    assert m.ByteSize() == 63
    return m


def test_an_allocating_receive_over_max_alloc_bytes_is_refused_before_allocating(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from recoveryd.transport import _memory

    def no_mapping(*a: object) -> object:
        raise AssertionError("the joiner mapped memory for a refused offer")

    monkeypatch.setattr(_memory, "_mapping", no_mapping)
    with pytest.raises(ManifestError) as e:
        _offer(_two_gib(), config=TransferConfig(max_alloc_bytes=1 << 30))
    # 2 GiB of spans and two staging buffers of the largest (1 GiB) message.
    assert str(e.value) == (
        "rank 0's offer would have this joiner allocate 4294967296 bytes (4.0 GiB: its "
        "2147483648-byte state, and staging), over its limit of 1073741824 bytes (1.0 GiB, "
        "max_alloc_bytes); nothing was allocated. Set RECOVERYD_MAX_ALLOC_BYTES "
        "(TransferConfig.max_alloc_bytes) higher if this host has the memory"
    )
    assert e.value.peer_rank == 0


def test_the_default_alloc_limit_is_a_share_of_the_memory_available_now(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from recoveryd.transport import _memory

    monkeypatch.delenv("RECOVERYD_MAX_ALLOC_BYTES", raising=False)
    monkeypatch.setattr(_memory, "host_available", lambda: 2 << 30)
    with pytest.raises(
        ManifestError,
        match=r"limit of 1610612736 bytes \(1\.5 GiB, 75% of the "
        r"2\.0 GiB available on this host\)",
    ):
        _offer(_two_gib())
    monkeypatch.setenv("RECOVERYD_MAX_ALLOC_BYTES", str(1 << 40))
    assert TransferConfig().max_alloc_bytes == 1 << 40


def test_host_available_memory_is_read_and_plausible() -> None:
    from recoveryd.transport._memory import host_available

    free = host_available()
    assert 0 < free <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_in_place_scratch_over_max_alloc_bytes_is_refused_before_allocating() -> None:
    sent = {"w": torch.zeros(64, 64)}
    mine = {"w": torch.zeros(64, 64).t()}  # laid out otherwise: the span needs scratch
    m = _plan(sent)
    with pytest.raises(
        ManifestError,
        match=r"allocate 49152 bytes \(48\.0 KiB: 16384 bytes of scratch, and staging\)",
    ):
        _offer(m, into=mine, config=TransferConfig(max_alloc_bytes=32 << 10))
    _offer(m, into=mine, config=TransferConfig(max_alloc_bytes=48 << 10))


# ---- in place, plain values are the joiner's types and paths the joiner's (issue 12) --


def _joiner() -> dict[str, object]:
    return {
        "w": torch.zeros(3),
        "opt": {
            "lr": 0.1,
            "betas": (0.9, 0.999),
            "foreach": None,
            "fused": None,
            "maximize": False,
            "step": 3,
            "dtype": torch.float32,
        },
        "sched": [1, 2],
    }


def test_in_place_values_may_differ_in_value_not_in_type() -> None:
    donor = _joiner()
    donor["opt"] = {**donor["opt"], "lr": 1e9, "betas": (0.5, 0.5), "step": 10}  # type: ignore[dict-item]
    m = _plan(donor)
    _, state = match_in_place(m, decode_tensors(m), _joiner())
    assert state["opt"]["lr"] == 1e9  # type: ignore[index]


def test_in_place_refuses_other_types_and_paths_the_joiner_lacks_naming_every_one() -> None:
    donor: dict[str, object] = {
        "w": torch.zeros(3),
        "opt": {
            "lr": 1e9,  # another value: fine
            "betas": [0.9, 0.999],  # a list where the joiner has a tuple
            "foreach": True,  # a bool where the joiner has None
            "fused": None,
            "maximize": 0,  # an int where the joiner has a bool
            "step": 3.0,  # a float where the joiner has an int
            "dtype": torch.float32,
            "backdoor": "x",  # a key the joiner never had
        },
        "sched": [1, 2, 3],
        "extra": {"deep": {"t": torch.zeros(2)}},
    }
    m = _plan(donor)
    with pytest.raises(StateMismatchError) as e:
        match_in_place(m, decode_tensors(m), _joiner())
    assert e.value.paths == [
        "opt.betas: tuple of 2 here, a list of 2 sent",
        "opt.foreach: None here, bool sent",
        "opt.maximize: bool here, int sent",
        "opt.step: int here, float sent",
        "opt.backdoor: missing in the joiner's state_dict",
        "sched: list of 2 here, a list of 3 sent",
        "extra: missing in the joiner's state_dict",
    ]


def test_in_place_a_container_where_the_joiner_has_a_leaf_is_named_once() -> None:
    m = _plan({"w": {"a": torch.zeros(3), "b": [1]}, "opt": 1.5, "sched": None})
    with pytest.raises(StateMismatchError) as e:
        match_in_place(m, decode_tensors(m), {"w": torch.zeros(3), "opt": {}, "sched": [1]})
    assert e.value.paths == [
        "w: Tensor here, a dict sent",
        "opt: dict here, float sent",
        "sched: list here, None sent",
        "w: not in the donor's state_dict",
    ]


def test_a_real_adamw_state_matches_in_place() -> None:
    def trained(steps: int, lr: float) -> dict[str, object]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        for _ in range(steps):
            model(torch.randn(2, 4)).sum().backward()
            opt.step()
            opt.zero_grad()
        return {"model": model.state_dict(), "optim": opt.state_dict()}

    donor, joiner = trained(3, 1e-2), trained(1, 1e-3)
    groups = joiner["optim"]["param_groups"][0]  # type: ignore[index]
    assert groups["foreach"] is None
    assert groups["maximize"] is False
    m = _plan(donor)
    _, state = match_in_place(m, decode_tensors(m), joiner)
    assert state["optim"]["param_groups"][0]["lr"] == 1e-2  # type: ignore[index]


def test_in_place_into_a_view_whose_elements_share_memory_is_refused_before_writing() -> None:
    m = _plan({"windows": torch.zeros(4, 4), "expanded": torch.zeros(3, 5)})
    mine = {
        "windows": torch.arange(10.0).unfold(0, 4, 2),
        "expanded": torch.zeros(3, 1).expand(3, 5),
    }
    with pytest.raises(StateMismatchError) as e:
        match_in_place(m, decode_tensors(m), mine)
    # An expanded tensor is written through its own memory; overlapping windows cannot be.
    assert e.value.paths == [
        "windows: strides [2, 1] here put several elements in one place, which cannot be "
        "written; make it contiguous"
    ]


def test_max_alloc_bytes_must_be_positive() -> None:
    from recoveryd.errors import ConfigError

    with pytest.raises(ConfigError, match="max_alloc_bytes"):
        TransferConfig(max_alloc_bytes=0)
