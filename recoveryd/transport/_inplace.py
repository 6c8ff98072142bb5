"""The in-place rebuild: the donor's tree over the joiner's own tensors.

An in-place receive is matched against the joiner's state_dict (every
path, kind, shape, dtype, DTensor placement and ShardedTensor offset) before
a single byte is written; then each span lands straight in the joiner's
memory where its tensors sit the way the donor's do, and through scratch
plus per-tensor copies where they do not.
"""

from __future__ import annotations

import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor

from recoveryd.errors import ManifestError, StateMismatchError
from recoveryd.transport._memory import Arena
from recoveryd.transport._pieces import byte_view
from recoveryd.transport._placements import placements_of
from recoveryd.transport._validate import TensorSpec
from recoveryd.transport.format import (
    NODE_DTENSOR,
    NODE_TENSOR,
    Path,
    path_str,
)
from recoveryd.transport.tree import TreeBuilder, flatten_leaves, local_tensors
from recoveryd.v1 import manifest_pb2 as pb


def match_in_place(
    m: pb.Manifest, tensors: list[TensorSpec], into: object
) -> tuple[dict[int, torch.Tensor], object]:
    """Matches every incoming tensor to the joiner's tensor at the same path.

    Returns:
        The joiner tensor for each manifest tensor index, and the donor's
        tree with the joiner's own tensor objects as its tensor leaves.

    Raises:
        StateMismatchError: naming every path that is missing, extra, or of
            another kind, shape or dtype. Nothing has been written.
    """
    have = flatten_leaves(into)
    sent: set[Path] = set()
    dst: dict[int, torch.Tensor] = {}
    problems: list[str] = []

    def check(index: int, t: torch.Tensor, path: Path, suffix: str = "") -> None:
        spec = tensors[index]
        if t.dtype != spec.dtype:
            where = path_str(path) + suffix
            problems.append(f"{where}: dtype {t.dtype} here, {spec.dtype} sent")
        elif t.shape != spec.shape:
            where = path_str(path) + suffix
            problems.append(f"{where}: shape {list(t.shape)} here, {list(spec.shape)} sent")
        else:
            dst[index] = t

    def leaf(kind: int, arg: int, path: Path) -> object:
        sent.add(path)
        mine = have.get(path)
        if kind == NODE_TENSOR and (type(mine) is torch.Tensor or type(mine) is torch.nn.Parameter):
            check(arg, mine, path)  # the common case first
            return mine
        where = path_str(path)
        if mine is None and path not in have:
            problems.append(f"{where}: missing in the joiner's state_dict")
            return None
        if kind == NODE_TENSOR:
            problems.append(f"{where}: {type(mine).__name__} here, a tensor sent")
        elif kind == NODE_DTENSOR:
            if arg >= len(m.dtensors):
                raise ManifestError("DTensor index out of range")
            if not isinstance(mine, DTensor):
                problems.append(f"{where}: {type(mine).__name__} here, a DTensor sent")
            else:
                dmeta = m.dtensors[arg]
                here = placements_of(mine, path)
                if list(mine.shape) != list(dmeta.global_shape):
                    problems.append(
                        f"{where}: global shape {list(mine.shape)} here, "
                        f"{list(dmeta.global_shape)} sent"
                    )
                elif here != list(dmeta.placements):
                    problems.append(
                        f"{where}: placements {list(mine.placements)} here, differ from the sent"
                    )
                elif list(mine.device_mesh.mesh.shape) != list(dmeta.mesh_shape):
                    problems.append(
                        f"{where}: mesh shape {list(mine.device_mesh.mesh.shape)} here, "
                        f"{list(dmeta.mesh_shape)} sent"
                    )
                else:
                    check(dmeta.local_tensor, mine._local_tensor, path)
        else:
            if arg >= len(m.sharded_tensors):
                raise ManifestError("ShardedTensor index out of range")
            if not isinstance(mine, ShardedTensor):
                problems.append(f"{where}: {type(mine).__name__} here, a ShardedTensor sent")
            else:
                meta = m.sharded_tensors[arg]
                shards = mine.local_shards()
                if len(shards) != len(meta.local_tensor):
                    problems.append(
                        f"{where}: {len(shards)} local shards here, {len(meta.local_tensor)} sent"
                    )
                else:
                    for j, (shard, ti, si) in enumerate(
                        zip(shards, meta.local_tensor, meta.local_shard, strict=True)
                    ):
                        if list(shard.metadata.shard_offsets) != list(meta.shards[si].offsets):
                            problems.append(f"{where}.<shard {j}>: offsets differ")
                        else:
                            check(ti, shard.tensor, path, f".<shard {j}>")
        return mine

    state = TreeBuilder(m, leaf).build()
    for path, obj in have.items():
        if path not in sent and local_tensors(obj):
            problems.append(f"{path_str(path)}: not in the donor's state_dict")
    if problems:
        raise StateMismatchError(problems)
    return dst, state


def place_in_place(
    tensors: list[TensorSpec], sizes: list[int], dst: dict[int, torch.Tensor], arena: Arena
) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, int]]]:
    """Chooses, per span, the joiner's own memory (same layout) or scratch plus copies.

    Returns:
        One buffer per span, and the (joiner tensor, manifest tensor) pairs
        to copy out of scratch once the data is in.
    """
    by_span: list[list[int]] = [[] for _ in sizes]
    for i, spec in enumerate(tensors):
        by_span[spec.storage].append(i)
    targets: list[torch.Tensor] = []
    copies: list[tuple[torch.Tensor, int]] = []
    for s, members in enumerate(by_span):
        target = _same_layout(members, tensors, dst, sizes[s])
        if target is not None:
            targets.append(target)
        else:
            targets.append(arena.empty(sizes[s]))
            copies.extend((dst[i], i) for i in members)
    return targets, copies


def _same_layout(
    members: list[int], tensors: list[TensorSpec], dst: dict[int, torch.Tensor], nbytes: int
) -> torch.Tensor | None:
    """The joiner's bytes that mirror a donor span, if its tensors sit the same way in one storage."""
    if not members:
        return None
    if len(members) == 1:
        # The usual case: one contiguous tensor filling its span on both sides.
        t, spec = dst[members[0]], tensors[members[0]]
        if (
            spec.contiguous
            and spec.byte_offset == 0
            and spec.numel * spec.dtype.itemsize == nbytes
            and t.is_contiguous()
            and not t.is_conj()
            and not t.is_neg()
        ):
            return t.detach().reshape(-1).view(torch.uint8)
    # Writing the span straight into the joiner's memory is only right if the
    # donor's tensors cover every byte of it: alignment padding or the gaps
    # between views would otherwise land on joiner bytes no tensor names.
    covered = 0
    for lo, hi in sorted(
        (tensors[i].byte_offset, tensors[i].byte_offset + tensors[i].extent) for i in members
    ):
        if lo > covered:
            return None
        covered = max(covered, hi)
    if covered < nbytes:
        return None
    for i in members:
        spec, t = tensors[i], dst[i]
        if spec.extent != spec.numel * spec.dtype.itemsize or t.is_conj() or t.is_neg():
            return None  # gaps inside a tensor, or a view that transforms on write
    first = dst[members[0]]
    ptr = first.untyped_storage().data_ptr()
    base: int | None = None
    for i in members:
        t, spec = dst[i], tensors[i]
        if t.untyped_storage().data_ptr() != ptr or t.device != first.device:
            return None
        if spec.numel and tuple(t.stride()) != spec.stride:
            return None
        b = int(t.storage_offset()) * t.element_size() - spec.byte_offset
        if base is None:
            base = b
        elif b != base:
            return None
    assert base is not None
    if base < 0 or base + nbytes > first.untyped_storage().nbytes():
        return None
    return byte_view(first, base, nbytes)
