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
from recoveryd.transport._sharding import (
    LocalDTensor,
    LocalShardedTensor,
    decode_placement,
    dtensor_meta,
    sharded_meta,
)
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
            if not isinstance(mine, DTensor | LocalDTensor):
                problems.append(f"{where}: {type(mine).__name__} here, a DTensor sent")
            else:
                sent_meta = m.dtensors[arg]
                why = _dtensor_differs(dtensor_meta(mine, path), sent_meta)
                if why:
                    problems.append(f"{where}: {why}")
                else:
                    local = mine.local if isinstance(mine, LocalDTensor) else mine._local_tensor
                    check(sent_meta.local_tensor, local, path)
        else:
            if arg >= len(m.sharded_tensors):
                raise ManifestError("ShardedTensor index out of range")
            if not isinstance(mine, ShardedTensor | LocalShardedTensor):
                problems.append(f"{where}: {type(mine).__name__} here, a ShardedTensor sent")
            else:
                sent_st = m.sharded_tensors[arg]
                here = sharded_meta(mine, path)
                if isinstance(mine, LocalShardedTensor):
                    locals_ = mine.locals
                else:
                    locals_ = [s.tensor for s in mine.local_shards()]
                if list(here.global_size) != list(sent_st.global_size):
                    problems.append(
                        f"{where}: global size {list(here.global_size)} here, "
                        f"{list(sent_st.global_size)} sent"
                    )
                elif len(locals_) != len(sent_st.local_tensor):
                    problems.append(
                        f"{where}: {len(locals_)} local shards here, "
                        f"{len(sent_st.local_tensor)} sent"
                    )
                else:
                    for j, (local, mine_si, ti, si) in enumerate(
                        zip(
                            locals_,
                            here.local_shard,
                            sent_st.local_tensor,
                            sent_st.local_shard,
                            strict=True,
                        )
                    ):
                        ours, theirs = here.shards[mine_si], sent_st.shards[si]
                        if list(ours.offsets) != list(theirs.offsets) or list(ours.sizes) != list(
                            theirs.sizes
                        ):
                            problems.append(
                                f"{where}.<shard {j}>: offsets {list(ours.offsets)} size "
                                f"{list(ours.sizes)} here, offsets {list(theirs.offsets)} size "
                                f"{list(theirs.sizes)} sent"
                            )
                        else:
                            check(ti, local, path, f".<shard {j}>")
        return mine

    state = TreeBuilder(m, leaf, tensors=tensors).build()
    for path, obj in have.items():
        if path not in sent and local_tensors(obj):
            problems.append(f"{path_str(path)}: not in the donor's state_dict")
    if problems:
        raise StateMismatchError(problems)
    return dst, state


def _dtensor_differs(here: pb.DTensorMeta, sent: pb.DTensorMeta) -> str:
    """How a joiner's DTensor is sharded unlike the donor's, in words ("" if alike)."""
    if list(here.global_shape) != list(sent.global_shape):
        return f"global shape {list(here.global_shape)} here, {list(sent.global_shape)} sent"
    if list(here.mesh_shape) != list(sent.mesh_shape):
        return f"mesh shape {list(here.mesh_shape)} here, {list(sent.mesh_shape)} sent"
    if list(here.placements) != list(sent.placements):
        return f"placements {_placements_text(here)} here, {_placements_text(sent)} sent"
    return ""


def _placements_text(meta: pb.DTensorMeta) -> str:
    return "[" + ", ".join(repr(decode_placement(p)) for p in meta.placements) + "]"


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
