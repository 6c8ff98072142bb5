"""The allocating rebuild: fresh tensors, DTensors and ShardedTensors for the received tree.

An allocating receive lays the span buffers out in stream order (packed
messages land in place, see :class:`~recoveryd.transport._memory.Arena`),
then builds the donor's tree as views over them before any data arrives,
so a malformed tree is refused before the donor streams anything.
DTensors are rebuilt on the joiner's mesh, ShardedTensors on its group.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed._shard.sharded_tensor.metadata import (
    ShardedTensorMetadata,
    TensorProperties,
)
from torch.distributed.tensor import DTensor

from recoveryd.errors import ManifestError, StateMismatchError
from recoveryd.transport import _dtypes
from recoveryd.transport._memory import Arena, SpanBuffers
from recoveryd.transport._pieces import Message, landing_in_place
from recoveryd.transport._sharding import MeshKey, decode_placement, find_group, rebuild_mesh
from recoveryd.transport._validate import TensorSpec
from recoveryd.transport.format import NODE_DTENSOR, NODE_TENSOR, Path, path_str
from recoveryd.transport.tree import TreeBuilder, typed_view
from recoveryd.v1 import manifest_pb2 as pb


def rebuild_allocated(
    m: pb.Manifest,
    tensors: list[TensorSpec],
    targets: SpanBuffers,
    mesh: Any | None,
    shard_group: Any | None,
) -> object:
    """The donor's tree over freshly received span buffers (views keep their aliasing).

    DTensors go on ``mesh`` when given, else on the donor's mesh rebuilt here
    (one mesh object per distinct mesh); ShardedTensors on ``shard_group``
    when given, else on the existing group of the donor's sharding ranks.
    """
    per_span = Counter(spec.storage for spec in tensors)
    parameters = list(m.tensor_is_parameter)
    meshes: dict[MeshKey, Any] = {}

    def plain(i: int) -> torch.Tensor:
        spec = tensors[i]
        t = None
        if spec.contiguous and spec.numel and spec.byte_offset == 0 and per_span[spec.storage] == 1:
            t = targets.sole_tensor(spec.storage, spec.dtype, spec.numel)
            if t is not None and len(spec.shape) != 1:
                t = t.view(spec.shape)
        if t is None:
            t = typed_view(targets[spec.storage], spec)
        grad = spec.requires_grad and (t.is_floating_point() or t.is_complex())
        if parameters[i]:
            return torch.nn.Parameter(t, requires_grad=grad)
        if grad:
            t.requires_grad_(True)
        return t

    def leaf(kind: int, arg: int, path: Path) -> object:
        if kind == NODE_TENSOR:
            if arg >= len(tensors):
                raise ManifestError("tensor index out of range")
            return plain(arg)
        if kind == NODE_DTENSOR:
            if arg >= len(m.dtensors):
                raise ManifestError("DTensor index out of range")
            meta = m.dtensors[arg]
            local = plain(meta.local_tensor)
            on = mesh
            if on is None:  # the donor's mesh, on the device the shard lands on
                on = rebuild_mesh(meta, path, meshes, device_type=local.device.type)
            return _dtensor(meta, local, on, path)
        if arg >= len(m.sharded_tensors):
            raise ManifestError("ShardedTensor index out of range")
        smeta = m.sharded_tensors[arg]
        group = shard_group if shard_group is not None else _group_of(smeta, path)
        return _sharded(smeta, [plain(i) for i in smeta.local_tensor], group, path)

    # Paths only name a DTensor or ShardedTensor (which get theirs regardless).
    return TreeBuilder(m, leaf, paths=False, tensors=tensors).build()


def _dtensor(meta: pb.DTensorMeta, local: torch.Tensor, mesh: Any, path: Path) -> DTensor:
    if list(mesh.mesh.shape) != list(meta.mesh_shape):
        raise StateMismatchError(
            [
                f"{path_str(path)}: mesh shape {list(mesh.mesh.shape)} here, "
                f"{list(meta.mesh_shape)} sent"
            ]
        )
    if mesh.device_type != local.device.type:
        # from_local would copy the shard to the mesh's device, and the bytes
        # received into the buffer here would never reach the DTensor.
        raise StateMismatchError(
            [
                f"{path_str(path)}: the mesh given is on {mesh.device_type}, the received "
                f"shard lands on {local.device.type}: pass alloc_device= of the mesh's type"
            ]
        )
    placements = [decode_placement(p) for p in meta.placements]
    shape, stride = torch.Size(meta.global_shape), tuple(meta.global_stride)
    if mesh.get_coordinate() is not None:
        try:
            return DTensor.from_local(
                local, mesh, placements, run_check=False, shape=shape, stride=stride
            )
        except (RuntimeError, ValueError, AssertionError) as e:
            raise ManifestError(f"{path_str(path)}: a DTensor torch refuses to build: {e}") from e
    # This rank is outside the mesh: from_local would hand it an empty local
    # tensor and drop what was sent; keep it, as torch's own PGTransport does.
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

    spec = DTensorSpec(mesh, tuple(placements), tensor_meta=TensorMeta(shape, stride, local.dtype))
    return DTensor(local, spec, requires_grad=local.requires_grad)  # type: ignore[no-untyped-call]


def _group_of(meta: pb.ShardedTensorMeta, path: Path) -> Any | None:
    """The existing group of the donor's sharding ranks (``None``: the default group)."""
    ranks = list(meta.group_ranks)
    if not ranks or not dist.is_initialized():
        return None  # an older donor, or no groups here: placements read as ranks of the default
    group = find_group(ranks)
    if group is None:
        raise StateMismatchError(
            [
                f"{path_str(path)}: the ShardedTensor was sharded over ranks {ranks} and no "
                "process group of those ranks exists here: pass shard_group= or receive in place"
            ]
        )
    return group


def _sharded(
    meta: pb.ShardedTensorMeta, locals_: list[torch.Tensor], group: Any | None, path: Path
) -> ShardedTensor:
    dtype = _dtypes.FROM_PB.get(meta.dtype)
    if dtype is None:
        raise ManifestError(f"unknown ShardedTensor dtype {meta.dtype}")
    device = locals_[0].device if locals_ else torch.device("cpu")

    def placement(group_rank: int) -> str:
        if group is None or not dist.is_initialized():
            return f"rank:{group_rank}/{device}"
        return f"rank:{dist.get_global_rank(group, group_rank)}/{device}"

    try:
        shards_md = [
            ShardMetadata(list(s.offsets), list(s.sizes), placement(s.group_rank))
            for s in meta.shards
        ]
    except (ValueError, RuntimeError) as e:
        raise ManifestError(f"bad ShardedTensor shard metadata: {e}") from e
    global_md = ShardedTensorMetadata(
        shards_metadata=shards_md,
        size=torch.Size(meta.global_size),
        tensor_properties=TensorProperties(dtype=dtype, requires_grad=meta.requires_grad),
    )
    local_shards = [
        Shard(tensor=t, metadata=shards_md[j])
        for t, j in zip(locals_, meta.local_shard, strict=True)
    ]
    try:
        return ShardedTensor._init_from_local_shards_and_global_metadata(
            local_shards, global_md, process_group=group
        )
    except (ValueError, RuntimeError) as e:
        raise StateMismatchError(
            [
                f"{path_str(path)}: a ShardedTensor cannot be rebuilt on this rank ({e}); "
                "pass shard_group= or receive in place"
            ]
        ) from e


def allocate_targets(
    sizes: list[int], messages: list[Message], device: torch.device, arena: Arena
) -> tuple[SpanBuffers, list[torch.Tensor | None]]:
    """Fresh span buffers for an allocating receive, and where each message lands."""
    if device.type == "cpu":
        return arena.for_stream(sizes, messages)
    buffers = SpanBuffers(sizes, arena, device=device)
    return buffers, landing_in_place(messages, buffers)
