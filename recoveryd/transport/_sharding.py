"""Sharding facts in the manifest: DTensor meshes and placements, ShardedTensor shards.

Both sides read the facts from here: the donor writes them for a DTensor or
a ShardedTensor (:func:`dtensor_meta`, :func:`sharded_meta`), or copies them
from a :class:`LocalDTensor` / :class:`LocalShardedTensor` (a local shard
held without its mesh or group, as a sidecar holds a trainer's); an
in-place joiner compares them with its own; an allocating joiner rebuilds
the mesh (:func:`rebuild_mesh`) or finds the group (:func:`find_group`) they
name when it is given none. Nothing here runs a collective.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor import Shard as ShardPlacement
from torch.distributed.tensor.placement_types import Partial, Placement

from recoveryd.errors import ManifestError, StateMismatchError, UnsupportedValueError
from recoveryd.transport import _dtypes
from recoveryd.transport.format import Path, path_str
from recoveryd.v1 import manifest_pb2 as pb

logger = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class LocalDTensor:
    """A DTensor's local shard with its sharding facts, without its DeviceMesh.

    What a sidecar holds for a trainer's DTensor: the local shard (the
    trainer's memory) and the facts the manifest carries (global shape and
    stride, placements, the mesh's device type, shape, global ranks and dim
    names). It is sent and received in place like the DTensor it stands for.
    """

    local: torch.Tensor
    meta: pb.DTensorMeta
    """The facts (``local_tensor`` unused)."""


@dataclass(eq=False, slots=True)
class LocalShardedTensor:
    """A ShardedTensor's local shards with its sharding facts, without its process group."""

    locals: list[torch.Tensor]
    """The local shards' tensors, in the order of ``meta.local_shard``."""
    meta: pb.ShardedTensorMeta
    """The facts (``local_tensor`` unused)."""


def encode_placement(p: object, out: pb.Placement, path: Path) -> None:
    """Writes a DTensor placement into ``out``; unknown placements name their path."""
    name = type(p).__name__
    if name == "Replicate":
        out.kind = pb.Placement.KIND_REPLICATE
    elif name == "Shard":
        out.kind = pb.Placement.KIND_SHARD
        out.dim = p.dim  # type: ignore[attr-defined]
    elif name == "_StridedShard":
        out.kind = pb.Placement.KIND_STRIDED_SHARD
        out.dim = p.dim  # type: ignore[attr-defined]
        out.split_factor = p.split_factor  # type: ignore[attr-defined]
    elif name in ("Partial", "_Partial"):
        out.kind = pb.Placement.KIND_PARTIAL
        out.reduce_op = str(p.reduce_op)  # type: ignore[attr-defined]
    else:
        raise UnsupportedValueError(path_str([*path, f"<placement {name}>"]), p)


def decode_placement(p: pb.Placement) -> Placement:
    """The placement a manifest entry describes.

    Raises:
        ManifestError: an unknown placement kind.
    """
    if p.kind == pb.Placement.KIND_REPLICATE:
        return Replicate()
    if p.kind == pb.Placement.KIND_SHARD:
        return ShardPlacement(p.dim)
    if p.kind == pb.Placement.KIND_PARTIAL:
        return Partial(p.reduce_op or "sum")
    if p.kind == pb.Placement.KIND_STRIDED_SHARD:
        from torch.distributed.tensor.placement_types import _StridedShard

        return _StridedShard(p.dim, split_factor=p.split_factor)
    raise ManifestError(f"unknown DTensor placement kind {p.kind}")


def dtensor_meta(t: DTensor | LocalDTensor, path: Path) -> pb.DTensorMeta:
    """The sharding facts of a DTensor (or a copy of a stand-in's), ``local_tensor`` unset.

    Raises:
        UnsupportedValueError: a placement the manifest cannot carry.
    """
    if isinstance(t, LocalDTensor):
        out = pb.DTensorMeta()
        out.CopyFrom(t.meta)
        out.ClearField("local_tensor")
        return out
    out = pb.DTensorMeta(global_shape=list(t.shape), global_stride=list(t.stride()), device_type="")
    mesh = t.device_mesh
    out.device_type = mesh.device_type
    out.mesh_shape.extend(mesh.mesh.shape)
    out.mesh_ranks.extend(int(r) for r in mesh.mesh.flatten().tolist())
    if mesh.mesh_dim_names:
        out.mesh_dim_names.extend(mesh.mesh_dim_names)
    for p in t.placements:
        encode_placement(p, out.placements.add(), path)
    return out


def sharded_meta(t: ShardedTensor | LocalShardedTensor, path: Path) -> pb.ShardedTensorMeta:
    """The sharding facts of a ShardedTensor (or a copy of a stand-in's), ``local_tensor`` unset.

    Shards are placed by their rank within the sharding group (a joiner's
    global ranks differ from the donor's, its ranks within the group do not);
    the group's global ranks travel too.

    Raises:
        UnsupportedValueError: a dtype the manifest cannot carry.
    """
    if isinstance(t, LocalShardedTensor):
        out = pb.ShardedTensorMeta()
        out.CopyFrom(t.meta)
        out.ClearField("local_tensor")
        return out
    md = t.metadata()
    code = _dtypes.TO_PB.get(md.tensor_properties.dtype)
    if code is None:
        raise UnsupportedValueError(path_str(path), t)
    out = pb.ShardedTensorMeta(
        dtype=code,  # type: ignore[arg-type]
        requires_grad=bool(md.tensor_properties.requires_grad),
    )
    out.global_size.extend(md.size)
    group = getattr(t, "_process_group", None)
    if group is not None and dist.is_initialized():
        out.group_ranks.extend(dist.get_process_group_ranks(group))
    where: dict[tuple[int, ...], int] = {}
    for i, sm in enumerate(md.shards_metadata):
        shard = out.shards.add()
        shard.offsets.extend(sm.shard_offsets)
        shard.sizes.extend(sm.shard_sizes)
        rank = (sm.placement.rank() if sm.placement is not None else None) or 0
        if group is not None and dist.is_initialized():
            rank = dist.get_group_rank(group, rank) or 0
        shard.group_rank = rank
        where[tuple(sm.shard_offsets)] = i
    for s in t.local_shards():
        out.local_shard.append(where[tuple(s.metadata.shard_offsets)])
    return out


def find_group(ranks: Sequence[int]) -> Any | None:
    """An existing process group of exactly these global ranks, in this order, or ``None``.

    The default group first; then every group this process created (torch
    keeps no public index of them, so its registry is read).
    """
    want = [int(r) for r in ranks]
    if not dist.is_initialized():
        return None
    world = dist.group.WORLD
    if dist.get_process_group_ranks(world) == want:
        return world
    registry = getattr(dist.distributed_c10d, "_world", None)
    for pg in list(getattr(registry, "pg_group_ranks", {})):
        try:
            if dist.get_process_group_ranks(pg) == want:
                return pg
        except (RuntimeError, ValueError):
            continue
    return None


MeshKey = tuple[str, tuple[int, ...], tuple[int, ...], tuple[str, ...]]
"""What makes two rebuilt meshes the same: device type, shape, ranks, dim names."""


def rebuild_mesh(
    meta: pb.DTensorMeta,
    path: Path,
    cache: dict[MeshKey, DeviceMesh],
    device_type: str | None = None,
) -> DeviceMesh:
    """The donor's DeviceMesh, built here over this process's existing groups (no collective).

    ``cache`` makes the DTensors of one receive that name the same mesh
    share one mesh object. A mesh this rank is not in is built, and warned
    of once: its DTensors keep the local shards as sent, off this replica's
    own mesh (a receive across replicas wants ``device_mesh=``).

    Args:
        meta: the donor's facts.
        path: the DTensor's path, for errors.
        cache: the meshes built so far in this receive.
        device_type: the device type of the mesh here (that of the memory the
            local shards land in); defaults to the donor's.

    Raises:
        StateMismatchError: no default group here, the donor did not say its
            mesh's ranks (an older recoveryd), or a group the mesh needs on
            this rank does not exist; the message says to pass ``device_mesh=``.
        ManifestError: facts torch refuses to build a mesh of.
    """
    device_type = device_type or meta.device_type or "cpu"
    shape = list(meta.mesh_shape)
    ranks = list(meta.mesh_ranks)
    names = tuple(meta.mesh_dim_names) or None
    key = (device_type, tuple(shape), tuple(ranks), names or ())
    hit = cache.get(key)
    if hit is not None:
        return hit
    where = path_str(path)
    if not ranks:
        raise StateMismatchError(
            [
                f"{where}: a DTensor was sent without its mesh's ranks (an older recoveryd "
                "donor): pass device_mesh= or receive in place into a state holding it"
            ]
        )
    if math.prod(shape) != len(ranks):
        raise ManifestError(f"{where}: a mesh of shape {shape} with {len(ranks)} ranks")
    if not dist.is_initialized():
        raise StateMismatchError(
            [
                f"{where}: rebuilding the DTensor's mesh {shape} of ranks {ranks} needs the "
                "default process group here (none is initialised): pass device_mesh="
            ]
        )
    if names is not None and len(names) != len(shape):
        raise ManifestError(f"{where}: {len(names)} mesh dim names for {len(shape)} dims")
    mesh = torch.tensor(ranks, dtype=torch.int).reshape(shape)
    # Built without its groups (building them would run new_group, a
    # collective of the whole world), then given the existing ones this rank
    # needs, as DeviceMesh.from_group does.
    try:
        out = DeviceMesh(device_type, mesh, mesh_dim_names=names, _init_backend=False)
    except (RuntimeError, ValueError, AssertionError) as e:
        raise ManifestError(f"{where}: the DTensor's mesh cannot be built here: {e}") from e
    coordinate = out.get_coordinate()
    if coordinate is None:
        logger.warning(
            "%s: this rank (%d) is not in the donor's mesh of ranks %s: its DTensors keep "
            "the local shards as sent, off this replica's mesh; pass device_mesh= to "
            "receive them onto this replica's own mesh",
            where,
            dist.get_rank(),
            mesh.tolist(),
        )
    else:
        groups = []
        for dim in range(mesh.ndim):
            index = list(coordinate)
            index[dim] = slice(None)  # type: ignore[call-overload]
            line = mesh[tuple(index)].tolist()
            group = find_group(line)
            if group is None:
                label = names[dim] if names else dim
                raise StateMismatchError(
                    [
                        f"{where}: the DTensor's mesh {mesh.tolist()} needs, on this rank, a "
                        f"process group of ranks {line} (mesh dim {label!r}) and there is "
                        "none: build the mesh first (init_device_mesh) and pass device_mesh="
                    ]
                )
            groups.append(group)
        out._dim_group_names = [g.group_name for g in groups]
        registry = getattr(out, "_pg_registry", None)  # torch >= 2.12 looks groups up here
        if registry is not None:
            for g in groups:
                registry[g.group_name] = g
    cache[key] = out
    return out
